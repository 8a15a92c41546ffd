"""The model sections: `train` (feedback weights, ALS) and `recommend` (lists, rules, boosts,
similar items, the popularity blend)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from sparkrec.core import columns as C
from sparkrec.core.config.base import Strict


class AlsConfig(Strict):
    rank: int = Field(default=32, ge=1)
    max_iter: int = Field(default=15, ge=1)
    reg_param: float = Field(default=0.1, ge=0)
    alpha: float = Field(default=1.0, ge=0)
    seed: int = 42
    checkpoint_interval: int = Field(default=5, ge=1)
    nonnegative: bool = False
    num_blocks: int | None = Field(default=None, ge=1)


class TrainConfig(Strict):
    event_weights: dict[str, float] = Field(
        default_factory=lambda: {C.VIEW: 1.0, C.CART: 3.0, C.PURCHASE: 5.0, C.RATING_EVENT: 1.0},
        description="Weight per event type; a rating event contributes weight x rating.",
    )
    recency_half_life_days: float | None = Field(default=None, gt=0)
    als: AlsConfig = AlsConfig()

    @field_validator("event_weights")
    @classmethod
    def _known_types(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(v) - set(C.EVENT_TYPES))
        if unknown:
            raise ValueError(f"unknown event type(s) {unknown}; allowed: {list(C.EVENT_TYPES)}")
        if any(w < 0 for w in v.values()):
            raise ValueError("weights must be >= 0")
        if not any(w > 0 for w in v.values()):
            raise ValueError("at least one event type needs a positive weight")
        return v


class BoostConfig(Strict):
    """Raise some items' scores: the score of a boosted item is multiplied by `factor`."""

    factor: float = Field(default=1.0, gt=0)
    items: list[str] = Field(default_factory=list, description="Promoted item ids.")
    categories: list[str] = Field(default_factory=list, description="Promoted categories.")
    new_item_days: float | None = Field(
        default=None, gt=0, description="Items first seen in the last D days of history count as new and are boosted."
    )


class RulesConfig(Strict):
    """Shop rules applied to every list, model and fallback alike."""

    exclude_unavailable: bool = True
    exclude_items: list[str] = Field(default_factory=list)
    include_categories: list[str] = Field(default_factory=list, description="Empty means every category.")
    exclude_categories: list[str] = Field(default_factory=list)
    max_per_category: int | None = Field(default=None, ge=1, description="Diversity: at most this many items of one category per list.")
    boost: BoostConfig = BoostConfig()

    @model_validator(mode="after")
    def _categories_disjoint(self) -> RulesConfig:
        both = sorted(set(self.include_categories) & set(self.exclude_categories))
        if both:
            raise ValueError(f"categories {both} are both included and excluded")
        return self


class SimilarItemsConfig(Strict):
    enabled: bool = True
    k: int = Field(default=20, ge=1, le=1000)


class BlendConfig(Strict):
    """A hybrid list: the model's score plus `weight` x the item's recent popularity (0..1, its share of the
    most popular item's distinct users in the last `days` of history), ranked by the same exact top-N."""

    weight: float = Field(default=0.0, ge=0, description="0 is the model alone.")
    days: float = Field(default=30.0, gt=0)


class RecommendConfig(Strict):
    n: int = Field(default=20, ge=1, le=1000)
    blend: BlendConfig = BlendConfig()
    exclude_event_types: list[str] = Field(default_factory=lambda: [C.PURCHASE])
    min_history: int = Field(default=1, ge=1, description="Distinct items a user needs for ALS recommendations.")
    max_broadcast_items: int = Field(default=500_000, ge=1)
    fallback: Literal["popular", "trending", "category_popular"] = Field(
        default="popular", description="List for users below min_history; always backfilled from popular."
    )
    trending_days: float = Field(default=7.0, gt=0, description="Window of 'trending', counted back from the latest event.")
    exploration_slots: int = Field(default=0, ge=0, description="Last slots of each list given to items without factors.")
    max_exploration_items: int = Field(default=10_000, ge=1, description="Bound on the exploration pool (broadcast).")
    explain: bool = True
    rules: RulesConfig = RulesConfig()
    similar_items: SimilarItemsConfig = SimilarItemsConfig()

    @model_validator(mode="after")
    def _slots_fit(self) -> RecommendConfig:
        if self.exploration_slots >= self.n:
            raise ValueError(f"exploration_slots ({self.exploration_slots}) must be smaller than n ({self.n})")
        return self

    @field_validator("exclude_event_types")
    @classmethod
    def _known_types(cls, v: list[str]) -> list[str]:
        unknown = sorted(set(v) - set(C.EVENT_TYPES))
        if unknown:
            raise ValueError(f"unknown event type(s) {unknown}; allowed: {list(C.EVENT_TYPES)}")
        return v


class RankerConfig(Strict):
    """The second stage (`core.ranker`): candidates from several sources, ordered by a learned ranker.

    Trained at `training_cuts` past moments, `label_days` apart (labels: what each customer bought new in
    the `label_days` after a cut), with an ALS model fitted at each cut so no feature knows the labels.
    The evaluation measures the ranked lists beside the model's; the gate publishes them only when they win.
    """

    enabled: bool = Field(default=True, description="Train the ranker in evaluate and let the gate choose it.")
    depth: int = Field(default=100, ge=1, le=1000, description="Candidates per source and customer.")
    training_cuts: int = Field(default=3, ge=1, le=12, description="Past moments the ranker learns from, newest first.")
    label_days: float = Field(default=28.0, gt=0, description="Days after a cut whose new purchases are the labels.")
    recent_days: float = Field(default=28.0, gt=0, description="The recent popularity's window (a source and features).")
    co_half_life_days: float = Field(default=14.0, gt=0,
                                     description="A customer's items count half as much in co-purchase after this many days.")
    max_neighbours: int = Field(default=50, ge=1, le=1000, description="Co-purchase neighbours kept per item (broadcast).")
    basket_items: int = Field(default=100, ge=2, le=10_000,
                              description="Items of one customer's day counted as bought together (the latest).")
    max_training_customers: int = Field(default=4000, ge=10,
                                        description="Customers per cut whose candidates train the ranker (on the driver).")
    max_rounds: int = Field(default=500, ge=1, description="Boosting rounds at most; early stopping picks fewer.")
    patience: int = Field(default=10, ge=1,
                          description="Rounds without a gain on the newest cut before early stopping ends a model's training.")
    models: int = Field(default=3, ge=1, le=10,
                        description="LightGBM models trained with the seeds seed, seed+1, ... and averaged "
                                    "(one model's early stopping is noisy).")
    learning_rate: float = Field(default=0.05, gt=0, le=1)
    num_leaves: int = Field(default=31, ge=2)
    seed: int = 42
