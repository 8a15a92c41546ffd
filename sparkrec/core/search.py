"""Product search: a full-text index of the catalogue, and the blend that orders a query's matches for a customer.

The text half is tantivy's (BM25 over analysed fields), never a hand-written
scorer. An index version is a directory named by the digest of what went into
it (the documents and the analysis settings), written beside and then renamed
into place, so a reader sees a whole version or none, and a run whose
catalogue did not change reuses the version it finds. The settings travel
with the version (`INDEX_META`): a server opens an index with the analysis it
was built with, whatever its own config says since.

The other half is `blend`: numpy over the matches, the same function for the
route and for the offline protocol that tunes its weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tantivy

from sparkrec.core.config import SearchConfig, SearchWeights

log = logging.getLogger(__name__)

INDEX_META = "sparkrec-index.json"
ITEM = "item_idx"  # the document's item id (a fast field: read for many hits at once)
CATEGORY_KEY = "category_key"  # the category as one exact term, for the category filter
WORDS = "sparkrec_words"
KEY = "sparkrec_key"
MAX_TERMS = 32  # a query's distinct words searched (the rest are ignored; a 10 kB query is refused before)
LAYOUT = 1  # the index's own layout; part of the digest, so a change rebuilds


def settings_of(cfg: SearchConfig) -> dict[str, Any]:
    """What the index's content depends on besides the documents."""
    return {"layout": LAYOUT, "fields": dict(sorted(cfg.fields.items())), "stemmer": cfg.stemmer, "ascii_fold": cfg.ascii_fold}


def _analyzers(settings: dict[str, Any]) -> dict[str, tantivy.TextAnalyzer]:
    words = tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.simple()).filter(tantivy.Filter.remove_long(40))
    words = words.filter(tantivy.Filter.lowercase())
    if settings["ascii_fold"]:
        words = words.filter(tantivy.Filter.ascii_fold())
    if settings["stemmer"] != "none":
        words = words.filter(tantivy.Filter.stemmer(settings["stemmer"]))
    key = tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.raw()).filter(tantivy.Filter.lowercase())
    return {WORDS: words.build(), KEY: key.build()}


def _schema(settings: dict[str, Any]) -> tantivy.Schema:
    b = tantivy.SchemaBuilder()
    b.add_integer_field(ITEM, stored=False, indexed=False, fast=True)
    for name in settings["fields"]:
        b.add_text_field(name, stored=False, tokenizer_name=KEY if name == "item_id" else WORDS)
    b.add_text_field(CATEGORY_KEY, stored=False, tokenizer_name="raw", index_option="basic")
    return b.build()


