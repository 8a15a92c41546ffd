"""The server's routes, errors, limits, auth and swaps, in process, without a JVM.

The warehouse is written by hand with delta-rs: a plan of eight items (built
with the same `block`/`serving` code the batch uses), two customers' lists, a
`runs` row naming the versions. What the routes answer is checked against those
rows, so these tests fail when a lookup, a limit or the plan's round trip is wrong.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import schemathesis
from deltalake import write_deltalake
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

from sparkrec.core import block, pseudonyms, search, serving, topk
from sparkrec.core import columns as C
from sparkrec.core.config import SearchConfig, from_dict
from sparkrec.core.errors import ConfigError
from sparkrec.serve import state as state_
from sparkrec.serve.app import create_app, load_token

pytestmark = pytest.mark.nojvm

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "a-long-enough-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ITEMS = [f"sku{i}" for i in range(8)]
NAMES = ["Red heart bag", "Blue heart bag", "Green lamp", "Red lamp shade", "Heart candle holder", "Jumbo bag retrospot",
         "Red bag withdrawn", "Brown paper bag"]
SHOWN = [True] * 6 + [False, True]  # item 6 is unavailable: no list and no search shows it
POPULAR = [20, 30, 40, 50, 60, 70, 5, 10]  # distinct customers per item


def make_plan(n: int = 3) -> block.Plan:
    """Eight items: 0-5 candidates (2 factors), 6 unavailable (no candidate), 7 without factors; popular = 5,4,3,..."""
    idx = np.arange(8)
    vectors = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [0.5, 0.5], [0.7, 0.2]], dtype=np.float32)
    cats = np.array([0, 0, 1, 1, 0, 1], dtype=np.int32)
    seq = topk.FillSequence.of(idx[[5, 4, 3, 2, 1, 0, 7]], [70, 60, 50, 40, 30, 20, 10], [1, 0, 1, 1, 0, 0, -1],
                               ["popular"] * 7, [0] * 7)
    catalogue = block.Catalogue(idx, np.array(ITEMS, dtype=object), np.array(NAMES, dtype=object),
                                np.array(["a", "a", "b", "b", "a", "b", "b", None], dtype=object),
                                np.array([0, 0, 1, 1, 0, 1, 1, -1]))
    factors = topk.ItemMatrix(idx[:7], np.vstack([vectors, [[0.2, 0.2]]]).astype(np.float32))
    return block.Plan(n=n, cap=None, seq=seq, items=topk.ItemMatrix(idx[:6], vectors, cats),
                      unit=serving.explain_matrix(factors), catalogue=catalogue), factors


def published_rows(users: dict[str, str]) -> pd.DataFrame:
    """Two customers' lists (3 items each), as the recommend stage publishes them."""
    rows = []
    for (key, stored), items in zip(users.items(), ([0, 1, 4], [2, 3, 5])):
        for rank, item in enumerate(items, 1):
            rows.append({C.USER_ID: stored, C.ITEM_ID: ITEMS[item], C.RANK: rank, C.SCORE: 1.0 / rank,
                         C.REC_SOURCE: "als", C.BECAUSE_ITEM_ID: None, C.EXPLANATION: "matches your tastes"})
    return pd.DataFrame(rows)


