"""The server on a warehouse a real batch run published: its plan, its reads, and a real server process.

The warehouse is the session's `published` run (shared with the live path's tests). Spark is used only
to compute what the server must agree with; the server itself runs without it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from pyspark.sql import functions as F

from sparkrec.batch import recommend
from sparkrec.core import block
from sparkrec.core import columns as C
from sparkrec.core.config import load_config
from sparkrec.serve import reader
from sparkrec.serve import state as state_
from sparkrec.storage import tables
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e


def cfg_of(overrides):
    return load_config(ROOT / "conf" / "local.yaml", overrides)


def test_the_served_plan_reproduces_every_published_list(spark, published):
    """The plan the server rebuilds from serving_items, given each customer's history as the batch aggregates it,
    gives back the published table: same items, ranks, sources and explanations for every customer."""
    _, overrides = published
    cfg = cfg_of(overrides)
    snap = state_.load(cfg, reader.latest_recommend_run(cfg))
    read = lambda key: tables.read_required(spark, cfg, key).df  # noqa: E731
    uids, iids = read(C.USER_IDS), read(C.ITEM_IDS)
    history = recommend.indexed_history(read(C.INTERACTIONS), uids, iids)
    meta = recommend.item_meta(iids, read(C.ITEMS), history, cfg.recommend.rules)
    rows = recommend.user_rows(history, read(C.USER_FACTORS), cfg.recommend, meta).join(uids, C.USER_IDX).toPandas()
    again = pd.concat(list(block.lists_in_blocks(rows, snap.plan)), ignore_index=True)
    published_rows = read(C.RECOMMENDATIONS).toPandas()
    key = [C.USER_ID, C.RANK]
    cols = [C.USER_ID, C.RANK, C.ITEM_ID, C.REC_SOURCE, C.EXPLANATION, C.BECAUSE_ITEM_ID]
    mine = again.sort_values(key).reset_index(drop=True)
    theirs = published_rows.sort_values(key).reset_index(drop=True)
    assert len(theirs) == snap.lists.rows > 1000
    assert set(theirs[C.REC_SOURCE]) >= {C.SOURCE_ALS}
    pd.testing.assert_frame_equal(mine[cols], theirs[cols], check_dtype=False)
    assert (mine[C.SCORE] - theirs[C.SCORE]).abs().max() < 1e-5


def test_the_batch_writes_the_search_index_of_the_items_the_rules_allow(spark, published):
    _, overrides = published
    cfg = cfg_of(overrides)
    st = state_.State(cfg)
    assert st.refresh()
    snap = st.snapshot
    assert snap.searchable is not None, snap.search_problem
    items = tables.read_required(spark, cfg, C.ITEMS).df
    allowed = items.where(F.col(C.AVAILABLE)).count()
    known = set(snap.plan.catalogue.item_id[snap.searchable.shown])
    assert snap.searchable.index.documents == len(known) <= allowed
    assert not known & {r[0] for r in items.where(~F.col(C.AVAILABLE)).select(C.ITEM_ID).collect()}


def test_delta_rs_reads_a_table_with_deletion_vectors_as_spark_does(spark, published, tmp_path):
    wh, overrides = published
    mine = tmp_path / "wh"
    shutil.copytree(wh, mine)
    cfg = cfg_of([*overrides, f"warehouse={mine}"])
    path = cfg.table_path(C.INTERACTIONS)
    spark.sql(f"ALTER TABLE delta.`{path}` SET TBLPROPERTIES ('delta.enableDeletionVectors' = 'true')")
    spark.sql(f"DELETE FROM delta.`{path}` WHERE {C.EVENT_TYPE} = 'view'")
    log = "".join(p.read_text() for p in sorted(Path(path, "_delta_log").glob("*.json")))
    assert '"deletionVector":{' in log  # the delete really left a deletion vector, not rewritten files
    expected = spark.read.format("delta").load(path).groupBy(C.EVENT_TYPE).count().toPandas()
    got = reader.read(cfg, C.INTERACTIONS, [C.USER_ID, C.EVENT_TYPE]).frame
    assert "view" not in set(got[C.EVENT_TYPE])
    assert got.groupby(C.EVENT_TYPE).size().to_dict() == dict(zip(expected[C.EVENT_TYPE], expected["count"]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, token: str | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_a_real_server_process_serves_the_published_lists_and_stops_on_sigterm(spark, published, tmp_path):
    _, overrides = published
    port, token = free_port(), "token-for-the-process-test"
    env = {**os.environ, "SPARKREC_SERVE_TOKEN": token}
    sets = [a for o in [*overrides, "stream.source.kind=files", f"stream.source.path={tmp_path / 'in'}"] for a in ("--set", o)]
    cmd = [sys.executable, "-m", "sparkrec.cli", "serve", "--config", str(ROOT / "conf" / "local.yaml"), *sets,
           "--port", str(port)]
    logfile = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logfile, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                status, body = get(f"{base}/readyz")
                if status == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "the server was not ready in 90 s"
            time.sleep(0.3)
        cfg = cfg_of(overrides)
        recs = tables.read_required(spark, cfg, C.RECOMMENDATIONS).df
        customer = recs.where(F.col(C.REC_SOURCE) == C.SOURCE_ALS).select(C.USER_ID).first()[0]
        expected = [r[C.ITEM_ID] for r in recs.where(F.col(C.USER_ID) == customer).orderBy(C.RANK).collect()]
        status, got = get(f"{base}/v1/users/{customer}/recommendations", token)
        assert status == 200 and [r["item_id"] for r in got["items"]] == expected
        assert get(f"{base}/v1/users/{customer}/recommendations")[0] == 401
        status, cold = get(f"{base}/v1/users/never-seen-before/recommendations?n=5", token)
        assert status == 200 and cold["list"] == "cold_start" and len(cold["items"]) == 5
        search_checks(base, token, customer, got["items"])
        shop_page_checks(base, token, customer, tmp_path)
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal it caught (so a supervisor sees SIGTERM).
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        text = (tmp_path / "serve.log").read_text()
        assert "Traceback" not in text
        assert customer not in text  # no customer key in the server's log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        logfile.close()


def search_checks(base: str, token: str, customer: str, listed: list[dict]) -> None:
    """Search over HTTP on the index the batch wrote: an item's own word finds it, for anyone and for a customer."""
    item = listed[0]
    word = max(item["name"].split(), key=len)
    status, anyone = get(f"{base}/v1/search?q={urllib.parse.quote(word)}&n=100", token)
    assert status == 200 and item["item_id"] in [r["item_id"] for r in anyone["items"]] and not anyone["personalized"]
    assert all(word.lower() in (r["name"] or "").lower() for r in anyone["items"])
    status, mine = get(f"{base}/v1/search?q={urllib.parse.quote(word)}&n=100&customer={customer}", token)
    assert status == 200 and mine["personalized"] and {r["source"] for r in mine["items"]} == {"search_personal"}
    assert sorted(r["item_id"] for r in mine["items"]) == sorted(r["item_id"] for r in anyone["items"])
    status, body = get(f"{base}/v1/search?q=%22name%3A%20*", token)  # the index's own syntax, as plain words
    assert status == 200


