"""Searching ALS, feedback and blend settings on a validation split, within a time budget.

Tuning never sees the test period: it carves a validation split out of the
training period with the same split kind, picks the best trial there, and
the caller refits the winner on the whole training period. Trials run in
the order they are worth running (configured settings, candidates, random
draws) because the budget may cut the list short; each feedback
construction's matrix is built once and kept for every trial that shares it.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field

from pyspark import StorageLevel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from sparkrec.batch import evaluate, train
from sparkrec.batch.protocol import make_protocol, model_lists_blended, validation_split
from sparkrec.core import columns as C
from sparkrec.core.config import Config, RecommendConfig, TrainConfig, TuneConfig, with_candidate
from sparkrec.core.errors import StageError
from sparkrec.core.gate import metric_key

log = logging.getLogger(__name__)


@dataclass
class Trial:
    number: int
    feedback: int
    train: TrainConfig
    metric: float | None = None
    seconds: float | None = None
    blend_weight: float = 0.0
    # The validation metric of each blend weight tried on this trial's fit (the model is fitted once).
    blends: dict[float, float] = field(default_factory=dict)

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


class TooLittleData(StageError):
    """The validation split has too few evaluated users for a search to mean anything."""


def _log_uniform(rng: random.Random, lo: float, hi: float) -> float:
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def blend_choices(tune: TuneConfig, base_blend: float) -> list[float]:
    """The blend weights every fit is scored with: the configured one and the space's."""
    return sorted({float(base_blend), *(float(b) for b in tune.space.blend_weight)})


def sample_trials(tune: TuneConfig, base: TrainConfig, base_blend: float = 0.0) -> list[Trial]:
    """Trials in the order they are worth running when the time budget may cut the list short.

    First the configured settings (tuning never loses to them on validation), then the
    candidates (`tune.candidates`: settings that won on shops unlike each other), then seeded
    random draws from the space, dealt over `tune.feedback_settings` feedback constructions.
    """
    rng = random.Random(tune.seed)
    space = tune.space
    feedbacks = [(dict(base.event_weights), base.recency_half_life_days)]

    def feedback_of(t: TrainConfig) -> int:
        key = (dict(t.event_weights), t.recency_half_life_days)
        if key not in feedbacks:
            feedbacks.append(key)
        return feedbacks.index(key)

    trials = [Trial(0, 0, base, blend_weight=base_blend)]
    for c in tune.candidates:
        settings = with_candidate(base, c)
        if all(settings != t.train for t in trials) and len(trials) < tune.max_trials:
            trials.append(Trial(len(trials), feedback_of(settings), settings, blend_weight=base_blend))
    # Half-lives are dealt out in a shuffled order without repeats first, so a
    # few feedback settings still cover different recency treatments.
    drawn = [(dict(base.event_weights), base.recency_half_life_days)]
    lives = [h for h in space.recency_half_life_days if h != base.recency_half_life_days]
    rng.shuffle(lives)
    for attempt in range(40 * tune.feedback_settings):
        if len(drawn) >= tune.feedback_settings:
            break
        weights = dict(base.event_weights)
        for etype, choices in space.event_weights.items():
            if etype in weights and choices:
                weights[etype] = float(rng.choice(choices))
        half_life = lives[attempt] if attempt < len(lives) else rng.choice(space.recency_half_life_days)
        cand = (weights, half_life)
        if cand not in drawn and any(w > 0 for w in weights.values()):
            drawn.append(cand)
    for i in range(len(trials), tune.max_trials):
        weights, half_life = drawn[i % len(drawn)]
        als = base.als.model_copy(
            update={
                "rank": rng.choice(space.rank),
                "reg_param": _log_uniform(rng, *space.reg_param),
                "alpha": _log_uniform(rng, *space.alpha),
                "max_iter": rng.choice(space.max_iter),
            }
        )
        settings = base.model_copy(update={"event_weights": weights, "recency_half_life_days": half_life, "als": als})
        trials.append(Trial(i, feedback_of(settings), settings, blend_weight=base_blend))
    return trials


# A ranker's training cut costs about this share of a tuning trial (an ALS fit and a pass over the lists),
# three cuts running side by side (Online Retail II: 72 s for three cuts, trials of 22-45 s).
CUT_PER_TRIAL = 0.55


