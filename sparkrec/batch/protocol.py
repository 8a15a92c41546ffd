"""The evaluation protocol: what every list on one split is judged by.

`Protocol` fixes the training interactions, the evaluated users, their
relevant items and the exclusions, so the model and each baseline are
compared on exactly the same terms. `evaluate` (the metrics) scores the lists;
`gate` turns the scores into a verdict; `tune` runs many models on a
validation protocol carved from the training period.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

from pyspark import StorageLevel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from sparkrec.batch import evaluate, ranking, recommend, train
from sparkrec.core import columns as C
from sparkrec.core import ranker
from sparkrec.core.config import EvaluateConfig, RankerConfig, RecommendConfig, TrainConfig
from sparkrec.core.gate import metric_key

__all__ = ["Protocol", "all_lists_and_factors", "baseline_lists", "make_protocol", "metric_key", "model_lists",
           "model_lists_blended", "ranked_lists", "split_of", "validation_split", "why_no_users"]

log = logging.getLogger(__name__)


@dataclass
class Protocol:
    train: DataFrame  # interactions before the cut
    history: DataFrame  # the same with integer ids (user_idx, item_idx, event_type, event_ts)
    relevant: DataFrame  # (user_id, item_id)
    users: DataFrame  # (user_idx) evaluated users
    user_ids: DataFrame
    item_ids: DataFrame
    description: str
    n_users: int
    cutoff: datetime | None = None  # a time split's cut: the test period starts there

    def release(self) -> None:
        self.history.unpersist()
        self.train.unpersist()

    def keyed(self, lists: DataFrame) -> DataFrame:
        """(user_idx, item_idx, rank) lists with the original keys, materialised: (user_id, item_id, rank)."""
        return lists.join(self.user_ids, C.USER_IDX).join(self.item_ids, C.ITEM_IDX).select(C.USER_ID, C.ITEM_ID, C.RANK).localCheckpoint()


def split_of(interactions: DataFrame, ev: EvaluateConfig) -> evaluate.Split:
    if ev.split == "time":
        return evaluate.time_split(interactions, ev.test_days, ev.max_test_share)
    if ev.split == "leave_last_n":
        return evaluate.leave_last_n_split(interactions, ev.leave_last_n)
    return evaluate.random_split(interactions, ev.test_fraction, ev.seed)


def validation_split(training_period: DataFrame, ev: EvaluateConfig) -> evaluate.Split:
    """The split tuning judges on, carved from the training period the way the evaluation's is from the whole.

    A random split of the training period with the evaluation's own seed hashes every pair as before, so it
    puts nothing in its test part (those pairs were already taken out): tuning never ran on a random split.
    It takes the next seed.
    """
    if ev.split == "random":
        return evaluate.random_split(training_period, ev.test_fraction, ev.seed + 1)
    return split_of(training_period, ev)


def make_protocol(split: evaluate.Split, ev: EvaluateConfig, user_ids: DataFrame, item_ids: DataFrame,
                  excluded_types: list[str] | None = None) -> Protocol:
    """Materialise the split's fixed parts once: every list on it (model trials and baselines) reads them.
    `excluded_types`: what the lists leave out (`recommend.exclude_event_types`), for what counts as new."""
    tr = split.train.persist(StorageLevel.MEMORY_AND_DISK)
    history = recommend.indexed_history(tr, user_ids, item_ids).persist(StorageLevel.MEMORY_AND_DISK)
    relevant = evaluate.relevant_items(tr, split.test, ev.relevant_event_types, ev.repeat_relevant,
                                       excluded_types).localCheckpoint()
    users = relevant.select(C.USER_ID).distinct().join(user_ids, C.USER_ID).select(C.USER_IDX).localCheckpoint()
    n = users.count()
    log.info("evaluation protocol %s: %s evaluated users", split.description, f"{n:,}")
    return Protocol(tr, history, relevant, users, user_ids, item_ids, split.description, n, split.cutoff)


def why_no_users(interactions: DataFrame, proto: Protocol, ev: EvaluateConfig) -> str:
    """The reason a split evaluates nobody, in the user's terms: most often no event is of a relevant type.

    A ratings data set whose events are all `view` met "no user with training history acted in the test
    period" and had no way to learn that `evaluate.relevant_event_types` was the setting to change.
    """
    counts = {r[C.EVENT_TYPE]: r["count"] for r in interactions.groupBy(C.EVENT_TYPE).count().collect()}  # a few types
    held = ", ".join(f"{t} {n:,}" for t, n in sorted(counts.items()))
    if not any(counts.get(t) for t in ev.relevant_event_types):
        return (f"no interaction is of a type in evaluate.relevant_event_types {ev.relevant_event_types} (the "
                f"interactions hold: {held or 'nothing'}); set it to the types that mean a customer wanted the item")
    if proto.train.isEmpty():
        return "the training period is empty: the whole history falls in the test period"
    return ("no user with training history has a new item of a type in evaluate.relevant_event_types "
            f"{ev.relevant_event_types} in the test period (the interactions hold: {held}); "
            + ("use a longer history or another evaluate.split" if ev.repeat_relevant else
               "use a longer history, another evaluate.split, or evaluate.repeat_relevant: true if customers buy again"))


def _eval_rec_cfg(rec: RecommendConfig, k: int) -> RecommendConfig:
    """The production list logic at the evaluated depth, without the parts that cost but do not rank."""
    return rec.model_copy(update={"n": k, "explain": False, "exploration_slots": 0})


def model_lists(proto: Protocol, matrix: DataFrame, tcfg: TrainConfig, rec: RecommendConfig, k: int) -> DataFrame:
    """Fit ALS on a materialised matrix and list the evaluated users' top k: (user_id, item_id, rank)."""
    [(_, lists)] = model_lists_blended(proto, matrix, tcfg, rec, [rec.blend.weight], k)
    return lists