def shop_page_checks(base: str, token: str, customer: str, tmp_path: Path) -> None:
    """Issue 31: the shop page in headless Chromium: it loads with the server's auth, a search shows results, and
    a "buy" removes that item from the customer's list (the event goes round through the stream's source)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_bin = shutil.which("chromedriver")
    assert chromium and driver_bin, "headless Chromium and its driver are needed: `make browser` installs them"
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,900", "--no-first-run",
                "--disable-background-networking", f"--user-data-dir={tmp_path / 'chrome'}"):
        options.add_argument(arg)
    options.binary_location = chromium
    browser = webdriver.Chrome(service=Service(driver_bin), options=options)
    try:
        browser.get(f"{base}/?customer={urllib.parse.quote(customer)}&token={token}")
        wait = WebDriverWait(browser, 15)

        def listed():
            return [e.get_attribute("data-item") for e in browser.find_elements(By.CSS_SELECTOR, "#list li")]

        wait.until(lambda b: len(listed()) == 10)
        assert "token" not in browser.current_url  # taken and dropped from the address
        assert browser.find_element(By.ID, "list-meta").text.startswith("list: published")
        name = browser.find_element(By.CSS_SELECTOR, "#list li").get_attribute("data-name")
        word = max((w for w in name.split() if w.isalpha()), key=len, default=max(name.split(), key=len))
        browser.find_element(By.ID, "q").send_keys(word[:3])  # still typing: completions are offered
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#suggestions button"))
        offered = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#suggestions button")]
        assert all(t.lower().startswith(word[:3].lower()) for t in offered), offered
        browser.find_element(By.ID, "q").clear()
        browser.find_element(By.ID, "q").send_keys(word)
        try:
            wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#results li"))
        except Exception:
            browser.save_screenshot(str(tmp_path / "failed.png"))
            raise AssertionError(f"no results for a word of {name!r}: status {browser.find_element(By.ID, 'status').text!r}, "
                                 f"console {browser.get_log('browser')}") from None
        assert "ordered for this customer" in browser.find_element(By.ID, "results-meta").text
        first = listed()[0]
        browser.find_element(By.CSS_SELECTOR, f'#list li[data-item="{first}"] button.buy').click()
        wait.until(lambda b: "list: live" in b.find_element(By.ID, "list-meta").text)
        assert first not in listed() and len(listed()) == 10
        assert "the list changed" in browser.find_element(By.ID, "status").text
        browser.save_screenshot(str(tmp_path / "shop.png"))
        severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not severe, severe
    finally:
        browser.quit()


def wait_for(fetch, ok, seconds: float):
    """Poll `fetch()` until `ok(result)`; (result, seconds taken). Fails after `seconds`."""
    started = time.monotonic()
    while True:
        got = fetch()
        if ok(got):
            return got, time.monotonic() - started
        assert time.monotonic() - started < seconds, f"not within {seconds} s: {got}"
        time.sleep(0.02)


def live_checks(client, snap, auth: dict, post) -> dict:
    """What a customer's action must do to their list: shared by the file-source and the Kafka tests.

    Returns the seconds each change took to show."""
    from datetime import datetime, timezone

    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    warm = next(k for k in snap.lists.index if snap.lists.get(k, 1)[0]["source"] == C.SOURCE_ALS)
    first = snap.lists.get(warm, 1)[0]["item_id"]
    post([{"user_id": warm, "item_id": first, "event_type": "purchase", "timestamp": stamp}])
    url = f"/v1/users/{warm}/recommendations"
    got, bought_s = wait_for(lambda: client.get(url, headers=auth).json(),
                             lambda b: b["list"] == "live" and first not in [r["item_id"] for r in b["items"]], 2.0)
    assert len(got["items"]) == snap.plan.n and got["as_of"].startswith(stamp[:16])
    # A stranger with five views of items the model knows gets a model list, explained by what they viewed.
    cat = snap.plan.catalogue
    known = list(cat.item_id[cat.at(snap.model.factors.item_idx[:5])[0]])
    new = "brand-new-customer-" + stamp
    post([{"user_id": new, "item_id": k, "event_type": "view", "timestamp": stamp} for k in known])
    got, new_s = wait_for(lambda: client.get(f"/v1/users/{new}/recommendations", headers=auth).json(),
                          lambda b: b["list"] == "live", 2.0)
    assert {r["source"] for r in got["items"]} == {C.SOURCE_ALS}
    assert not set(known) & {r["item_id"] for r in got["items"] if r["explanation"] != "you viewed this"}
    return {"purchase_s": bought_s, "new_customer_s": new_s}


def test_a_customers_list_changes_within_a_second_of_their_event_file_source(spark, published, tmp_path):
    """Events posted to the server reach the file directory, come back through the feed, and change the list;
    a customer with nothing new gets what the batch published, recomputed by the live path itself."""
    from fastapi.testclient import TestClient

    from sparkrec.serve import live
    from sparkrec.serve.app import create_app

    _, overrides = published
    cfg = cfg_of([*overrides, "stream.source.kind=files", f"stream.source.path={tmp_path / 'in'}"])
    st = state_.State(cfg)
    with TestClient(create_app(cfg, st, token=None)) as client:
        wait_for(lambda: st.snapshot, lambda s: s is not None, 30)
        snap = st.snapshot
        for key in snap.lists.index:  # the live path's own list for nothing new is the batch's, for every customer
            rows, _ = live.list_for(key, [], snap, cfg)
            assert [(r["item_id"], r["source"], r["explanation"]) for r in rows] == [
                (r["item_id"], r["source"], r["explanation"]) for r in snap.lists.get(key, cfg.recommend.n)]
        took = live_checks(client, snap, {}, lambda evs: client.post("/v1/events", json=evs).raise_for_status())
        # A list for one category: scored for it, every item in it.
        category = sorted(snap.category_codes)[0]
        customer = snap.lists.index[0]
        got = client.get(f"/v1/users/{customer}/recommendations?category={category}&n=5").json()
        cat = snap.plan.catalogue
        of = dict(zip(cat.item_id, cat.category))
        assert len(got["items"]) == 5 and {of[r["item_id"]] for r in got["items"]} == {category}
    assert max(took.values()) < 2.0


HOSTILE = [  # (event_id, user_id, item_id, event_type, timestamp, rating, quantity, price): one rule each
    ("e1", "u1", "i1", "view", "2026-12-01T10:00:00Z", None, None, None),          # kept
    ("e2", " u2 ", " i2 ", " Purchase ", "2026-12-01 10:00:00", None, "2", "9.5"),  # trimmed, synonym case: kept
    ("e3", None, "i1", "view", "2026-12-01T10:00:00Z", None, None, None),          # missing user
    ("e4", "u1", "  ", "view", "2026-12-01T10:00:00Z", None, None, None),          # missing item
    ("e5", '{"a": 1}', "i1", "view", "2026-12-01T10:00:00Z", None, None, None),    # nested object as an id
    ("e6", "u\x01", "i1", "view", "2026-12-01T10:00:00Z", None, None, None),       # control character
    ("e7", "true", "i1", "view", "2026-12-01T10:00:00Z", None, None, None),        # a JSON boolean as an id
    ("e8", "u1", "i" * 300, "view", "2026-12-01T10:00:00Z", None, None, None),     # too long
    ("e9", "u1", "i1", "teleport", "2026-12-01T10:00:00Z", None, None, None),      # unknown type
    ("e10", "u1", "i1", "view", "yesterday", None, None, None),                    # unparsable time
    ("e11", "u1", "i1", "view", "1999-01-01T00:00:00Z", None, None, None),         # before min_event_time
    ("e12", "u1", "i1", "view", "2030-01-01T00:00:00Z", None, None, None),         # in the future
    ("e13", "u1", "i1", "view", "2026-12-01T10:00:00Z", None, "abc", None),        # bad quantity
    ("e14", "u1", "i1", "view", "2026-12-01T10:00:00Z", None, "NaN", None),        # not finite
    ("e15", "u1", "i1", "view", "2026-12-01T10:00:00Z", None, "0", None),          # non-positive quantity
    ("e16", "u1", "i1", "view", "2026-12-01T10:00:00Z", None, None, "1e400"),      # infinite price
    ("e17", "u1", "i1", "rating", "2026-12-01T10:00:00Z", "9", None, None),        # rating out of range
    ("e18", "u1", "i1", "rating", "2026-12-01T10:00:00Z", None, None, None),       # rating missing
    ("e19", "u1", "i1", "rating", "2026-12-01T10:00:00Z", "4", None, None),        # kept
    ("e20", "u1", "POST", "view", "2026-12-01T10:00:00Z", None, None, None),       # non-product item
    ("e21", "u1", "i1", "view", "2026-12-01T10:00:00+01:00", None, "1.5", "0"),    # offset time, zero price: kept
]


def test_the_servers_row_rules_are_the_cleans(spark, make_config):
    """`core.events.accept` on hostile rows gives the clean's verdict (`clean.classify`) row for row: the reason,
    or the same canonical values."""
    from datetime import datetime, timezone

    from sparkrec.batch import clean
    from sparkrec.core import events
    from tests.helpers import raw_events

    cfg = make_config('clean.non_product_items=["POST"]')
    now = datetime(2026, 12, 6, tzinfo=timezone.utc)
    rows = clean.classify(raw_events(spark, HOSTILE), cfg.source, cfg.clean, now).select(
        C.EVENT_ID, C.REASON, C.USER_ID, C.ITEM_ID, C.EVENT_TYPE, C.EVENT_TS, C.QUANTITY, C.PRICE, C.RATING).collect()
    spark_verdict = {r[C.EVENT_ID]: r for r in rows}
    assert len(spark_verdict) == len(HOSTILE)
    names = ["event_id", "user_id", "item_id", "event_type", "timestamp", "rating", "quantity", "price"]
    for values in HOSTILE:
        ev, reason = events.accept(dict(zip(names, values)), cfg.source, cfg.clean, now)
        theirs = spark_verdict[values[0]]
        assert reason == theirs[C.REASON], (values, reason, theirs[C.REASON])
        if ev is not None:
            ts = theirs[C.EVENT_TS].replace(tzinfo=timezone.utc) if theirs[C.EVENT_TS].tzinfo is None else theirs[C.EVENT_TS]
            assert (ev.user_id, ev.item_id, ev.event_type, ev.event_ts, ev.quantity, ev.price, ev.rating) == (
                theirs[C.USER_ID], theirs[C.ITEM_ID], theirs[C.EVENT_TYPE], ts, theirs[C.QUANTITY], theirs[C.PRICE],
                theirs[C.RATING]), values
    assert sum(r[C.REASON] is None for r in rows) == 4  # e1, e2, e19, e21
