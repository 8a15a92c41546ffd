"""The `search` section: the full-text index the recommend stage writes and `GET /v1/search` reads."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from sparkrec.core.config.base import Strict

# What a document of the index can carry (its text fields); the item key is matched exactly, the others as words.
SEARCH_FIELDS = ("name", "category", "item_id")
# tantivy's stemmers (Filter.stemmer), or none.
STEMMERS = ("none", "arabic", "danish", "dutch", "english", "finnish", "french", "german", "greek", "hungarian",
            "italian", "norwegian", "portuguese", "romanian", "russian", "spanish", "swedish", "tamil", "turkish")


class SearchWeights(Strict):
    """The blend a result is ranked by. Each part is scaled to 0..1 over the matches of the query (text,
    model) or over the catalogue (the popularities), then weighted; the defaults were tuned on Online Retail II
    (`bench/bench_search.py`, bench/RESULTS.md)."""

    text: float = Field(default=1.0, ge=0, description="BM25 of the query in the item's fields.")
    model: float = Field(default=0.25, ge=0, description="The customer's model score for the item (their live factor).")
    popularity: float = Field(default=0.0, ge=0, description="Distinct customers of the item, all history (log scale).")
    recent: float = Field(default=2.0, ge=0, description="Distinct customers in the last `recent_days` (log scale).")

    @model_validator(mode="after")
    def _something(self) -> SearchWeights:
        if not (self.text or self.model or self.popularity or self.recent):
            raise ValueError("search.weights: at least one weight must be positive")
        return self


class SearchConfig(Strict):
    enabled: bool = Field(default=True, description="Write the index with the lists and answer GET /v1/search.")
    index_dir: str | None = Field(
        default=None, description="A local directory for the index versions; default <warehouse>/_search.")
    fields: dict[str, float] = Field(
        default_factory=lambda: {"name": 1.0, "category": 0.5, "item_id": 2.0},
        description="Indexed fields and their boosts: name, category (words) and item_id (the exact key).")
    stemmer: Literal[STEMMERS] = Field(default="english", description="Word stems: 'bags' finds 'bag'.")
    ascii_fold: bool = Field(default=True, description="'café' finds 'cafe'.")
    candidates: int = Field(default=1000, ge=1, le=100_000, description="Text matches re-ranked per query.")
    weights: SearchWeights = SearchWeights()
    recent_days: float = Field(default=28.0, gt=0, description="The window of the recent popularity.")
    show_purchased: bool = Field(
        default=True, description="Items the customer bought stay in their results: people search to buy again.")
    max_query_length: int = Field(default=200, ge=1, le=10_000, description="Longer queries are refused (422).")
    keep_versions: int = Field(default=3, ge=1, description="Index versions kept on disk (a server may read an older one).")

    @field_validator("fields")
    @classmethod
    def _known_fields(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(v) - set(SEARCH_FIELDS))
        if unknown:
            raise ValueError(f"unknown search field(s) {unknown}; allowed: {list(SEARCH_FIELDS)}")
        if not any(b > 0 for b in v.values()):
            raise ValueError("search.fields needs at least one field with a positive boost")
        if any(b < 0 for b in v.values()):
            raise ValueError("search.fields: boosts must be >= 0")
        return v
