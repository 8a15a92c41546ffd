"""Product search without a JVM: the index (tantivy), the blend, and `GET /v1/search` on a hand-written warehouse.

The warehouse is `test_serve_api`'s (eight items, the same plan code as the
batch), plus interactions for two customers, so the personal ranking has real
folded-in factors: dave bought red-and-blue things (items 0 and 1, factors near
[1, 0]); the most popular bag is item 5. What each ranking must put first is
worked out from those rows, not from what the code returns.
"""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from deltalake import write_deltalake
from fastapi.testclient import TestClient
from test_serve_api import AUTH, TOKEN, config, make_plan, published_rows, write_run

from sparkrec.core import columns as C
from sparkrec.core import search
from sparkrec.core.config import SearchConfig, SearchWeights, from_dict
from sparkrec.serve import state as state_
from sparkrec.serve.app import create_app

pytestmark = pytest.mark.nojvm

RUN = "20261201T000000Z-aaaaaaaa"


def docs(names: list[str], categories: list[str | None] | None = None) -> pd.DataFrame:
    return pd.DataFrame({"item_idx": np.arange(len(names)), "item_id": [f"sku{i}" for i in range(len(names))],
                         "name": names, "category": categories or [None] * len(names)})


def test_an_index_version_is_reused_until_its_documents_change_and_old_versions_are_pruned(tmp_path):
    cfg = SearchConfig(keep_versions=2)
    first = search.build(tmp_path, docs(["Red bag", "Blue lamp"]), cfg)
    assert not first.reused and first.documents == 2
    again = search.build(tmp_path, docs(["Red bag", "Blue lamp"]), cfg)
    assert again.reused and again.path == first.path
    renamed = search.build(tmp_path, docs(["Red bag", "Blue lantern"]), cfg)
    assert not renamed.reused and renamed.digest != first.digest
    third = search.build(tmp_path, docs(["Red bag", "Blue lantern", "Tin"]), cfg)
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert kept == sorted([renamed.digest, third.digest])  # keep_versions=2: the oldest went
    # A changed analysis (no stemming) is a new version too: the settings are part of the digest.
    assert search.build(tmp_path, docs(["Red bag", "Blue lantern", "Tin"]), SearchConfig(stemmer="none")).digest != third.digest


def test_queries_are_plain_words_whatever_syntax_they_hold(tmp_path):
    built = search.build(tmp_path, docs(["Red bags for the café", "JUMBO BAG RED RETROSPOT", "Blue lamp", "name tag"],
                                        ["bags", "bags", "lamps", None]), SearchConfig())
    ix = search.Index(built.path)

    def found(q, category=None):
        return sorted(ix.match(q, 10, category)[0].tolist())

    assert found("bag") == [0, 1]  # stemmed: "bags" and "BAG" both match
    assert found("cafe") == [0]  # folded: "café"
    assert found("name:bag") == [0, 1, 3]  # a field prefix is two words, not syntax
    assert found('"red bag') == [0, 1] and found("bag*") == [0, 1] and found("bag AND NOT lamp") == [0, 1, 2]
    assert found("sku2") == [2]  # the item key, exactly (case-insensitive)
    assert found("") == [] and found("!!! ((( ") == []
    assert found("lamp", category="bags") == [] and found("bag", category="bags") == [0, 1]
    assert found("x" * 10_000) == []  # longer than any token: nothing, no error


def test_the_blend_scales_each_part_and_a_missing_model_score_leaves_the_non_personal_order():
    parts = search.Parts(np.array([10, 11, 12]), np.array([2.0, 2.0, 1.0], dtype=np.float32), None,
                         np.array([0.1, 0.9, 1.0]), np.array([0.0, 0.0, 0.0]))
    w = SearchWeights(text=1.0, model=1.0, popularity=1.0, recent=0.0)
    # text / best: 1, 1, 0.5; plus popularity: 1.1, 1.9, 1.5
    np.testing.assert_allclose(search.blend(parts, w), [1.1, 1.9, 1.5])
    personal = search.Parts(parts.item_idx, parts.text, np.array([3.0, -1.0, np.nan]), parts.popularity, parts.recent)
    # model min-max over the known scores: 1, 0, unknown 0
    np.testing.assert_allclose(search.blend(personal, w), [2.1, 1.9, 1.5])
    assert search.order(search.blend(personal, w), personal.item_idx, 2).tolist() == [0, 1]


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """The served warehouse with interactions: dave viewed items 0 and 1 and bought item 1."""
    wh = tmp_path_factory.mktemp("searchwh")
    write_deltalake(str(wh / C.INTERACTIONS), pa.table({
        C.USER_ID: ["dave", "dave", "dave"], C.ITEM_ID: ["sku0", "sku1", "sku1"],
        C.EVENT_TYPE: ["view", "view", "purchase"],
        C.EVENT_TS: pa.array([datetime(2026, 11, 30, h, tzinfo=timezone.utc) for h in (9, 10, 11)], pa.timestamp("us", tz="UTC")),
        C.RATING: pa.array([None, None, None], pa.float64())}))
    plan, factors = make_plan()
    write_run(wh, RUN, published_rows({"alice": "alice", "bob": "bob"}), plan, factors)
    return wh