def ranker_reserve(ranker_seconds: float | None, cuts: int, slowest_trial: float) -> float:
    """Seconds of the search's budget kept for the ranker's training: as long as it last took, or, never
    measured, `CUT_PER_TRIAL` of the slowest trial per training cut."""
    return float(ranker_seconds) if ranker_seconds is not None else cuts * CUT_PER_TRIAL * slowest_trial


def run_trials(
    cfg: Config, interactions: DataFrame, user_ids: DataFrame, item_ids: DataFrame, progress=None,
    ranker_seconds: float | None = None,
) -> tuple[list[Trial], Trial]:
    """Search on a validation split carved from `interactions` (the caller passes the training period only).

    Each trial fits ALS once and scores its lists at every blend weight of the space (a blend
    only re-ranks, so trying one costs a top-k, not a fit). No trial starts that the time budget
    would not let finish, judged by the trials so far, so `tune.max_minutes` bounds the stage.

    Args:
        ranker_seconds: when the evaluation will train the ranker, the budget covers it: this much is kept
            for it (0: none; None: estimated as `ranker.training_cuts` x `CUT_PER_TRIAL` x the slowest trial).
            The configured settings' trial always runs.

    Raises:
        TooLittleData: fewer than `tune.min_users` users on the validation split.
    """
    ev, tune_cfg = cfg.evaluate, cfg.tune
    proto = make_protocol(validation_split(interactions, ev), ev, user_ids, item_ids, cfg.recommend.exclude_event_types)
    if proto.n_users < max(1, tune_cfg.min_users):
        proto.release()
        raise TooLittleData(
            f"tuning: the validation split ({proto.description}) has {proto.n_users} evaluated users, fewer than "
            f"tune.min_users ({tune_cfg.min_users}); use a longer history or another evaluate.split"
        )
    trials = sample_trials(tune_cfg, cfg.train, cfg.recommend.blend.weight)
    blends = blend_choices(tune_cfg, cfg.recommend.blend.weight)
    key = metric_key(ev)
    start = time.monotonic()
    budget = tune_cfg.max_minutes * 60
    reference = proto.train.agg(F.max(C.EVENT_TS)).first()[0]
    done: list[Trial] = []
    matrices: dict[int, DataFrame] = {}
    try:
        for t in trials:
            elapsed = time.monotonic() - start
            typical = max((d.seconds or 0.0) for d in done) if done else 0.0
            reserve = ranker_reserve(ranker_seconds, cfg.ranker.training_cuts, typical)
            if done and elapsed + typical + reserve > budget:
                kept = f", keeping {reserve:.0f} s of it for the ranker's training" if reserve else ""
                log.warning("tuning: stopping after %d of %d trials: another would pass the time budget of %.1f min "
                            "(tune.max_minutes)%s", len(done), len(trials), tune_cfg.max_minutes, kept)
                break
            t0 = time.monotonic()
            if t.feedback not in matrices:
                matrices[t.feedback] = train.training_matrix(proto.train, user_ids, item_ids, t.train, reference).persist(
                    StorageLevel.MEMORY_AND_DISK)
            for weight, lists in model_lists_blended(proto, matrices[t.feedback], t.train, cfg.recommend, blends, ev.k):
                t.blends[weight] = evaluate.ranking_metrics(lists, proto.relevant, [ev.k])[key]
            # The best blend of this fit; ties go to the configured weight, then to the smaller one.
            t.blend_weight, t.metric = max(t.blends.items(), key=lambda kv: (kv[1], kv[0] == t.blend_weight, -kv[0]))
            t.seconds = time.monotonic() - t0
            done.append(t)
            log.info("tuning: trial %d/%d %s -> %s %.4f (%.1fs)", len(done), len(trials), t.params(), key, t.metric, t.seconds)
            if progress:
                progress(t)
    finally:
        for m in matrices.values():
            m.unpersist()
        proto.release()
    best = max(done, key=lambda x: (x.metric or 0.0, -x.number))
    return done, best


def with_blend(rec: RecommendConfig, weight: float) -> RecommendConfig:
    """The recommend settings with another blend weight (the tuned one)."""
    return rec.model_copy(update={"blend": rec.blend.model_copy(update={"weight": weight})})