def write_run(wh: Path, run_id: str, recs: pd.DataFrame, plan: block.Plan, factors: topk.ItemMatrix,
              mode: str = "overwrite", searchable: bool = True) -> None:
    """The tables of one recommend run and its `runs` row (versions as delta-rs wrote them).

    `searchable`: with the search columns and index the recommend stage writes (False: a run of a sparkrec before
    search)."""
    stamp = {C.MODEL_VERSION: run_id, C.RUN_ID: run_id, C.GENERATED_AT: pd.Timestamp("2026-12-01T00:00:00Z")}
    versions = {}

    def put(key: str, frame: pd.DataFrame, schema: pa.Schema | None = None) -> None:
        table = pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
        write_deltalake(str(wh / key), table, mode=mode, schema_mode="overwrite" if mode == "overwrite" else None)
        from deltalake import DeltaTable

        versions[key] = DeltaTable(str(wh / key)).version()

    put(C.RECOMMENDATIONS, recs.assign(**stamp))
    put(C.SIMILAR_ITEMS, pd.DataFrame({C.ITEM_ID: ["sku0", "sku0", "sku2"], C.SIMILAR_ITEM_ID: ["sku1", "sku5", "sku3"],
                                       C.RANK: [1, 2, 1], C.SCORE: [0.99, 0.9, 0.98]}).assign(**stamp))
    searched = pd.DataFrame({C.ITEM_IDX: np.arange(8), serving.SHOWN: SHOWN, serving.POPULARITY: POPULAR,
                             serving.RECENT_POPULARITY: POPULAR})
    rows = serving.plan_rows(plan, searched if searchable else None)
    schema = pa.schema([(C.ITEM_IDX, pa.int32()), (C.ITEM_ID, pa.string()), (C.ITEM_NAME, pa.string()),
                        (C.CATEGORY, pa.string()), (serving.CANDIDATE, pa.list_(pa.float32())),
                        (serving.CANDIDATE_CAT, pa.int32()), (serving.FILL_POS, pa.int32()),
                        (serving.FILL_SCORE, pa.float32()), (serving.FILL_CAT, pa.int32()), (serving.FILL_SOURCE, pa.string()),
                        (serving.CAT_CODE, pa.int32())]
                       + ([(serving.SHOWN, pa.bool_()), (serving.POPULARITY, pa.float32()),
                           (serving.RECENT_POPULARITY, pa.float32())] if searchable else []))
    put(C.SERVING_ITEMS, rows, schema)
    put(C.ITEM_FACTORS, pd.DataFrame({C.ITEM_IDX: factors.item_idx.astype(np.int32), C.FEATURES: list(factors.vectors)}),
        pa.schema([(C.ITEM_IDX, pa.int32()), (C.FEATURES, pa.list_(pa.float32()))]))
    details = {"model_version": run_id, "serving": serving.plan_settings(plan)}
    if searchable:
        shown = rows[rows[serving.SHOWN].astype(bool)]
        docs = pd.DataFrame({"item_idx": shown[C.ITEM_IDX].astype("int64"), "item_id": shown[C.ITEM_ID],
                             "name": shown[C.ITEM_NAME], "category": shown[C.CATEGORY]})
        details["search_index"] = search.build(wh / "_search", docs, SearchConfig()).record()
    run = pa.table({
        C.RUN_ID: [run_id], "stage": ["recommend"], "status": ["succeeded"],
        "finished_at": pa.array([datetime.now(timezone.utc)], pa.timestamp("us", tz="UTC")),
        "input_versions": pa.array([[(C.ITEM_FACTORS, versions[C.ITEM_FACTORS])]], pa.map_(pa.string(), pa.int64())),
        "output_versions": pa.array([[(k, versions[k]) for k in (C.RECOMMENDATIONS, C.SIMILAR_ITEMS, C.SERVING_ITEMS)]],
                                    pa.map_(pa.string(), pa.int64())),
        "details": [json.dumps(details)],
    })
    write_deltalake(str(wh / C.RUNS), run, mode="append")


def config(wh: Path, **serve) -> object:
    return from_dict({
        "warehouse": str(wh),
        "source": {"path": str(wh / "in"), "format": "json",
                   "columns": {"user_id": "user_id", "item_id": "item_id", "timestamp": "timestamp", "event_type": "event_type"}},
        "stream": {"source": {"kind": "files", "path": str(wh / "incoming")}},
        "serve": {"max_n": 50, "max_key_length": 64, "max_body_bytes": 4096, "max_events_per_call": 3, **serve},
    })


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory):
    wh = tmp_path_factory.mktemp("servewh")
    plan, factors = make_plan()
    write_run(wh, "20261201T000000Z-aaaaaaaa", published_rows({"alice": "alice", "bob": "bob"}), plan, factors)
    return wh


@pytest.fixture(scope="module")
def client(warehouse):
    app = create_app(config(warehouse), token=TOKEN)
    with TestClient(app) as c:
        yield c


def test_the_plan_written_for_serving_is_the_plan_read_back():
    plan, factors = make_plan()
    back = serving.plan_of(serving.plan_rows(plan), serving.plan_settings(plan), factors)
    np.testing.assert_array_equal(back.items.item_idx, plan.items.item_idx)
    np.testing.assert_array_equal(back.items.vectors, plan.items.vectors)
    np.testing.assert_array_equal(back.items.category, plan.items.category)
    for f in ("item_idx", "score", "category", "source"):
        np.testing.assert_array_equal(getattr(back.seq, f), getattr(plan.seq, f))
    assert back.seq.sources == plan.seq.sources
    np.testing.assert_array_equal(back.unit.vectors, plan.unit.vectors)
    np.testing.assert_array_equal(back.catalogue.item_id, plan.catalogue.item_id)
    # And the lists it makes are the same, warm and cold.
    users = pd.DataFrame({C.USER_IDX: [0, 1], C.USER_ID: ["u0", "u1"], C.FEATURES: [np.array([1.0, 0.2], np.float32), None],
                          "_excluded": [[0], [5]], "_hist": [[0], [5]], "_hist_type": [[3], [0]]})
    pd.testing.assert_frame_equal(block.lists(users, back), block.lists(users, plan))