# The mechanism under test, not the tuned defaults: each part weighs enough to decide the orders worked out below.
WEIGHTS = {"text": 1.0, "model": 1.0, "popularity": 0.5, "recent": 0.5}


def client_for(wh, **search_cfg):
    cfg = from_dict({**config(wh).as_dict(), "search": {"weights": WEIGHTS, **search_cfg}})
    st = state_.State(cfg)
    assert st.refresh()
    return st, TestClient(create_app(cfg, st, start_loader=False, token=TOKEN))


@pytest.fixture(scope="module")
def served(shop):
    st, c = client_for(shop)
    with c:
        yield st, c


def ids(body) -> list[str]:
    return [r["item_id"] for r in body["items"]]


def test_search_orders_matches_for_the_customer_and_never_shows_what_the_rules_refuse(served):
    st, c = served
    anyone = c.get("/v1/search", params={"q": "bag", "n": 10}, headers=AUTH).json()
    # bags: items 0, 1, 5, 7 (6 is unavailable), three-word names each (equal text scores). For anyone: by
    # popularity, 5 (70) then 1 (30), 0 (20), 7 (10).
    assert ids(anyone) == ["sku5", "sku1", "sku0", "sku7"] and not anyone["personalized"]
    assert {r["source"] for r in anyone["items"]} == {"search"}
    dave = c.get("/v1/search", params={"q": "bag", "customer": "dave", "n": 10}, headers=AUTH).json()
    # dave's factor points at items 0 and 1 ([1, 0] and [0.9, 0.1]): they lead; what he bought stays (default).
    assert dave["personalized"] and ids(dave)[:2] == ["sku0", "sku1"] and "sku1" in ids(dave)
    assert dave["as_of"].startswith("2026-11-30T11:00:00")
    stranger = c.get("/v1/search", params={"q": "bag", "customer": "nobody-knows-me", "n": 10}, headers=AUTH).json()
    assert ids(stranger) == ids(anyone) and not stranger["personalized"]
    assert ids(c.get("/v1/search", params={"q": "bag", "n": 2}, headers=AUTH).json()) == ["sku5", "sku1"]
    assert ids(c.get("/v1/search", params={"q": "red", "category": "a"}, headers=AUTH).json()) == ["sku0"]
    assert ids(c.get("/v1/search", params={"q": "withdrawn"}, headers=AUTH).json()) == []  # item 6 only


def test_a_customer_s_new_events_reorder_their_search_at_once(served):
    st, c = served
    # "heart": items 0, 1 and 4, three-word names each (equal text scores).
    before = c.get("/v1/search", params={"q": "heart", "customer": "erin"}, headers=AUTH).json()
    assert not before["personalized"] and ids(before) == ["sku4", "sku1", "sku0"]  # by popularity: 60, 30, 20
    event = {"user_id": "erin", "item_id": "sku0", "event_type": "view", "timestamp": "2026-12-01T10:00:00Z"}
    st.live.add([(event, datetime.now(timezone.utc).timestamp())], st.snapshot)
    after = c.get("/v1/search", params={"q": "heart", "customer": "erin"}, headers=AUTH).json()
    # her factor points at item 0 ([1, 0]): 0 (model 1), 1 (0.9), 4 (0.5)
    assert after["personalized"] and ids(after) == ["sku0", "sku1", "sku4"]


def test_show_purchased_false_hides_what_the_customer_bought(shop):
    _, c = client_for(shop, show_purchased=False)
    with c:
        assert "sku1" not in ids(c.get("/v1/search", params={"q": "bag", "customer": "dave", "n": 10}, headers=AUTH).json())


@pytest.mark.parametrize("params, status, code", [
    ({"q": ""}, 422, "invalid"),
    ({"q": "   "}, 422, "invalid"),
    ({"q": "x" * 201}, 422, "invalid"),
    ({"q": "bag", "category": "nope"}, 422, "unknown_category"),
    ({"q": "bag", "n": 0}, 422, "invalid"),
    ({}, 422, "invalid"),
])
def test_bad_queries_are_refused_naming_the_field(served, params, status, code):
    r = served[1].get("/v1/search", params=params, headers=AUTH)
    assert r.status_code == status and r.json()["error"]["code"] == code


def test_search_needs_the_token(served):
    assert served[1].get("/v1/search", params={"q": "bag"}).status_code == 401


