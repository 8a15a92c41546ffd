"""The recommend stage's plan as a table, and back: what lets a process without Spark list a customer.

The batch builds the bounded parts of its lists once (`block.Plan`: the
candidate matrix with boosts and blend, the fallback sequence, the catalogue),
in Spark, from the rules and the history. A server that re-scores a customer
the moment they act must use exactly those parts, not a second computation of
them that could drift: so the recommend stage writes its plan to the
`serving_items` table (one row per catalogue item, `plan_rows`), records the
plan's scalars in its `runs` row (`plan_settings`), and the server rebuilds the
identical plan from both (`plan_of`). The explanation matrix is not stored:
it is the item factors normalised (`explain_matrix`), and the server reads the
item factors anyway for the fold-in.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from sparkrec.core import block, ranker, topk
from sparkrec.core import columns as C

# serving_items' own columns (besides item_idx, item_id, name, category).
CANDIDATE = "candidate"  # the vector the queries are scored against (boost and blend applied); null: not a candidate
CANDIDATE_CAT = "candidate_cat"  # its category code for the per-category cap
FILL_POS = "fill_pos"  # its place in the fallback sequence (0 first); null: not in it
FILL_SCORE = "fill_score"
FILL_CAT = "fill_cat"
FILL_SOURCE = "fill_source"
CAT_CODE = "category_code"  # the item's category code (-1: none), for the touched categories of a live customer
# What search ranks and filters by (`fallbacks.item_popularity`); absent from tables written before search.
SHOWN = "allowed"  # the shop's rules allow the item (available, not excluded)
POPULARITY = "popularity"  # distinct customers, all history
RECENT_POPULARITY = "recent_popularity"  # distinct customers in the last search.recent_days
SEARCH_SCHEMA = f"{SHOWN} boolean, {POPULARITY} float, {RECENT_POPULARITY} float"
# The ranker's view of each item (`core.ranker.ItemStats`) when the lists were ranked; null otherwise, and absent
# from tables written before the server ranked.
RK_VALUES = "ranker_values"  # `ranker.ITEM_FEATURES`, in that order
RK_RECENT = "ranker_recent"  # place among the recently popular items (0: the most popular); null: not among them
RK_NEIGHBOURS = "ranker_neighbours"  # co-purchase neighbours, strongest first
RK_WEIGHTS = "ranker_weights"  # and their weights
RANKER_SCHEMA = f"{RK_VALUES} array<float>, {RK_RECENT} int, {RK_NEIGHBOURS} array<int>, {RK_WEIGHTS} array<float>"
OPTIONAL_COLUMNS = (SHOWN, POPULARITY, RECENT_POPULARITY, RK_VALUES, RK_RECENT, RK_NEIGHBOURS, RK_WEIGHTS)

SERVING_SCHEMA = (
    f"{C.ITEM_IDX} int, {C.ITEM_ID} string, {C.ITEM_NAME} string, {C.CATEGORY} string, "
    f"{CANDIDATE} array<float>, {CANDIDATE_CAT} int, {FILL_POS} int, {FILL_SCORE} float, {FILL_CAT} int, "
    f"{FILL_SOURCE} string, {CAT_CODE} int, {SEARCH_SCHEMA}, {RANKER_SCHEMA}"
)
SERVING_COLUMNS = tuple(part.split()[0] for part in SERVING_SCHEMA.split(", "))


def explain_matrix(factors: topk.ItemMatrix) -> topk.ItemMatrix:
    """The items that can explain a recommendation: every item factor, normalised (cosine)."""
    return topk.ItemMatrix(factors.item_idx, topk.normalized(factors.vectors))


def plan_settings(plan: block.Plan) -> dict[str, Any]:
    """The plan's scalars, for the recommend stage's `runs` row (JSON)."""
    return {
        "n": plan.n, "cap": plan.cap, "blend_weight": plan.blend_weight, "trending_days": plan.trending_days,
        "whole": plan.whole, "explain": plan.unit is not None, "sources": list(plan.seq.sources),
        "by_category": plan.seq.by_category, "candidates": 0 if plan.items is None else len(plan.items.item_idx),
        "ranker": None if plan.ranker is None else {
            "depth": plan.ranker.depth, "co_half_life_days": plan.ranker.co_half_life_days,
            "features": list(plan.ranker.features), "sources": list(plan.ranker.sources)},
    }


def plan_rows(plan: block.Plan, searched: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per catalogue item (`SERVING_COLUMNS`): its keys, candidate vector and place in the fallbacks.

    `searched` (item_idx, allowed, popularity, recent_popularity) adds what search ranks by; without it those
    columns are null.

    Raises:
        ValueError: the plan has no catalogue (only a keyed plan can be served).
    """
    cat = plan.catalogue
    if cat is None:
        raise ValueError("only a keyed plan (with its catalogue) can be written for serving")
    idx = cat.item_idx
    out = pd.DataFrame({C.ITEM_IDX: idx.astype(np.int32), C.ITEM_ID: cat.item_id, C.ITEM_NAME: cat.name,
                        C.CATEGORY: cat.category})
    vectors = np.full(len(idx), None, dtype=object)
    cand_cat = pd.array([pd.NA] * len(idx), dtype="Int32")
    if plan.items is not None and len(plan.items.item_idx):
        pos, hit = cat.at(plan.items.item_idx)
        if not hit.all():
            raise ValueError(f"{int((~hit).sum())} candidate item(s) are not in the plan's catalogue")
        vectors[pos] = list(plan.items.vectors)
        if plan.items.category is not None:
            cand_cat[pos] = plan.items.category
    out[CANDIDATE], out[CANDIDATE_CAT] = vectors, cand_cat
    seq = plan.seq
    fill_pos, fill_score, fill_cat = (pd.array([pd.NA] * len(idx), dtype=t) for t in ("Int32", "Float32", "Int32"))
    fill_source = np.full(len(idx), None, dtype=object)
    if len(seq):
        pos, hit = cat.at(seq.item_idx)
        if not hit.all():
            raise ValueError(f"{int((~hit).sum())} fallback item(s) are not in the plan's catalogue")
        fill_pos[pos] = np.arange(len(seq), dtype=np.int32)
        fill_score[pos] = seq.score
        fill_cat[pos] = seq.category
        fill_source[pos] = np.asarray(seq.sources, dtype=object)[seq.source]
    out[FILL_POS], out[FILL_SCORE], out[FILL_CAT], out[FILL_SOURCE] = fill_pos, fill_score, fill_cat, fill_source
    out[CAT_CODE] = pd.array(cat.code if cat.code is not None else [pd.NA] * len(idx), dtype="Int32")
    if searched is not None:
        got = searched.set_index(C.ITEM_IDX).reindex(idx)
        out[SHOWN] = got[SHOWN].astype("boolean").array
        out[POPULARITY] = got[POPULARITY].astype("Float32").array
        out[RECENT_POPULARITY] = got[RECENT_POPULARITY].astype("Float32").array
    else:
        out[SHOWN] = pd.array([pd.NA] * len(idx), dtype="boolean")
        out[POPULARITY], out[RECENT_POPULARITY] = (pd.array([pd.NA] * len(idx), dtype="Float32") for _ in range(2))
    for name, values in _ranker_columns(plan, cat).items():
        out[name] = values
    return out


