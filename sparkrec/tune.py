"""Searching ALS and feedback settings on a validation split.

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

from pyspark import StorageLevel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from sparkrec import columns as C
from sparkrec import evaluate, train
from sparkrec.config import Config, RecommendConfig, TrainConfig, TuneConfig
from sparkrec.gate import metric_key
from sparkrec.protocol import make_protocol, model_lists, split_of
from sparkrec.errors import StageError

log = logging.getLogger(__name__)


@dataclass
class Trial:
    number: int
    feedback: int
    train: TrainConfig
    metric: float | None = None
    seconds: float | None = None
    blend_weight: float = 0.0

    def params(self) -> dict[str, object]:
        a = self.train.als
        return {
            "rank": a.rank, "reg_param": round(a.reg_param, 5), "alpha": round(a.alpha, 4), "max_iter": a.max_iter,
            "recency_half_life_days": self.train.recency_half_life_days, "event_weights": self.train.event_weights,
            "blend_weight": self.blend_weight,
        }

    @property
    def tuned(self) -> Tuned:
        return Tuned(self.train, self.blend_weight)


@dataclass(frozen=True)
class Tuned:
    """A tuning's winner: what `evaluate`, `train` and `recommend` use after it."""

    train: TrainConfig
    blend_weight: float


def _log_uniform(rng: random.Random, lo: float, hi: float) -> float:
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def sample_trials(tune: TuneConfig, base: TrainConfig, base_blend: float = 0.0) -> list[Trial]:
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
    trials = [Trial(0, 0, base, blend_weight=base_blend)]
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
        # Drawn only when there is a choice, so a space without blending replays the same trials as before.
        blend = rng.choice(space.blend_weight) if len(space.blend_weight) > 1 else space.blend_weight[0]
        settings = base.model_copy(update={"event_weights": weights, "recency_half_life_days": half_life, "als": als})
        trials.append(Trial(i, fb, settings, blend_weight=float(blend)))
    return sorted(trials, key=lambda t: (t.feedback, t.number))


def run_trials(
    cfg: Config, interactions: DataFrame, user_ids: DataFrame, item_ids: DataFrame, progress=None
) -> tuple[list[Trial], Trial]:
    """Search on a validation split carved from `interactions` (the caller passes the training period only)."""
    ev, tune_cfg = cfg.evaluate, cfg.tune
    proto = make_protocol(split_of(interactions, ev), ev, user_ids, item_ids)
    if proto.n_users == 0:
        raise StageError(f"tuning: the validation split ({proto.description}) has no evaluated users; use a longer history or another evaluate.split")
    trials = sample_trials(tune_cfg, cfg.train, cfg.recommend.blend.weight)
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
            lists = model_lists(proto, matrix, t.train, with_blend(cfg.recommend, t.blend_weight), ev.k)
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


def with_blend(rec: RecommendConfig, weight: float) -> RecommendConfig:
    """The recommend settings with another blend weight (the tuned one)."""
    return rec.model_copy(update={"blend": rec.blend.model_copy(update={"weight": weight})})
