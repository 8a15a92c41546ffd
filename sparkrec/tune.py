"""Fitting on a split, judging against baselines, and searching ALS and feedback settings.

`Protocol` fixes what every list on one split is judged by (training
interactions, evaluated users, relevant items, exclusions), so the model and
each baseline are compared on exactly the same terms.

Tuning never sees the test period: it carves a validation split out of the
training period with the same split kind, picks the best trial there, and
the caller refits the winner on the whole training period. Trials are
grouped by feedback construction so each weighted matrix is built and
materialised once and reused by every ALS setting that shares it.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from datetime import timedelta

from pyspark import StorageLevel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from sparkrec import columns as C
from sparkrec import evaluate, recommend, train
from sparkrec.config import Config, EvaluateConfig, RecommendConfig, TrainConfig, TuneConfig
from sparkrec.errors import StageError

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

    def release(self) -> None:
        self.history.unpersist()
        self.train.unpersist()

    def keyed(self, lists: DataFrame) -> DataFrame:
        """(user_idx, item_idx, rank) lists with the original keys, materialised: (user_id, item_id, rank)."""
        return lists.join(self.user_ids, C.USER_IDX).join(self.item_ids, C.ITEM_IDX).select(C.USER_ID, C.ITEM_ID, C.RANK).localCheckpoint()


def split_of(interactions: DataFrame, ev: EvaluateConfig) -> evaluate.Split:
    if ev.split == "time":
        return evaluate.time_split(interactions, ev.test_days)
    if ev.split == "leave_last_n":
        return evaluate.leave_last_n_split(interactions, ev.leave_last_n)
    return evaluate.random_split(interactions, ev.test_fraction, ev.seed)


def make_protocol(split: evaluate.Split, ev: EvaluateConfig, user_ids: DataFrame, item_ids: DataFrame) -> Protocol:
    """Materialise the split's fixed parts once: every list on it (model trials and baselines) reads them."""
    tr = split.train.persist(StorageLevel.MEMORY_AND_DISK)
    history = recommend.indexed_history(tr, user_ids, item_ids).persist(StorageLevel.MEMORY_AND_DISK)
    relevant = evaluate.relevant_items(tr, split.test, ev.relevant_event_types, ev.repeat_relevant).localCheckpoint()
    users = relevant.select(C.USER_ID).distinct().join(user_ids, C.USER_ID).select(C.USER_IDX).localCheckpoint()
    n = users.count()
    log.info("evaluation protocol %s: %s evaluated users", split.description, f"{n:,}")
    return Protocol(tr, history, relevant, users, user_ids, item_ids, split.description, n)


def _eval_rec_cfg(rec: RecommendConfig, k: int) -> RecommendConfig:
    """The production list logic at the evaluated depth, without the parts that cost but do not rank."""
    return rec.model_copy(update={"n": k, "explain": False, "exploration_slots": 0})


def model_lists(proto: Protocol, matrix: DataFrame, tcfg: TrainConfig, rec: RecommendConfig, k: int) -> DataFrame:
    """Fit ALS on a materialised matrix and list the evaluated users' top k: (user_id, item_id, rank)."""
    model = train.fit_als(matrix, tcfg.als)
    uf = model.userFactors.select(F.col("id").alias(C.USER_IDX), F.col("features").alias(C.FEATURES))
    itf = model.itemFactors.select(F.col("id").alias(C.ITEM_IDX), F.col("features").alias(C.FEATURES))
    return proto.keyed(recommend.recommend_all(proto.history, uf, itf, _eval_rec_cfg(rec, k), users=proto.users))


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


def metric_key(ev: EvaluateConfig) -> str:
    return f"{ev.metric}@{ev.k}"


# --------------------------------------------------------------------------- tuning


@dataclass
class Trial:
    number: int
    feedback: int
    train: TrainConfig
    metric: float | None = None
    seconds: float | None = None

    def params(self) -> dict[str, object]:
        a = self.train.als
        return {
            "rank": a.rank, "reg_param": round(a.reg_param, 5), "alpha": round(a.alpha, 4), "max_iter": a.max_iter,
            "recency_half_life_days": self.train.recency_half_life_days, "event_weights": self.train.event_weights,
        }