def _ranker_columns(plan: block.Plan, cat: block.Catalogue) -> dict[str, Any]:
    """The plan's `ItemStats` spread over the catalogue's rows (nulls without a ranker)."""
    rows = len(cat.item_idx)
    values, neighbours, weights = (np.full(rows, None, dtype=object) for _ in range(3))
    recent = pd.array([pd.NA] * rows, dtype="Int32")
    st = plan.stats
    if plan.ranker is not None and st is not None and len(st.item_idx):
        pos, hit = cat.at(st.item_idx)
        if not hit.all():
            raise ValueError(f"{int((~hit).sum())} item(s) of the ranker's statistics are not in the plan's catalogue")
        values[pos] = list(st.values)
        neighbours[pos] = [st.nb_item[a:b].astype(np.int32) for a, b in zip(st.nb_ptr[:-1], st.nb_ptr[1:])]
        weights[pos] = [st.nb_weight[a:b] for a, b in zip(st.nb_ptr[:-1], st.nb_ptr[1:])]
        rpos, rhit = cat.at(st.recent)
        if not rhit.all():
            raise ValueError(f"{int((~rhit).sum())} recently popular item(s) are not in the plan's catalogue")
        recent[rpos] = np.arange(len(st.recent), dtype=np.int32)
    return {RK_VALUES: values, RK_RECENT: recent, RK_NEIGHBOURS: neighbours, RK_WEIGHTS: weights}