def test_a_published_list_is_served_row_for_row_and_names_its_items(client):
    got = client.get("/v1/users/alice/recommendations", headers=AUTH).json()
    assert got["list"] == "published" and got["run_id"] == "20261201T000000Z-aaaaaaaa"
    assert [(r["item_id"], r["rank"], r["name"]) for r in got["items"]] == [
        ("sku0", 1, NAMES[0]), ("sku1", 2, NAMES[1]), ("sku4", 3, NAMES[4])]
    assert [r["item_id"] for r in client.get("/v1/users/bob/recommendations?n=2", headers=AUTH).json()["items"]] == ["sku2", "sku3"]


def test_a_stranger_gets_the_cold_start_list_never_a_404(client):
    got = client.get("/v1/users/someone-new/recommendations?n=4", headers=AUTH)
    assert got.status_code == 200
    body = got.json()
    assert body["list"] == "cold_start"
    # The fallback sequence by popularity: 5, 4, 3, 2 (6 is unavailable and never listed).
    assert [r["item_id"] for r in body["items"]] == ["sku5", "sku4", "sku3", "sku2"]
    assert {r["source"] for r in body["items"]} == {"popular"}


def test_a_category_list_is_scored_for_that_category(client):
    got = client.get("/v1/users/someone-new/recommendations?n=2&category=b", headers=AUTH).json()
    # the fallback sequence cut to category b: 5, then 3 (4 is in a; 6 is not allowed)
    assert got["category"] == "b" and [r["item_id"] for r in got["items"]] == ["sku5", "sku3"]
    bad = client.get("/v1/users/alice/recommendations?category=zzz", headers=AUTH)
    assert bad.status_code == 422 and bad.json()["error"]["where"] == ["query", "category"]


def test_similar_items_and_an_unknown_item(client):
    got = client.get("/v1/items/sku0/similar", headers=AUTH).json()
    assert [(r["item_id"], r["rank"]) for r in got["items"]] == [("sku1", 1), ("sku5", 2)]
    assert got["items"][0]["name"] == NAMES[1]
    assert client.get("/v1/items/sku7/similar", headers=AUTH).json()["items"] == []  # known, no factors
    missing = client.get("/v1/items/nope/similar", headers=AUTH)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_item"


@pytest.mark.parametrize("path, status, where", [
    ("/v1/users/alice/recommendations?n=0", 422, ["query", "n"]),
    ("/v1/users/alice/recommendations?n=51", 422, ["query", "n"]),
    ("/v1/users/alice/recommendations?n=ten", 422, ["query", "n"]),
    ("/v1/users/" + "x" * 65 + "/recommendations", 422, ["path", "customer"]),
    ("/v1/items/" + "y" * 65 + "/similar", 422, ["path", "item"]),
])
def test_limits_are_refused_naming_the_field(client, path, status, where):
    got = client.get(path, headers=AUTH)
    assert got.status_code == status
    assert got.json()["error"]["where"] == where


def test_auth_401_without_saying_why_and_probes_are_open(client):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        got = client.get("/v1/users/alice/recommendations", headers=headers)
        assert got.status_code == 401
        assert got.json() == {"error": {"code": "unauthorized", "message": "a valid bearer token is required"}}
    assert client.get("/metrics").status_code == 401
    assert client.get("/healthz").json() == {"status": "alive"}
    assert client.get("/readyz").json()["ready"] is True


def test_events_are_checked_then_written_where_the_file_stream_reads(client, warehouse):
    ok = {"user_id": "carol", "item_id": "sku3", "event_type": "purchase", "timestamp": "2026-12-06T10:00:00Z"}
    assert client.post("/v1/events", json=ok, headers=AUTH).json() == {"accepted": 1}
    assert client.post("/v1/events", json=[ok, {**ok, "event_type": "view"}], headers=AUTH).json() == {"accepted": 2}
    files = sorted((warehouse / "incoming").glob("serve-*.json"))
    written = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert written == [ok, ok, {**ok, "event_type": "view"}]
    assert not list((warehouse / "incoming").glob(".*"))  # no half-written file left behind

    def refused(body, where, status=422):
        got = client.post("/v1/events", json=body, headers=AUTH)
        assert got.status_code == status, got.text
        assert got.json()["error"].get("where") == where
        return got.json()["error"]["message"]

    assert "required" in refused([ok, {**ok, "item_id": " "}], ["body", 1, "item_id"])
    assert "not one of" in refused({**ok, "event_type": "teleport"}, ["body", 0, "event_type"])
    assert "ISO-8601" in refused({**ok, "timestamp": "yesterday"}, ["body", 0, "timestamp"])
    assert "text or a number" in refused({**ok, "user_id": {"a": 1}}, ["body", 0, "user_id"])
    assert "max_key_length" in refused({**ok, "user_id": "u" * 65}, ["body", 0, "user_id"])
    assert "expected an object" in refused([ok, 5], ["body", 1])
    refused([ok] * 4, None, 413)
    assert client.post("/v1/events", content=b"{not json", headers={**AUTH, "Content-Type": "application/json"}).status_code == 422
    assert client.post("/v1/events", content=b"x" * 5000, headers=AUTH).status_code == 413
    # Nothing refused was written.
    assert sorted((warehouse / "incoming").glob("serve-*.json")) == files