def model_lists_blended(
    proto: Protocol, matrix: DataFrame, tcfg: TrainConfig, rec: RecommendConfig, weights: list[float], k: int,
    factors: tuple[DataFrame, DataFrame] | None = None,
) -> Iterator[tuple[float, DataFrame]]:
    """Fit ALS once (unless `factors` are given) and list the evaluated users' top k at each blend weight:
    (weight, (user_id, item_id, rank))."""
    uf, itf = factors or train.fit_factors(matrix, tcfg.als)
    for weight in weights:
        blended = rec.model_copy(update={"blend": rec.blend.model_copy(update={"weight": weight})})
        yield weight, proto.keyed(recommend.recommend_all(proto.history, uf, itf, _eval_rec_cfg(blended, k), users=proto.users))


def baseline_lists(proto: Protocol, ev: EvaluateConfig, k: int, bought: list[str]) -> dict[str, DataFrame]:
    """Most popular, recently popular and (optionally) buy again, on the same users and exclusions.

    The popular lists are built by the very code that fills a cold-start
    user's list in production, so the baseline is what a shop would get anyway.
    """
    h = proto.history
    meta = recommend.default_meta(h, h)
    out = {"popular": proto.keyed(recommend.popular_lists(h, proto.users, meta, k, bought))}
    latest = proto.train.agg(F.max(C.EVENT_TS)).first()[0]
    if latest is not None:
        since = F.lit(latest - timedelta(days=ev.recent_days))
        out["recent_popular"] = proto.keyed(recommend.popular_lists(h, proto.users, meta, k, bought, since=since))
    if ev.buy_again:
        # Its point is the user's own past items, so the bought-item exclusion does not apply to it.
        users = proto.users.join(proto.user_ids, C.USER_IDX).select(C.USER_ID)
        out["buy_again"] = evaluate.buy_again_lists(users, proto.train, bought, k)
    return out


def categories_of(items: DataFrame | None) -> DataFrame | None:
    """(item_id, category) for the diversity metric, or None when no item has a category."""
    if items is None or items.where(F.col(C.CATEGORY).isNotNull()).isEmpty():
        return None
    return items.select(C.ITEM_ID, C.CATEGORY)


def all_lists(
    proto: Protocol, user_ids: DataFrame, item_ids: DataFrame, settings: TrainConfig, rec: RecommendConfig, ev: EvaluateConfig
) -> dict[str, DataFrame]:
    """The model's lists (fit on the protocol's training period) and every baseline's, as deep as the deepest k.

    Needs a checkpoint directory (the matrix is checkpointed for ALS).
    """
    lists, _ = all_lists_and_factors(proto, user_ids, item_ids, settings, rec, ev)
    return lists


def all_lists_and_factors(
    proto: Protocol, user_ids: DataFrame, item_ids: DataFrame, settings: TrainConfig, rec: RecommendConfig, ev: EvaluateConfig
) -> tuple[dict[str, DataFrame], tuple[DataFrame, DataFrame]]:
    """`all_lists`, and the factors the model's lists came from (the ranked lists rank their candidates)."""
    kmax = max(ev.ks)
    reference = proto.train.agg(F.max(C.EVENT_TS)).first()[0]
    matrix = train.training_matrix(proto.train, user_ids, item_ids, settings, reference).checkpoint(eager=True)
    factors = train.fit_factors(matrix, settings.als)
    [(_, model)] = model_lists_blended(proto, matrix, settings, rec, [rec.blend.weight], kmax, factors)
    lists = {"model": model}
    lists.update(baseline_lists(proto, ev, kmax, rec.exclude_event_types))
    return lists, factors


def ranked_lists(proto: Protocol, factors: tuple[DataFrame, DataFrame], model: ranker.Ranker, rec: RecommendConfig,
                 rk: RankerConfig, k: int, stats: ranker.ItemStats | None = None) -> DataFrame:
    """The evaluated users' top k as the ranker orders their candidates, from the model's own factors.

    Args:
        stats: the items' ranker inputs at the end of the training period (`ranking.item_stats` at
            `ranking_reference(proto)`), when the caller has them already.
    """
    uf, itf = factors
    r = _eval_rec_cfg(ranking.list_settings(rec), k)
    reference = ranking_reference(proto)
    priced = ranking.priced_history(proto.train, proto.user_ids, proto.item_ids)
    evaluated = priced.join(proto.users, C.USER_IDX, "left_semi")
    ranked = (model, stats or ranking.item_stats(priced, reference, rk), ranking.user_inputs(evaluated, reference))
    return proto.keyed(recommend.recommend_all(proto.history, uf, itf, r, users=proto.users, ranked=ranked))


def ranking_reference(proto: Protocol) -> datetime:
    """The moment the ranker's inputs describe on this split: its cut (a time split), else its last event."""
    return proto.cutoff or proto.train.agg(F.max(C.EVENT_TS)).first()[0]


def measure(lists: dict[str, DataFrame], proto: Protocol, ev: EvaluateConfig, categories: DataFrame | None) -> dict[str, dict[str, float]]:
    """Every list's metrics on the protocol's relevant items: {list name: {metric@k: value}}."""
    return {
        name: evaluate.ranking_metrics(df, proto.relevant, ev.ks, train=proto.train, categories=categories)
        for name, df in lists.items()
    }
