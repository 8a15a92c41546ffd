"""The `search` section: the full-text index the recommend stage writes and `GET /v1/search` reads."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from sparkrec.core import matching
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


class TypoConfig(Strict):
    """Typo tolerance: a query word the catalogue does not hold finds the catalogue's words within a few edits
    (a transposition counts one edit), ranked below exact matches."""

    enabled: bool = Field(default=True, description="Find 'lanturn' as 'lantern'.")
    one_typo_letters: int = Field(default=5, ge=1, le=40, description="Words this long or longer allow one edit.")
    two_typos_letters: int = Field(default=9, ge=1, le=40, description="Words this long or longer allow two edits.")
    max_words: int = Field(default=20, ge=1, le=200,
                           description="At most this many catalogue words per typed word (the nearest, then the commonest).")

    @model_validator(mode="after")
    def _ordered(self) -> TypoConfig:
        if self.two_typos_letters < self.one_typo_letters:
            raise ValueError(f"search.typos.two_typos_letters ({self.two_typos_letters}) must be >= "
                             f"one_typo_letters ({self.one_typo_letters})")
        return self


class PrefixConfig(Strict):
    """The last word of a query is taken as the start of a word (a shopper still typing), unless a blank follows it."""

    enabled: bool = Field(default=True, description="'lant' finds 'lantern'.")
    min_letters: int = Field(default=1, ge=1, le=40, description="Shorter last words are matched only as whole words.")
    max_words: int = Field(default=50, ge=1, le=1000,
                           description="At most this many completions of the last word (those in the most items).")


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
    typos: TypoConfig = TypoConfig()
    prefix: PrefixConfig = PrefixConfig()
    synonyms: str | None = Field(
        default=None, description="A file of equivalent words, one group a line, comma-separated ('xmas, christmas').")
    words_first: bool = Field(
        default=True, description="Items matching more of the query's words come first, then those with fewer typos.")
    key_first: bool = Field(default=True, description="A query that is exactly an item's key shows that item first.")

    @field_validator("synonyms")
    @classmethod
    def _readable_synonyms(cls, v: str | None) -> str | None:
        if v is not None:
            matching.read_synonyms(v)  # a missing file or a bad line fails the config at start, naming the line
        return v

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