def test_metrics_name_the_model_and_count_requests(client):
    client.get("/v1/users/alice/recommendations", headers=AUTH)
    text = client.get("/metrics", headers=AUTH).text
    assert 'sparkrec_model_info{model_version="20261201T000000Z-aaaaaaaa"' in text
    assert "sparkrec_customers_held 2.0" in text
    assert 'sparkrec_request_seconds_count{route="/v1/users/{customer}/recommendations",status="200"}' in text


def test_a_new_run_is_swapped_in_while_requests_keep_succeeding(tmp_path):
    plan, factors = make_plan()
    write_run(tmp_path, "20261201T000000Z-aaaaaaaa", published_rows({"alice": "alice", "bob": "bob"}), plan, factors)
    st = state_.State(config(tmp_path))
    app = create_app(st.cfg, st, start_loader=False, token=None)
    assert st.refresh() is True
    statuses, stop = [], threading.Event()
    with TestClient(app) as c:
        def hammer():
            while not stop.is_set():
                statuses.append(c.get("/v1/users/alice/recommendations").status_code)

        t = threading.Thread(target=hammer)
        t.start()
        write_run(tmp_path, "20261202T000000Z-bbbbbbbb", published_rows({"bob": "bob", "alice": "alice"}).iloc[::-1], plan, factors)
        assert st.refresh() is True
        assert st.refresh() is False  # nothing newer
        stop.set()
        t.join()
        got = c.get("/v1/users/alice/recommendations").json()
    assert set(statuses) == {200} and len(statuses) > 0
    assert got["run_id"] == "20261202T000000Z-bbbbbbbb"
    assert [r["item_id"] for r in got["items"]] == ["sku2", "sku3", "sku5"]  # the second run gave alice bob's old list


def test_not_ready_without_published_lists_then_ready(tmp_path):
    st = state_.State(config(tmp_path))
    app = create_app(st.cfg, st, start_loader=False)
    with TestClient(app) as c:
        st.refresh()
        ready = c.get("/readyz")
        assert ready.status_code == 503 and "sparkrec run" in ready.json()["problem"]
        assert c.get("/v1/users/alice/recommendations").status_code == 503


def test_pseudonymised_warehouse_is_looked_up_by_the_key_the_shop_knows(tmp_path, monkeypatch):
    secret = b"0123456789abcdef-secret"
    plan, factors = make_plan()
    write_run(tmp_path, "20261201T000000Z-aaaaaaaa", published_rows({"alice": pseudonyms.pseudonym(secret, "alice"),
                                                                     "bob": pseudonyms.pseudonym(secret, "bob")}), plan, factors)
    monkeypatch.setenv("SPARKREC_PSEUDONYM_SECRET", secret.decode())
    cfg = from_dict({**config(tmp_path).as_dict(), "privacy": {"pseudonymize_user_ids": True}})
    with TestClient(create_app(cfg, token=None)) as c:
        got = c.get("/v1/users/%20alice%20/recommendations").json()
    assert got["list"] == "published" and got["items"][0]["item_id"] == "sku0"


def test_a_token_is_required_off_loopback(tmp_path, monkeypatch):
    monkeypatch.delenv("SPARKREC_SERVE_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="no token"):
        load_token(config(tmp_path, host="0.0.0.0"))
    assert load_token(config(tmp_path)) is None
    (tmp_path / "token").write_text(TOKEN + "\n")
    assert load_token(config(tmp_path, host="0.0.0.0", token_file=str(tmp_path / "token"))) == TOKEN


def test_the_server_imports_no_spark():
    code = "import sys, sparkrec.serve.app; print(sorted(m for m in ('pyspark', 'py4j', 'delta') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def api_schema(warehouse):
    import schemathesis

    cfg = config(warehouse, events_dir=str(warehouse / "fuzzed-events"))  # not the directory the events test reads
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(cfg, token=TOKEN, start_loader=False,
                                                                       state=loaded_state(warehouse)))