def stats_of(rows: pd.DataFrame) -> ranker.ItemStats | None:
    """The `ItemStats` `plan_rows` spread over `rows` (sorted by item_idx), or None when they hold none."""
    if RK_VALUES not in rows or not rows[RK_VALUES].notna().any():
        return None
    has = rows[rows[RK_VALUES].notna()]
    ids = has[C.ITEM_IDX].to_numpy(dtype=np.int64)
    values = np.stack(has[RK_VALUES].to_numpy()).astype(np.float32)
    nb = [np.asarray(v if v is not None else [], dtype=np.int64) for v in has[RK_NEIGHBOURS]]
    nw = [np.asarray(v if v is not None else [], dtype=np.float32) for v in has[RK_WEIGHTS]]
    ptr = np.concatenate([[0], np.cumsum([len(v) for v in nb])]).astype(np.int64)
    flat_nb = np.concatenate(nb) if len(nb) else np.zeros(0, np.int64)
    flat_nw = np.concatenate(nw) if len(nw) else np.zeros(0, np.float32)
    ranked = rows[rows[RK_RECENT].notna()].sort_values(RK_RECENT)
    return ranker.ItemStats(ids, values, ranked[C.ITEM_IDX].to_numpy(dtype=np.int64), ptr, flat_nb, flat_nw)


def plan_of(rows: pd.DataFrame, settings: dict[str, Any], factors: topk.ItemMatrix | None,
            ranker_model: str | None = None) -> block.Plan:
    """The plan `plan_rows` and `plan_settings` were written from (the explanations from `factors`).

    Args:
        ranker_model: the LightGBM model the lists were ranked with (a file the run names, read by the caller):
            without it, a plan written with a ranker comes back without one (ALS's own top n).
    """
    rows = rows.sort_values(C.ITEM_IDX, kind="stable").reset_index(drop=True)
    none = lambda col: rows[col].astype(object).where(rows[col].notna(), None).to_numpy()  # noqa: E731
    codes = rows[CAT_CODE] if CAT_CODE in rows else None
    catalogue = block.Catalogue(rows[C.ITEM_IDX].to_numpy(), rows[C.ITEM_ID].to_numpy(), none(C.ITEM_NAME),
                                none(C.CATEGORY),
                                None if codes is None or codes.isna().all() else codes.fillna(-1).to_numpy(dtype=np.int32))
    cand = rows[rows[CANDIDATE].notna()]
    items = None
    if len(cand):
        cats = cand[CANDIDATE_CAT]
        items = topk.ItemMatrix(cand[C.ITEM_IDX].to_numpy(), np.stack(cand[CANDIDATE].to_numpy()).astype(np.float32),
                                None if cats.isna().all() else cats.fillna(-1).to_numpy(dtype=np.int32))
    fills = rows[rows[FILL_POS].notna()].sort_values(FILL_POS)
    sources = tuple(settings["sources"])
    code = np.asarray([sources.index(s) for s in fills[FILL_SOURCE]], dtype=np.int8)
    seq = topk.FillSequence(fills[C.ITEM_IDX].to_numpy(dtype=np.int64), fills[FILL_SCORE].to_numpy(dtype=np.float32),
                            fills[FILL_CAT].to_numpy(dtype=np.int32), code, sources, settings.get("by_category"))
    unit = explain_matrix(factors) if settings.get("explain") and factors is not None and len(factors.item_idx) else None
    rk, stats = settings.get("ranker"), None
    if rk and ranker_model is not None:
        stats = stats_of(rows)
    model = None
    if stats is not None:
        model = ranker.Ranker(model=ranker_model, depth=int(rk["depth"]), co_half_life_days=float(rk["co_half_life_days"]),
                              features=tuple(rk["features"]), sources=tuple(rk["sources"]))
    return block.Plan(n=int(settings["n"]), cap=settings.get("cap"), seq=seq, items=items, unit=unit,
                      blend_weight=settings.get("blend_weight"), catalogue=catalogue,
                      trending_days=float(settings["trending_days"]), whole=bool(settings.get("whole", True)),
                      ranker=model, stats=stats)