def test_a_run_without_an_index_answers_503_saying_what_to_do(tmp_path):
    plan, factors = make_plan()
    write_run(tmp_path, RUN, published_rows({"alice": "alice", "bob": "bob"}), plan, factors, searchable=False)
    _, c = client_for(tmp_path)
    with c:
        r = c.get("/v1/search", params={"q": "bag"}, headers=AUTH)
        assert r.status_code == 503 and "run `sparkrec run`" in r.json()["error"]["message"]
        assert c.get("/readyz").json()["search"].startswith("unavailable")
        assert c.get("/v1/users/alice/recommendations", headers=AUTH).status_code == 200  # the lists still serve


def test_the_route_puts_more_words_first_and_says_how_each_result_matched(served):
    _, c = served
    # "red bag": only item 0 holds both words (6 is unavailable); the popular bag (5) and the red lamp follow.
    body = c.get("/v1/search", params={"q": "red bag", "n": 10}, headers=AUTH).json()
    assert ids(body)[0] == "sku0" and body["items"][0]["words_matched"] == 1.0
    assert [r["words_matched"] for r in body["items"][1:]] == [0.5] * (len(body["items"]) - 1)
    assert {"sku5", "sku3"} <= set(ids(body))
    typo = c.get("/v1/search", params={"q": "haert"}, headers=AUTH).json()  # a transposition: one edit
    assert sorted(ids(typo)) == ["sku0", "sku1", "sku4"] and {r["typos"] for r in typo["items"]} == {1}
    assert ids(c.get("/v1/search", params={"q": "retro"}, headers=AUTH).json()) == ["sku5"]  # still typing
    assert ids(c.get("/v1/search", params={"q": "sku7"}, headers=AUTH).json())[0] == "sku7"  # the key


def test_suggestions_complete_the_last_word_in_the_order_the_search_ranks_for_the_customer(served, shop):
    st, c = served
    # 'r' completes to 'red' (items 0, 3) and 'retrospot' (item 5, the most popular and the rarer word).
    anyone = c.get("/v1/suggest", params={"q": "r", "n": 3}, headers=AUTH).json()
    assert anyone["completions"] == ["retrospot", "red"] and not anyone["personalized"]
    assert [r["item_id"] for r in anyone["items"]][0] == "sku5" and len(anyone["items"]) == 3
    # dave's factor points at items 0 and 1: with the model weighing enough, item 0 ('Red heart bag') leads his
    # ranking (model 1 against item 5's 0.65 after scaling), so 'red' comes first.
    _, personal = client_for(shop, weights={**WEIGHTS, "model": 4.0})
    with personal:
        dave = personal.get("/v1/suggest", params={"q": "r", "customer": "dave"}, headers=AUTH).json()
        assert dave["personalized"] and dave["completions"] == ["red", "retrospot"]
        assert [r["item_id"] for r in dave["items"]][0] == "sku0"
    # The earlier words stay as typed; the words held first: 'red' and 'heart' are both in item 0.
    assert c.get("/v1/suggest", params={"q": "red he"}, headers=AUTH).json()["completions"] == ["red heart"]
    # A typo still suggests the word meant; nothing matching gives empty lists, not an error.
    assert c.get("/v1/suggest", params={"q": "hearth"}, headers=AUTH).json()["completions"][:1] == ["heart"]
    none = c.get("/v1/suggest", params={"q": "zzzz"}, headers=AUTH).json()
    assert none["completions"] == [] and none["items"] == []
    for bad in ({"q": " "}, {"q": "b", "n": 0}, {"q": "b", "n": 21}, {"q": "x" * 201}):
        r = c.get("/v1/suggest", params=bad, headers=AUTH)
        assert r.status_code == 422 and r.json()["error"]["where"][0] == "query"
    assert c.get("/v1/suggest", params={"q": "b"}).status_code == 401


@pytest.mark.parametrize("q, status", [
    ("name:bag* AND (red OR \"blue\")~2^3", 200),  # tantivy's syntax is plain words here
    ("x" * 10_000, 422),  # longer than search.max_query_length
    ("café ☕ 赤い bag", 200), ("\u0000bag", 200), ("💡", 200), ("b", 200), ("a b c d e f g h i j k l m", 200),
    ("haert lmap bga", 200),  # typos only
    ("bag " * 50, 200),  # 200 characters, one word repeated
])
@pytest.mark.parametrize("route", ["/v1/search", "/v1/suggest"])
def test_odd_queries_get_an_answer_or_a_clear_refusal_never_a_server_error(served, route, q, status):
    r = served[1].get(route, params={"q": q, "customer": "dave"}, headers=AUTH)
    assert r.status_code == status, r.text
    if status == 422:
        assert r.json()["error"]["where"] == ["query", "q"]
