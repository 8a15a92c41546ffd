"""Ranking metrics in plain Python and numpy: the reference the Spark implementation is held to.

`evaluate.ranking_metrics` computes the same numbers at scale with Spark
aggregates; this module states the definitions in a dozen lines each, with no
Spark, so the no-JVM test tier checks them against hand-worked values and the
Spark tier checks `evaluate` against them on random lists.

Definitions, per user with R relevant items and a ranked list L, averaged over
the users that have relevant items (a user with no list scores 0):
    precision@k = hits in L[:k] / k          recall@k = hits in L[:k] / R
    ndcg@k      = DCG(L[:k]) / IDCG(min(R, k)),  DCG = sum of 1 / log2(rank + 1) over hits
    map@k       = sum over hits of (hits so far / rank) / min(R, k)
    hit_rate@k  = 1 if any hit in L[:k]       mrr@k = 1 / rank of the first hit in L[:k]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

NAMES = ("precision", "recall", "ndcg", "map", "hit_rate", "mrr")


def user_metrics(ranked: Sequence[object], relevant: set[object], k: int) -> dict[str, float]:
    """One user's metrics at k."""
    top = list(ranked)[:k]
    hit = np.array([item in relevant for item in top], dtype=bool)
    ranks = np.flatnonzero(hit) + 1
    r = len(relevant)
    ideal = np.sum(1.0 / np.log2(np.arange(1, min(r, k) + 1) + 1)) if r else 0.0
    return {
        "precision": hit.sum() / k,
        "recall": hit.sum() / r if r else 0.0,
        "ndcg": float(np.sum(1.0 / np.log2(ranks + 1)) / ideal) if ideal else 0.0,
        "map": float(np.sum(np.arange(1, len(ranks) + 1) / ranks) / min(r, k)) if r else 0.0,
        "hit_rate": 1.0 if len(ranks) else 0.0,
        "mrr": 1.0 / ranks[0] if len(ranks) else 0.0,
    }


def ranking_metrics(
    lists: Mapping[object, Sequence[object]], relevant: Mapping[object, set[object]], ks: Sequence[int]
) -> dict[str, float]:
    """{"ndcg@10": ..., "users": n}: means over the users in `relevant` (those with a non-empty set)."""
    users = [u for u, items in relevant.items() if items]
    out: dict[str, float] = {"users": float(len(users))}
    for k in ks:
        per_user = [user_metrics(lists.get(u, ()), relevant[u], k) for u in users]
        for name in NAMES:
            out[f"{name}@{k}"] = float(np.mean([m[name] for m in per_user])) if per_user else 0.0
    return out