def _log_uniform(rng: random.Random, lo: float, hi: float) -> float:
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def sample_trials(tune: TuneConfig, base: TrainConfig) -> list[Trial]:
    """The configured settings first (tuning never loses to them on validation), then seeded random ones.

    Trials come grouped by feedback construction, the configured one first.
    """
    rng = random.Random(tune.seed)
    space = tune.space
    feedbacks = [(dict(base.event_weights), base.recency_half_life_days)]
    # Half-lives are dealt out in a shuffled order without repeats first, so a
    # few feedback settings still cover different recency treatments.
    lives = [h for h in space.recency_half_life_days if h != base.recency_half_life_days]
    rng.shuffle(lives)
    for attempt in range(40 * tune.feedback_settings):
        if len(feedbacks) >= tune.feedback_settings:
            break
        weights = dict(base.event_weights)
        for etype, choices in space.event_weights.items():
            if etype in weights and choices:
                weights[etype] = float(rng.choice(choices))
        half_life = lives[attempt] if attempt < len(lives) else rng.choice(space.recency_half_life_days)
        cand = (weights, half_life)
        if cand not in feedbacks and any(w > 0 for w in weights.values()):
            feedbacks.append(cand)
    trials = [Trial(0, 0, base)]
    for i in range(1, tune.max_trials):
        fb = i % len(feedbacks)
        weights, half_life = feedbacks[fb]
        als = base.als.model_copy(
            update={
                "rank": rng.choice(space.rank),
                "reg_param": _log_uniform(rng, *space.reg_param),
                "alpha": _log_uniform(rng, *space.alpha),
                "max_iter": rng.choice(space.max_iter),
            }
        )
        trials.append(Trial(i, fb, base.model_copy(update={"event_weights": weights, "recency_half_life_days": half_life, "als": als})))
    return sorted(trials, key=lambda t: (t.feedback, t.number))


def run_trials(
    cfg: Config, interactions: DataFrame, user_ids: DataFrame, item_ids: DataFrame, progress=None
) -> tuple[list[Trial], Trial]:
    """Search on a validation split carved from `interactions` (the caller passes the training period only)."""
    ev, tune_cfg = cfg.evaluate, cfg.tune
    proto = make_protocol(split_of(interactions, ev), ev, user_ids, item_ids)
    if proto.n_users == 0:
        raise StageError(f"tuning: the validation split ({proto.description}) has no evaluated users; use a longer history or another evaluate.split")
    trials = sample_trials(tune_cfg, cfg.train)
    key = metric_key(ev)
    deadline = time.monotonic() + tune_cfg.max_minutes * 60
    reference = proto.train.agg(F.max(C.EVENT_TS)).first()[0]
    done: list[Trial] = []
    current_fb, matrix = None, None
    try:
        for t in trials:
            if time.monotonic() > deadline:
                log.warning("tuning: time budget of %.1f min reached after %d of %d trials", tune_cfg.max_minutes, len(done), len(trials))
                break
            if t.feedback != current_fb:
                if matrix is not None:
                    matrix.unpersist()
                matrix = train.training_matrix(proto.train, user_ids, item_ids, t.train, reference).persist(StorageLevel.MEMORY_AND_DISK)
                matrix.count()
                current_fb = t.feedback
            t0 = time.monotonic()
            lists = model_lists(proto, matrix, t.train, cfg.recommend, ev.k)
            t.metric = evaluate.ranking_metrics(lists, proto.relevant, [ev.k])[key]
            t.seconds = time.monotonic() - t0
            done.append(t)
            log.info("tuning: trial %d/%d %s -> %s %.4f (%.1fs)", len(done), len(trials), t.params(), key, t.metric, t.seconds)
            if progress:
                progress(t)
    finally:
        if matrix is not None:
            matrix.unpersist()
        proto.release()
    best = max(done, key=lambda x: (x.metric or 0.0, -x.number))
    return done, best
