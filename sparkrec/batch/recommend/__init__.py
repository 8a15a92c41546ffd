"""The recommend stage's transforms: top-N per user and similar items, under the shop's rules.

The stage reads as its parts, in the order the data passes through them:

    catalogue   histories with integer ids; the item catalogue with rules and boosts
    scoring     the candidate matrix; exact top-N in chunks for a catalogue too big to broadcast
    fallbacks   popularity rankings that fill cold users' and short lists
    (core.block one block of users to finished lists: score, fill, key, explain; no Spark, so
                the live path and a server call it too)
    lists       the per-user rows and the one pass over them; exploration slots
    similar     each item's nearest allowed items

This package re-exports what the pipeline, evaluation and tests use, so callers
write `recommend.recommend_all(...)` whatever part a function lives in.
"""

from sparkrec.batch.recommend.catalogue import (
    allowed_by,
    default_meta,
    indexed_history,
    item_meta,
)
from sparkrec.batch.recommend.fallbacks import fallback_rankings, item_popularity, popularity
from sparkrec.batch.recommend.lists import (
    PUBLISHED_COLUMNS,
    as_baseline,
    assemble,
    bounded_plan,
    exploration_pool,
    list_lengths,
    model_version_of,
    no_factors,
    popular_lists,
    recommend_all,
    user_rows,
    with_exploration,
    with_keys,
)
from sparkrec.batch.recommend.scoring import candidate_matrix, score_top_n
from sparkrec.batch.recommend.similar import similar_items, with_item_keys
from sparkrec.core.recnames import BECAUSE_IDX, BECAUSE_TYPE, CAT, EXCLUDED, HIST, HIST_TYPE

__all__ = [
    "BECAUSE_IDX", "BECAUSE_TYPE", "CAT", "EXCLUDED", "HIST", "HIST_TYPE", "PUBLISHED_COLUMNS",
    "allowed_by", "as_baseline", "assemble", "bounded_plan", "candidate_matrix", "default_meta", "exploration_pool",
    "fallback_rankings", "indexed_history", "item_popularity", "item_meta", "list_lengths", "model_version_of", "no_factors", "user_rows",
    "popular_lists", "popularity", "recommend_all", "score_top_n", "similar_items", "with_exploration",
    "with_item_keys", "with_keys",
]