def digest(docs: pd.DataFrame, settings: dict[str, Any]) -> str:
    """The version's name: a hash of the documents (item id, key, name, category) and the settings."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    ordered = docs.sort_values("item_idx", kind="stable")
    for col in ("item_idx", "item_id", "name", "category"):
        h.update(col.encode())
        h.update(json.dumps([None if v is None or v != v else (int(v) if col == "item_idx" else str(v))
                             for v in ordered[col].tolist()]).encode())
    return h.hexdigest()[:20]


@dataclass
class Built:
    path: str
    digest: str
    documents: int
    reused: bool

    def record(self) -> dict[str, Any]:
        return {"path": self.path, "digest": self.digest, "documents": self.documents, "reused": self.reused}


def build(root: str | Path, docs: pd.DataFrame, cfg: SearchConfig) -> Built:
    """Write the index of `docs` (item_idx, item_id, name, category: the items a search may show) under `root`.

    A version with the same digest already there is reused as it is. Older
    versions beyond `cfg.keep_versions` are removed (a server still reading one
    keeps its open files until it swaps).
    """
    settings = settings_of(cfg)
    d = digest(docs, settings)
    root = Path(root)
    final = root / d
    if (final / INDEX_META).exists():
        log.info("search index %s unchanged (%d documents): reused", d, len(docs))
        return Built(str(final), d, len(docs), True)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".building-{d}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        started = time.monotonic()
        index = tantivy.Index(_schema(settings), path=str(tmp))
        for name, analyzer in _analyzers(settings).items():
            index.register_tokenizer(name, analyzer)
        writer = index.writer(heap_size=64_000_000, num_threads=1)
        fields = list(settings["fields"])
        for row in docs.itertuples(index=False):
            doc = tantivy.Document()
            doc.add_integer(ITEM, int(row.item_idx))
            for name in fields:
                value = getattr(row, name)
                if isinstance(value, str) and value:
                    doc.add_text(name, value)
            if isinstance(row.category, str) and row.category:
                doc.add_text(CATEGORY_KEY, row.category)
            writer.add_document(doc)
        writer.commit()
        writer.wait_merging_threads()
        (tmp / INDEX_META).write_text(json.dumps({"digest": d, "settings": settings, "documents": len(docs),
                                                  "built_at": time.time()}, indent=2))
        try:
            os.rename(tmp, final)
        except OSError:  # another run wrote the same version first: theirs stands
            if not (final / INDEX_META).exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            return Built(str(final), d, len(docs), True)
        log.info("search index %s written: %d documents in %.1f s", d, len(docs), time.monotonic() - started)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(root, cfg.keep_versions, keep=d)
    return Built(str(final), d, len(docs), False)


def prune(root: Path, versions: int, keep: str) -> None:
    """Remove all but the newest `versions` index versions (never `keep`), and building leftovers of a crash."""
    found = []
    for child in root.iterdir():
        meta = child / INDEX_META
        if child.name.startswith(".building-") and time.time() - child.stat().st_mtime > 3600:
            shutil.rmtree(child, ignore_errors=True)
        elif meta.exists() and child.name != keep:
            found.append((meta.stat().st_mtime, child))
    for _, child in sorted(found, reverse=True)[max(0, versions - 1):]:
        shutil.rmtree(child, ignore_errors=True)


class Index:
    """One opened index version, read-only: the words of a query to its matches and their BM25."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        meta = path / INDEX_META
        if not meta.exists():
            raise FileNotFoundError(f"no search index at {path} (its {INDEX_META} is missing)")
        self.meta = json.loads(meta.read_text())
        self.path, self.digest = str(path), self.meta["digest"]
        self.settings = self.meta["settings"]
        self._analyzers = _analyzers(self.settings)
        self._index = tantivy.Index.open(str(path))
        for name, analyzer in self._analyzers.items():
            self._index.register_tokenizer(name, analyzer)
        self._schema = self._index.schema
        self._searcher = self._index.searcher()  # the version never changes: one searcher serves every query
        self.documents = self._searcher.num_docs
        self.boosts = {k: float(v) for k, v in self.settings["fields"].items() if v > 0}

    def terms(self, text: str) -> list[str]:
        """The query's distinct words as the index analysed its documents (the first `MAX_TERMS`)."""
        seen: dict[str, None] = {}
        for t in self._analyzers[WORDS].analyze(text):
            seen.setdefault(t, None)
            if len(seen) == MAX_TERMS:
                break
        return list(seen)

    def query(self, text: str, category: str | None = None) -> tantivy.Query | None:
        """The query as plain words: no field prefixes, quotes, wildcards or operators, whatever `text` holds."""
        parts = []
        for term in self.terms(text):
            for name, boost in self.boosts.items():
                if name != "item_id":
                    q = tantivy.Query.term_query(self._schema, name, term)
                    parts.append((tantivy.Occur.Should, q if boost == 1 else tantivy.Query.boost_query(q, boost)))
        if "item_id" in self.boosts:
            key = self._analyzers[KEY].analyze(text.strip())
            if key:
                q = tantivy.Query.term_query(self._schema, "item_id", key[0])
                parts.append((tantivy.Occur.Should, tantivy.Query.boost_query(q, self.boosts["item_id"])))
        if not parts:
            return None
        q = tantivy.Query.boolean_query(parts)
        if category is not None:
            q = tantivy.Query.boolean_query([(tantivy.Occur.Must, q), (tantivy.Occur.Must, tantivy.Query.term_query(
                self._schema, CATEGORY_KEY, category))])
        return q

    def match(self, text: str, limit: int, category: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(item ids, BM25) of the best `limit` matches, best first; empty when nothing matches."""
        q = self.query(text, category)
        if q is None:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        hits = self._searcher.search(q, limit, count=False).hits
        if not hits:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        score = np.fromiter((h[0] for h in hits), dtype=np.float32, count=len(hits))
        ids = np.asarray(self._searcher.fast_field_values(ITEM, [h[1] for h in hits]), dtype=np.int64)
        return ids, score


def scaled(values: np.ndarray, known: np.ndarray | None = None) -> np.ndarray:
    """0..1 over the values (min to max); unknown values and a constant set give 0."""
    out = np.zeros(len(values), dtype=np.float64)
    mask = np.ones(len(values), dtype=bool) if known is None else known
    if not mask.any():
        return out
    v = values[mask].astype(np.float64)
    lo, hi = v.min(), v.max()
    if hi > lo:
        out[mask] = (v - lo) / (hi - lo)
    return out


@dataclass
class Parts:
    """A query's matches and what each is ranked by (all arrays aligned with `item_idx`)."""

    item_idx: np.ndarray
    text: np.ndarray  # BM25
    model: np.ndarray | None  # the customer's model score (None: no customer factor)
    popularity: np.ndarray  # 0..1, log scale over the catalogue
    recent: np.ndarray  # 0..1, log scale over the catalogue


def blend(parts: Parts, w: SearchWeights) -> np.ndarray:
    """The ranking score: each part scaled to 0..1, weighted and summed.

    The text is scaled by the best match's BM25 (not min to max: matches that
    differ only by their names' lengths stay close); the model score min to max
    over the matches (a dot product has no natural zero); the popularities come
    scaled over the catalogue. Without a model score (a stranger, or no
    customer) the model's weight is simply absent: the non-personal ranking.
    """
    top = float(parts.text.max()) if len(parts.text) else 0.0
    text = parts.text / top if top > 0 else np.zeros(len(parts.text))
    score = w.text * text + w.popularity * parts.popularity + w.recent * parts.recent
    if parts.model is not None and w.model:
        known = np.isfinite(parts.model)
        score = score + w.model * scaled(np.where(known, parts.model, 0.0), known)
    return score


def order(score: np.ndarray, item_idx: np.ndarray, n: int) -> np.ndarray:
    """Positions of the best `n` by score, ties to the smaller item id (deterministic)."""
    return np.lexsort((item_idx, -score))[:n]


def log_scaled(counts: np.ndarray) -> np.ndarray:
    """Popularity counts to 0..1 on a log scale over the whole catalogue (the most popular item is 1)."""
    c = np.log1p(np.maximum(np.nan_to_num(np.asarray(counts, dtype=np.float64)), 0.0))
    top = c.max() if len(c) else 0.0
    return c / top if top > 0 else np.zeros(len(c))
