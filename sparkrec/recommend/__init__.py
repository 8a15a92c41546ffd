"""The recommend stage's transforms: top-N per user and similar items, under the shop's rules.

The stage reads as its parts, in the order the data passes through them:

    catalogue   histories with integer ids; the item catalogue with rules and boosts
    scoring     exact model top-N per user (faiss + numpy in mapInPandas)
    fallbacks   popularity rankings that fill cold users' and short lists
    lists       exactly N per user, keys, explanations, exploration slots
    similar     each item's nearest allowed items

This package re-exports what the pipeline, evaluation and tests use, so callers
write `recommend.recommend_all(...)` whatever part a function lives in.
"""

from sparkrec.recommend.catalogue import (
    allowed_by,
    default_meta,
    exclusions,
    history_lists,
    history_sizes,
    indexed_history,
    item_meta,
)
from sparkrec.recommend.fallbacks import fallback_rankings, fill_lists, popular_lists, popularity
from sparkrec.recommend.lists import (
    PUBLISHED_COLUMNS,
    as_baseline,
    exploration_pool,
    explanation,
    list_lengths,
    model_version_of,
    named_as_baseline,
    no_factors,
    recommend_all,
    with_exploration,
    with_keys,
)
from sparkrec.recommend.names import BECAUSE_IDX, BECAUSE_TYPE, CAT, EXCLUDED, HIST, HIST_TYPE
from sparkrec.recommend.scoring import candidate_matrix, score_top_n
from sparkrec.recommend.similar import similar_items, with_item_keys

__all__ = [
    "BECAUSE_IDX", "BECAUSE_TYPE", "CAT", "EXCLUDED", "HIST", "HIST_TYPE", "PUBLISHED_COLUMNS",
    "allowed_by", "as_baseline", "candidate_matrix", "default_meta", "exclusions", "exploration_pool", "explanation",
    "fallback_rankings", "fill_lists", "history_lists", "history_sizes", "indexed_history", "item_meta",
    "list_lengths", "model_version_of", "named_as_baseline", "no_factors",
    "popular_lists", "popularity", "recommend_all", "score_top_n", "similar_items", "with_exploration",
    "with_item_keys", "with_keys",
]
