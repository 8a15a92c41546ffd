"""The judging sections: `evaluate` (the split, metrics and quality gate) and `tune` (the search)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from sparkrec.core import columns as C
from sparkrec.core.config.base import Strict
from sparkrec.core.config.model import TrainConfig


class GateConfig(Strict):
    enabled: bool = True
    margin: float = Field(default=0.1, ge=0, description="Model must reach best baseline x (1 + margin).")
    on_fail: Literal["auto", "keep", "baseline"] = Field(
        default="auto",
        description="When the model loses: 'keep' publishes nothing (exit 3, the previous lists stay); 'baseline' "
        "publishes the best baseline's lists instead (exit 4); 'auto' is 'baseline' while no list was ever "
        "published (a shop is never left with nothing) and 'keep' after.",
    )


class EvaluateConfig(Strict):
    """How models and baselines are measured (see README, "Evaluation")."""

    enabled: bool = Field(default=True, description="Run evaluate (and its gate) inside `sparkrec run`.")
    split: Literal["time", "leave_last_n", "random"] = "time"
    test_days: float = Field(default=28.0, gt=0, description="time split: the last D days are the test period.")
    max_test_share: float = Field(
        default=0.25, gt=0, le=1,
        description="time split: the test period is at most this share of the history's span (short histories).",
    )
    leave_last_n: int = Field(default=1, ge=1)
    test_fraction: float = Field(default=0.2, gt=0, lt=1, description="random split: share of each user's items.")
    seed: int = 42
    ks: list[int] = Field(default_factory=lambda: [10, 20])
    metric: Literal["ndcg", "precision", "recall", "map", "hit_rate", "mrr"] = "ndcg"
    k: int = Field(default=10, ge=1, description="The k of the metric that tunes and gates.")
    relevant_event_types: list[str] = Field(default_factory=lambda: [C.PURCHASE])
    repeat_relevant: bool = Field(default=False, description="Count test items the user already had in training.")
    recent_days: float = Field(default=30.0, gt=0, description="Window of the 'recently popular' baseline.")
    buy_again: bool = True
    gate: GateConfig = GateConfig()

    @field_validator("relevant_event_types")
    @classmethod
    def _known_types(cls, v: list[str]) -> list[str]:
        unknown = sorted(set(v) - set(C.EVENT_TYPES))
        if unknown or not v:
            raise ValueError(f"expected a non-empty list of {list(C.EVENT_TYPES)}, got unknown {unknown}")
        return v

    @model_validator(mode="after")
    def _k_in_ks(self) -> EvaluateConfig:
        if self.k not in self.ks:
            raise ValueError(f"evaluate.k ({self.k}) must be one of evaluate.ks {self.ks}")
        if not self.ks or any(k < 1 for k in self.ks):
            raise ValueError("ks must be a non-empty list of k >= 1")
        return self


class TuneSpace(Strict):
    """Where the search looks. Ranges are sampled log-uniformly; lists are choices."""

    rank: list[int] = Field(default_factory=lambda: [16, 32, 64])
    reg_param: tuple[float, float] = (0.03, 1.0)
    alpha: tuple[float, float] = (0.5, 10.0)
    max_iter: list[int] = Field(default_factory=lambda: [15])
    recency_half_life_days: list[float | None] = Field(default_factory=lambda: [None, 14.0, 30.0])
    blend_weight: list[float] = Field(
        default_factory=lambda: [0.0, 0.2, 0.5, 1.0],
        description="recommend.blend.weight values every fit is scored with (a blend only re-ranks: no refit).",
    )
    event_weights: dict[str, list[float]] = Field(
        default_factory=lambda: {C.VIEW: [0.5, 1.0], C.CART: [2.0, 4.0], C.PURCHASE: [4.0, 8.0]},
        description="Choices per event type; types not listed keep train.event_weights.",
    )

    @model_validator(mode="after")
    def _ranges(self) -> TuneSpace:
        for name in ("reg_param", "alpha"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must be [low, high] with 0 < low <= high")
        if not self.rank or min(self.rank) < 1 or not self.max_iter or min(self.max_iter) < 1:
            raise ValueError("rank and max_iter need positive choices")
        if any(b < 0 for b in self.blend_weight):
            raise ValueError("blend_weight choices must be >= 0")
        return self


CANDIDATE_KEYS = ("rank", "reg_param", "alpha", "max_iter", "recency_half_life_days", "event_weights")


def _default_candidates() -> list[dict]:
    # Winners on shops unlike each other (bench/RESULTS.md, "Out of the box"): dense purchase history with a
    # season (Online Retail II: high rank, confident, recent) and a sparse clickstream (low rank, strongly regularised).
    return [
        {"rank": 64, "reg_param": 0.1, "alpha": 5.0, "recency_half_life_days": 14.0},
        {"rank": 16, "reg_param": 0.3, "alpha": 1.0},
    ]


class TuneConfig(Strict):
    enabled: bool = Field(
        default=True,
        description="Tune inside `sparkrec run` before evaluating and training: a search when no settings were tuned "
        "for this search within tune.reuse_days, the stored winner otherwise; skipped when the history is too "
        "short (tune.min_users).",
    )
    max_trials: int = Field(default=8, ge=1)
    max_minutes: float = Field(
        default=2.5, gt=0, description="Time budget of a search: no trial starts that would end after it."
    )
    feedback_settings: int = Field(default=2, ge=1, description="Distinct feedback constructions drawn at random (each matrix built once).")
    min_users: int = Field(
        default=50, ge=1,
        description="Fewest evaluated users on the validation split worth a search; below it `run` keeps the "
        "configured settings (and says so in `runs`), `sparkrec tune` fails.",
    )
    candidates: list[dict] = Field(
        default_factory=_default_candidates,
        description="Settings tried right after the configured ones, before random draws (keys: "
        + ", ".join(CANDIDATE_KEYS) + ").",
    )
    seed: int = 7
    space: TuneSpace = TuneSpace()
    reuse_days: float | None = Field(
        default=7.0, gt=0,
        description="Inside `sparkrec run`, settings tuned by an earlier run for the same search (same space, "
        "split, metric and base settings) within this many days are reused instead of searching again; "
        "null searches every time. `sparkrec tune` always searches.",
    )

    @field_validator("candidates")
    @classmethod
    def _candidate_keys(cls, v: list[dict]) -> list[dict]:
        for i, c in enumerate(v):
            unknown = sorted(set(c) - set(CANDIDATE_KEYS))
            if unknown:
                raise ValueError(f"candidate {i}: unknown key(s) {unknown}; allowed: {list(CANDIDATE_KEYS)}")
            with_candidate(TrainConfig(), c)  # the same checks as the settings themselves
        return v


def with_candidate(base: TrainConfig, candidate: dict) -> TrainConfig:
    """`base` with a tuning candidate's settings (keys `CANDIDATE_KEYS`), validated like any train settings."""
    merged = base.model_dump()
    merged["als"].update({k: candidate[k] for k in ("rank", "reg_param", "alpha", "max_iter") if k in candidate})
    if "recency_half_life_days" in candidate:
        merged["recency_half_life_days"] = candidate["recency_half_life_days"]
    if "event_weights" in candidate:
        merged["event_weights"] = {**base.event_weights, **candidate["event_weights"]}
    return TrainConfig.model_validate(merged)
