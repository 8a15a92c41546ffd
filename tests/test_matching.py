"""Search's matching rules with real queries on a real catalogue: Online Retail II's item names, indexed by `core.search`.

No JVM: the index is built from the shared file's distinct (stock code,
description) pairs with pandas, as the recommend stage builds it from the
catalogue. The queries are the ones a new user tried and found wanting
(issue 40): a typo, a word still being typed, two words of which an item holds
one, 'xmas' against 'christmas', an item key.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import SHARED_RETAIL as RETAIL_PARQUET

from sparkrec.core import matching, search
from sparkrec.core.config import SearchConfig, from_dict

pytestmark = pytest.mark.nojvm


@pytest.fixture(scope="module")
def retail_docs() -> pd.DataFrame:
    if not RETAIL_PARQUET.exists():
        pytest.skip(f"{RETAIL_PARQUET} is not here")
    raw = pd.read_parquet(RETAIL_PARQUET, columns=["StockCode", "Description"]).dropna()
    raw = raw.assign(StockCode=raw["StockCode"].astype(str)).drop_duplicates("StockCode").sort_values("StockCode")
    return pd.DataFrame({"item_idx": np.arange(len(raw)), "item_id": raw["StockCode"].to_numpy(),
                         "name": raw["Description"].to_numpy(), "category": None})


@pytest.fixture(scope="module")
def synonyms_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("syn") / "synonyms.txt"
    path.write_text("# the shop's own words\nxmas, christmas\n\nmug, cup  # either\n")
    return path


@pytest.fixture(scope="module")
def retail(retail_docs, synonyms_file, tmp_path_factory):
    cfg = SearchConfig(synonyms=str(synonyms_file))
    return search.Index(search.build(tmp_path_factory.mktemp("retailix"), retail_docs, cfg).path), retail_docs


def names_of(index_docs, found: search.Found, best: np.ndarray) -> list[str]:
    docs = index_docs.set_index("item_idx")["name"]
    return [docs[i].strip().upper() for i in found.item_idx[best].tolist()]


def ranked(ix: search.Index, q: str, n: int = 10, score: np.ndarray | None = None, cfg=SearchConfig()) -> tuple:
    """The matches of `q` as the route orders them with `score` as the blend (default: the text alone)."""
    found = ix.find(q, 1000)
    s = found.text if score is None else score(found)
    return found, search.order(s, found.item_idx, n, search.tiers(found, cfg))


def test_a_typo_finds_the_word_and_is_marked_as_one(retail):
    ix, docs = retail
    found, best = ranked(ix, "lanturn")
    names = names_of(docs, found, best)
    assert len(names) == 10 and all("LANTERN" in n for n in names)
    assert set(found.kinds[best, 0].tolist()) == {matching.TYPO} and (found.typos[best] == 1).all()
    assert len(ix.find("lantxrx ", 10).item_idx) == 0  # 7 letters allow one edit; 'lantern' is two away
    assert len(ix.find("lamp ", 10).item_idx) == 0 or all(k == matching.EXACT for k in ix.find("lamp ", 10).kinds[:, 0])


def test_two_edits_from_nine_letters_a_transposition_counting_one(retail):
    ix, docs = retail
    for q in ("decorxtixn ", "decoartion "):  # two substitutions; one transposition
        found, best = ranked(ix, q)
        assert len(best) and all("DECORAT" in n for n in names_of(docs, found, best)), q
    assert len(ix.find("decorxtixx ", 10).item_idx) == 0  # three edits


def test_the_last_word_is_a_prefix_while_typing_and_a_word_after_a_blank(retail):
    ix, docs = retail
    found, best = ranked(ix, "lant")
    names = names_of(docs, found, best)
    assert len(names) == 10 and all(any(w.startswith("LANT") for w in n.split()) for n in names)
    assert set(found.kinds[best, 0].tolist()) == {matching.PREFIX}
    assert len(ix.find("lant ", 10).item_idx) == 0  # a blank ends the word: no item has the word 'lant'
    found, best = ranked(ix, "white hangi")  # the prefix is the last word only
    both = names_of(docs, found, best[found.matched[best] == 2])
    assert len(both) >= 3 and all("WHITE" in n and "HANGING" in n for n in both)


def test_items_holding_more_of_the_words_come_first_whatever_else_scores_them(retail):
    ix, docs = retail
    # Popularity that favours items holding one word only: the tiers still put both words first.
    found, best = ranked(ix, "heart holder", 40, score=lambda f: (f.matched == 1).astype(float) * 100 + f.text)
    held = found.matched[best]
    assert held[0] == 2 and (np.diff(held) <= 0).all()
    names = names_of(docs, found, best)
    assert "POPCORN HOLDER" not in names[: int((held == 2).sum())]
    assert any("HEART" in n and "T-LIGHT HOLDER" in n for n in names[: int((held == 2).sum())])
    found, best = ranked(ix, "red bag", 10, score=lambda f: (f.matched == 1).astype(float) * 100)
    assert all("RED" in n and "BAG" in n for n in names_of(docs, found, best))
    # With words_first off the score alone decides (the mechanism is the rule, not the text score).
    found, best = ranked(ix, "red bag", 10, score=lambda f: (f.matched == 1).astype(float) * 100,
                         cfg=SearchConfig(words_first=False))
    assert not all("BAG" in n for n in names_of(docs, found, best))


def test_exact_matches_come_before_typos_holding_as_many_words(retail):
    ix, docs = retail
    # 'candle' is a word of the catalogue; 'candles' its stem's; 'handle' is one edit away.
    found, best = ranked(ix, "candle ", 1000, score=lambda f: (f.kinds[:, 0] == matching.TYPO).astype(float) * 100)
    kinds = found.kinds[best, 0]
    assert matching.TYPO in kinds.tolist() and matching.EXACT in kinds.tolist()
    first_typo = int(np.argmax(kinds == matching.TYPO))
    assert (kinds[:first_typo] == matching.EXACT).all() and (kinds[first_typo:] == matching.TYPO).all()
    assert any("HANDL" in n for n in names_of(docs, found, best[first_typo:]))  # by stem: 'handle' and 'handl'
    assert (found.matched == 1).all()  # every match the index returned holds the word, one way or another


def test_synonyms_find_the_same_items_from_either_word(retail):
    ix, docs = retail
    xmas = set(ix.find("xmas ", 1000).item_idx.tolist())
    christmas = set(ix.find("christmas ", 1000).item_idx.tolist())
    assert xmas == christmas and len(xmas) > 100
    names = set(docs.set_index("item_idx").loc[sorted(xmas), "name"].str.upper())
    assert any("XMAS" in n for n in names) and any("CHRISTMAS" in n for n in names)
    assert set(ix.find("cup ", 1000).item_idx.tolist()) == set(ix.find("mug ", 1000).item_idx.tolist())


def test_an_item_key_typed_exactly_comes_first(retail):
    ix, docs = retail
    for q in ("85123A", "85123a", " 85123A "):
        found, best = ranked(ix, q, 5, score=lambda f: -f.text)  # a score that would put it last
        assert found.item_idx[best[0]] == docs.loc[docs["item_id"] == "85123A", "item_idx"].item()
        assert found.key[best[0]]


def test_typos_and_prefix_can_be_switched_off(retail_docs, tmp_path):
    ix = search.Index(search.build(tmp_path, retail_docs, SearchConfig(
        typos={"enabled": False}, prefix={"enabled": False})).path)
    assert len(ix.find("lanturn", 10).item_idx) == 0 and len(ix.find("lant", 10).item_idx) == 0
    assert len(ix.find("lantern", 10).item_idx) == 10


def test_one_letter_unicode_and_syntax_queries_match_plain_words_without_error(retail):
    ix, _ = retail
    assert len(ix.find("a", 10).item_idx) > 0  # the start of a word
    for q in ("é", "💡", "\u0000", "((( ", "name:bag*", "-", "x" * 10_000, "ß" * 50, " "):
        found = ix.find(q, 10)
        assert found.kinds.shape == (len(found.item_idx), len(found.words))


@pytest.mark.parametrize("text, message", [
    ("xmas\n", "two or more words"),
    ("xmas, father christmas\n", "'father christmas' is not one word"),
])
def test_a_bad_synonyms_file_fails_the_config_naming_the_line(tmp_path, text, message):
    path = tmp_path / "syn.txt"
    path.write_text("# ok\nmug, cup\n" + text)
    with pytest.raises(Exception) as err:
        from_dict({"search": {"synonyms": str(path)}})
    assert message in str(err.value) and "line 3" in str(err.value)
    with pytest.raises(Exception, match="cannot read the synonyms file"):
        from_dict({"search": {"synonyms": str(tmp_path / "missing.txt")}})


def test_a_changed_synonyms_file_is_a_new_index_version(retail_docs, tmp_path):
    syn = tmp_path / "syn.txt"
    syn.write_text("mug, cup\n")
    first = search.build(tmp_path / "ix", retail_docs.head(50), SearchConfig(synonyms=str(syn)))
    syn.write_text("mug, beaker\n")
    assert search.build(tmp_path / "ix", retail_docs.head(50), SearchConfig(synonyms=str(syn))).digest != first.digest
