"""`GET /v1/search`: a query's text matches, ordered for the customer who typed it.

The index is the version the snapshot's recommend run recorded (`core.search`);
the popularities and what the rules allow come from the same run's
`serving_items`, so a search never shows an item the lists would refuse. A
customer's model score is their live factor: the published pairs plus the
events since the horizon, folded in as the lists are (`live.row_for`), so a
purchase a second ago already counts.

Memory: the opened index (tantivy maps its files; the catalogue's text, a few
hundred bytes an item) and three numbers an item.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sparkrec.core import block, search, serving
from sparkrec.core import columns as C
from sparkrec.core.config import Config
from sparkrec.core.recnames import EXCLUDED

log = logging.getLogger(__name__)

SOURCE_TEXT = "search"  # ranked by text and popularity
SOURCE_PERSONAL = "search_personal"  # and by the customer's model score


@dataclass
class Searchable:
    """What a search reads besides the query: the index and, per catalogue position, its ranking inputs."""

    index: search.Index
    shown: np.ndarray  # bool: the rules allow the item
    popularity: np.ndarray  # 0..1 (log scale)
    recent: np.ndarray  # 0..1 (log scale)


def load(cfg: Config, run: dict[str, Any], rows: pd.DataFrame, catalogue: block.Catalogue,
         previous: Searchable | None = None) -> tuple[Searchable | None, str | None]:
    """The run's index and ranking inputs aligned with `catalogue`, or why search cannot answer for this run.

    An index already open with the same digest (`previous`) is kept rather than opened again.
    """
    if not cfg.search.enabled:
        return None, "search is off (search.enabled: false)"
    recorded = run["details"].get("search_index")
    if not recorded or "path" not in recorded:
        why = (recorded or {}).get("skipped") or (
            f"run {run[C.RUN_ID]} wrote no search index (sparkrec before search, or search was off): "
            "run `sparkrec run` (or `sparkrec recommend`) once more")
        return None, why
    if serving.SHOWN not in rows or rows[serving.SHOWN].isna().all():
        return None, f"run {run[C.RUN_ID]}'s serving_items has no search columns: run the batch once more"
    if previous is not None and previous.index.digest == recorded["digest"]:
        index = previous.index
    else:
        try:
            index = search.Index(Path(recorded["path"]))
        except (OSError, ValueError) as exc:
            return None, f"the search index of run {run[C.RUN_ID]} cannot be opened: {exc}"
    by = rows.set_index(C.ITEM_IDX).reindex(catalogue.item_idx)
    shown = by[serving.SHOWN].fillna(False).to_numpy(dtype=bool)
    pop = search.log_scaled(by[serving.POPULARITY].fillna(0).to_numpy(dtype=np.float64))
    recent = search.log_scaled(by[serving.RECENT_POPULARITY].fillna(0).to_numpy(dtype=np.float64))
    return Searchable(index, shown, pop.astype(np.float32), recent.astype(np.float32)), None


def matches(snap, q: str, category: str | None, limit: int) -> tuple[np.ndarray, search.Found]:
    """(catalogue positions, the matches) of the query that the rules allow, in the index's order."""
    s: Searchable = snap.searchable
    found = s.index.find(q, limit, category)
    pos, hit = snap.plan.catalogue.at(found.item_idx)
    keep = hit.copy()
    keep[hit] = s.shown[pos[hit]]
    return pos[keep], found.take(keep)


def model_scores(snap, item_idx: np.ndarray, factor: np.ndarray | None) -> np.ndarray | None:
    """The customer's model score for each item (NaN: the item has no factors); None without a factor."""
    if factor is None or snap.model.factors is None:
        return None
    fpos, known = snap.model.positions(item_idx)
    model = np.full(len(item_idx), np.nan)
    if known.any():
        model[known] = snap.model.factors.vectors[fpos[known]] @ np.asarray(factor, dtype=np.float32)
    return model


def ranked(snap, cfg: Config, pos: np.ndarray, found: search.Found, row: dict[str, Any] | None,
           n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, search.Found]:
    """The best `n` of the matches for the customer whose `block.lists` row is `row` (`live.row_for`; None, or a
    row without a factor: the non-personal ranking): the matching rules' tiers first (`search.tiers`), then the
    blend; what they bought is left out when `search.show_purchased` is off.

    Returns (positions, blended scores, model scores or None, the matches kept), best first.
    """
    factor = None if row is None else row.get(C.FEATURES)
    excluded = None
    if row is not None and not cfg.search.show_purchased:
        excluded = np.asarray(row.get(EXCLUDED) or [], dtype=np.int64)
    s: Searchable = snap.searchable
    if excluded is not None and len(excluded):
        keep = ~np.isin(found.item_idx, excluded)
        pos, found = pos[keep], found.take(keep)
    model = model_scores(snap, found.item_idx, factor)
    parts = search.Parts(found.item_idx, found.text, model, s.popularity[pos], s.recent[pos])
    score = search.blend(parts, cfg.search.weights)
    best = search.order(score, found.item_idx, n, search.tiers(found, cfg.search))
    return pos[best], score[best], None if model is None else model[best], found.take(best)


def answer(snap, cfg: Config, q: str, n: int, category: str | None,
           row: dict[str, Any] | None) -> tuple[list[dict[str, Any]], bool]:
    """The results of a query, and whether they were ordered by a model score: `row` is the customer's
    `block.lists` row (`live.row_for`), None without a customer."""
    pos, found = matches(snap, q, category, cfg.search.candidates)
    best, score, model, kept = ranked(snap, cfg, pos, found, row, n)
    cat = snap.plan.catalogue
    source = SOURCE_PERSONAL if model is not None else SOURCE_TEXT
    share = kept.matched / max(1, len(kept.words))
    return [{"rank": r + 1, "item_id": cat.item_id[p], "name": cat.name[p], "category": cat.category[p],
             "score": round(float(score[r]), 6), "text_score": round(float(kept.text[r]), 6),
             "words_matched": round(float(share[r]), 4), "typos": int(kept.typos[r]), "source": source}
            for r, p in enumerate(best.tolist())], model is not None


def suggest(snap, cfg: Config, q: str, n: int, row: dict[str, Any] | None) -> tuple[list[str], list[dict[str, Any]], bool]:
    """What to offer while `q` is typed: whole queries completing its last word and the best items, both in the
    order the search ranks the matches for the customer (`row`, as in `answer`); the last word is always taken as
    still being typed. Returns (completions, items, whether a model score ordered them)."""
    pos, found = matches(snap, q.rstrip(), None, cfg.search.candidates)
    best, _, model, kept = ranked(snap, cfg, pos, found, row, len(pos))
    words = snap.searchable.index.completions(kept, n)
    cat = snap.plan.catalogue
    items = [{"rank": r + 1, "item_id": cat.item_id[p], "name": cat.name[p], "category": cat.category[p]}
             for r, p in enumerate(best[:n].tolist())]
    return words, items, model is not None