def loaded_state(wh: Path) -> state_.State:
    st = state_.State(config(wh))
    assert st.refresh()
    return st


FUZZ_EXAMPLES = 100


def test_fuzzing_every_route_from_the_openapi_schema_gives_no_5xx(api_schema):
    """schemathesis generates requests from the served OpenAPI schema, hypothesis drives them (schemathesis's own
    pytest plugin does not load under pytest 9): every route, valid and invalid input, never a 5xx."""
    counts: dict[str, int] = {}
    for result, mode in itertools.product(list(api_schema.get_all_operations()), list(schemathesis.GenerationMode)):
        op = result.ok()

        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case):
            counts[f"{op.label} ({mode.value})"] = counts.get(f"{op.label} ({mode.value})", 0) + 1
            response = case.call(headers={**AUTH, **(case.headers or {})})
            assert response.status_code < 500, f"{op.label}: {response.status_code} {response.text[:300]}"

        try:
            run()
        except Unsatisfiable:  # no invalid request exists for a route without parameters (/healthz)
            assert mode is schemathesis.GenerationMode.NEGATIVE
    print(f"schemathesis: {sum(counts.values())} cases: {counts}")
    for route in ("GET /v1/users/{customer}/recommendations", "GET /v1/items/{item}/similar", "POST /v1/events",
                  "GET /v1/search"):
        assert counts[f"{route} (positive)"] >= FUZZ_EXAMPLES // 2 and counts[f"{route} (negative)"] >= FUZZ_EXAMPLES // 2


def test_an_erasure_recorded_after_the_run_drops_the_customer_from_what_the_server_holds(tmp_path):
    plan, factors = make_plan()
    write_run(tmp_path, "20261201T000000Z-aaaaaaaa", published_rows({"alice": "alice", "bob": "bob"}), plan, factors)
    st = state_.State(config(tmp_path))
    assert st.refresh()
    assert st.apply_erasures(st.snapshot) == 0  # no erasures table yet
    write_deltalake(str(tmp_path / C.ERASURES), pa.table({
        "erased_at": pa.array([datetime.now(timezone.utc)], pa.timestamp("us", tz="UTC")),
        "user_hashes": pa.array([[pseudonyms.user_hash("alice")]], pa.list_(pa.string()))}))
    with TestClient(create_app(st.cfg, st, start_loader=False)) as c:
        assert st.apply_erasures(st.snapshot) == 1
        assert c.get("/v1/users/alice/recommendations").json()["list"] == "cold_start"
        assert c.get("/v1/users/bob/recommendations").json()["list"] == "published"
    codes, values = st.snapshot.lists.columns[C.ITEM_ID]
    assert set(values[codes[:3]]) == {None}  # alice's rows (the first three, sorted) are blanked, not only hidden
    assert st.apply_erasures(st.snapshot) == 0  # applied once
    # An event of hers that arrived before the erasure (a restarted server reading the topic again) is not folded
    # in; one after it starts a new history.
    erased = st.live.erasures[pseudonyms.user_hash("alice")]
    event = {"user_id": "alice", "item_id": "sku2", "event_type": "view", "timestamp": "2026-12-01T10:00:00Z"}
    st.live.add([(event, erased - 60)], st.snapshot)
    assert st.live.rejected["erased"] == 1 and "alice" not in st.live.events
    st.live.add([(event, erased + 1)], st.snapshot)
    assert "alice" in st.live.lists


def test_the_retail_presets_non_product_patterns_refuse_live_lines_as_the_clean_does():
    """Its patterns carry inline flags ("(?i)POST"), which Python refuses inside one joined alternation: every
    live event of the Online Retail preset failed before they were matched one at a time."""
    from sparkrec.core import events
    from sparkrec.core.config import load_config

    cfg = load_config(ROOT / "conf" / "online_retail.yaml")
    line = {"Invoice": "WEB1", "Customer ID": "12346", "StockCode": "post", "InvoiceDate": "2010-12-01 10:00:00",
            "Quantity": 1, "Price": 1.0}
    now = datetime.now(timezone.utc)
    assert events.accept(line, cfg.source, cfg.clean, now) == (None, "non_product_item")
    kept, reason = events.accept({**line, "StockCode": "22784"}, cfg.source, cfg.clean, now)
    assert reason is None and kept.item_id == "22784"
