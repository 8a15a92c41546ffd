"""Product search: a full-text index of the catalogue, and the blend that orders a query's matches for a customer.

The text half is tantivy's (BM25 over analysed fields), never a hand-written
scorer. An index version is a directory named by the digest of what went into
it (the documents and the analysis settings), written beside and then renamed
into place, so a reader sees a whole version or none, and a run whose
catalogue did not change reuses the version it finds. The settings travel
with the version (`INDEX_META`): a server opens an index with the analysis it
was built with, whatever its own config says since.

What a query's words reach (typos, the word being typed, synonyms) and which
of them each match holds is `core.matching`'s, over the index's own
vocabulary: the index is asked for those catalogue words, with a constant
score per query word matched, so its best `limit` matches are those with the
most of the query's words (`Index.find`).

The other half is `blend`: numpy over the matches, the same function for the
route and for the offline protocol that tunes its weights; `order` puts the
matching rules' tiers (the exact key, then words matched, then fewer typos)
ahead of it.
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

from sparkrec.core import matching
from sparkrec.core.config import SearchConfig, SearchWeights

log = logging.getLogger(__name__)

INDEX_META = "sparkrec-index.json"
ITEM = "item_idx"  # the document's item id (a fast field: read for many hits at once)
CATEGORY_KEY = "category_key"  # the category as one exact term, for the category filter
WORDS = "sparkrec_words"
KEY = "sparkrec_key"
PLAIN = "plain"  # the words as typed: WORDS without the stemmer (never an index field; the vocabulary's analysis)
DOCUMENTS = "documents.parquet"  # the indexed documents, beside the index: the vocabulary is built from them
MAX_TERMS = 32  # a query's distinct words searched (the rest are ignored; a 10 kB query is refused before)
LAYOUT = 2  # the index's own layout; part of the digest, so a change rebuilds
WORD_MATCHED = 1000.0  # the constant score of each query word a document holds: more words always rank higher
KEY_MATCHED = WORD_MATCHED * (MAX_TERMS + 1)  # the exact key above any number of words
KIND_BOOST = {matching.EXACT: 1.0, matching.PREFIX: 0.6, matching.TYPO: 0.4}  # BM25 of a completion or typo, damped


def settings_of(cfg: SearchConfig) -> dict[str, Any]:
    """What the index's content and its matching depend on besides the documents (the synonyms file's groups, not
    its path: a changed file is a new version)."""
    groups = matching.read_synonyms(cfg.synonyms) if cfg.synonyms else []
    return {"layout": LAYOUT, "fields": dict(sorted(cfg.fields.items())), "stemmer": cfg.stemmer, "ascii_fold": cfg.ascii_fold,
            "matching": {"typos": cfg.typos.model_dump(), "prefix": cfg.prefix.model_dump(), "synonyms": groups}}


def _analyzers(settings: dict[str, Any]) -> dict[str, tantivy.TextAnalyzer]:
    def words(stem: bool) -> tantivy.TextAnalyzer:
        b = tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.simple()).filter(tantivy.Filter.remove_long(40))
        b = b.filter(tantivy.Filter.lowercase())
        if settings["ascii_fold"]:
            b = b.filter(tantivy.Filter.ascii_fold())
        if stem and settings["stemmer"] != "none":
            b = b.filter(tantivy.Filter.stemmer(settings["stemmer"]))
        return b.build()

    key = tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.raw()).filter(tantivy.Filter.lowercase())
    return {WORDS: words(True), KEY: key.build(), PLAIN: words(False)}


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
            if name != PLAIN:
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
        docs[["item_idx", "item_id", "name", "category"]].to_parquet(tmp / DOCUMENTS, index=False)
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


@dataclass
class Found:
    """A query's matches (best first as the index ranks them: most words, then BM25) and how each matched."""

    expanded: list[matching.Word]  # the query's words (as typed: analysed, not stemmed) and what each reaches
    item_idx: np.ndarray  # int64
    text: np.ndarray  # float32: BM25 of the matched catalogue words (completions and typos damped)
    kinds: np.ndarray  # int8 (matches, words): matching.EXACT, PREFIX, TYPO or NONE per query word
    key: np.ndarray  # bool: the query is exactly the item's key

    @property
    def words(self) -> list[str]:
        return [w.text for w in self.expanded]

    @property
    def matched(self) -> np.ndarray:
        """How many of the query's words each match holds."""
        return (self.kinds > matching.NONE).sum(axis=1)

    @property
    def typos(self) -> np.ndarray:
        """How many of the query's words each match holds only through a typo."""
        return (self.kinds == matching.TYPO).sum(axis=1)

    def take(self, keep: np.ndarray) -> Found:
        return Found(self.expanded, self.item_idx[keep], self.text[keep], self.kinds[keep], self.key[keep])


def _empty(words: list[matching.Word]) -> Found:
    return Found(words, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32),
                 np.zeros((0, len(words)), dtype=np.int8), np.zeros(0, dtype=bool))


class Index:
    """One opened index version, read-only: the words of a query to its matches, their BM25 and how they matched.

    Memory: tantivy maps its files; the vocabulary (`matching.Vocabulary`) holds
    each distinct word once and four bytes per word of each item's name and
    category; the item keys, analysed, for the exact-key rule.
    """

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        meta = path / INDEX_META
        if not meta.exists():
            raise FileNotFoundError(f"no search index at {path} (its {INDEX_META} is missing)")
        self.meta = json.loads(meta.read_text())
        self.path, self.digest = str(path), self.meta["digest"]
        self.settings = self.meta["settings"]
        if self.settings.get("layout") != LAYOUT:
            raise ValueError(f"the index at {path} has layout {self.settings.get('layout')}, this sparkrec reads "
                             f"{LAYOUT}: run the batch once more to rebuild it")
        self._analyzers = _analyzers(self.settings)
        self._index = tantivy.Index.open(str(path))
        for name, analyzer in self._analyzers.items():
            if name != PLAIN:
                self._index.register_tokenizer(name, analyzer)
        self._schema = self._index.schema
        self._searcher = self._index.searcher()  # the version never changes: one searcher serves every query
        self.documents = self._searcher.num_docs
        self.boosts = {k: float(v) for k, v in self.settings["fields"].items() if v > 0}
        self.rules = self.settings["matching"]
        self._word_fields = [f for f in self.boosts if f != "item_id"]
        self._stems: dict[str, str] = {}
        self.synonyms = matching.synonym_map(self.rules["synonyms"], self._analyzers[PLAIN].analyze)
        docs = pd.read_parquet(path / DOCUMENTS).sort_values("item_idx", kind="stable")
        self._item_idx = docs["item_idx"].to_numpy(np.int64)
        plain = self._analyzers[PLAIN].analyze
        rows = [[w for v in r if isinstance(v, str) for w in plain(v)]
                for r in docs[self._word_fields].itertuples(index=False, name=None)]
        self.vocabulary = matching.Vocabulary.build(rows, self.stem)
        keys = self._analyzers[KEY].analyze
        self._keys = np.array([(keys(k) or [""])[0] if isinstance(k, str) else "" for k in docs["item_id"].tolist()],
                              dtype=object)

    def stem(self, word: str) -> str:
        """A typed word's index term (cached: the vocabulary's words and the queries' words repeat)."""
        out = self._stems.get(word)
        if out is None:
            out = (self._analyzers[WORDS].analyze(word) or [word])[0]
            if len(self._stems) < 1_000_000:
                self._stems[word] = out
        return out

    def words(self, text: str) -> list[str]:
        """The query's distinct words as typed (analysed without stemming), the first `MAX_TERMS`."""
        seen: dict[str, None] = {}
        for t in self._analyzers[PLAIN].analyze(text):
            seen.setdefault(t, None)
            if len(seen) == MAX_TERMS:
                break
        return list(seen)

    def expand(self, text: str) -> list[matching.Word]:
        """Each query word and the catalogue words it stands for (`matching.expand`); the last word is still being
        typed unless a blank follows it."""
        typing = bool(text) and not text[-1].isspace()
        return matching.expand(self.words(text), typing, self.vocabulary, self.rules, self.stem, self.synonyms)

    def _key(self, text: str) -> str | None:
        if "item_id" not in self.boosts:
            return None
        key = self._analyzers[KEY].analyze(text.strip())
        return key[0] if key else None

    def query(self, words: list[matching.Word], key: str | None, category: str | None = None) -> tantivy.Query | None:
        """The query: each word's catalogue words in every word field (BM25, boosted by field and by how they
        matched), a constant per query word held, and the exact key; plain terms only, whatever the text held."""
        parts = []
        for w in words:
            clauses = []
            for term, kind in w.terms(self.vocabulary).items():
                for name in self._word_fields:
                    q = tantivy.Query.term_query(self._schema, name, term)
                    boost = self.boosts[name] * KIND_BOOST[kind]
                    clauses.append((tantivy.Occur.Should, q if boost == 1 else tantivy.Query.boost_query(q, boost)))
            if clauses:
                word = tantivy.Query.boolean_query(clauses)
                parts += [(tantivy.Occur.Should, word),
                          (tantivy.Occur.Should, tantivy.Query.const_score_query(word, WORD_MATCHED))]
        if key is not None:
            q = tantivy.Query.term_query(self._schema, "item_id", key)
            parts += [(tantivy.Occur.Should, tantivy.Query.boost_query(q, self.boosts["item_id"])),
                      (tantivy.Occur.Should, tantivy.Query.const_score_query(q, KEY_MATCHED))]
        if not parts:
            return None
        q = tantivy.Query.boolean_query(parts)
        if category is not None:
            q = tantivy.Query.boolean_query([(tantivy.Occur.Must, q), (tantivy.Occur.Must, tantivy.Query.term_query(
                self._schema, CATEGORY_KEY, category))])
        return q

    def find(self, text: str, limit: int, category: str | None = None) -> Found:
        """The best `limit` matches of `text` (most query words held, then BM25) and how each matched."""
        words = self.expand(text)
        key = self._key(text)
        q = self.query(words, key, category)
        if q is None:
            return _empty(words)
        hits = self._searcher.search(q, limit, count=False).hits
        if not hits:
            return _empty(words)
        score = np.fromiter((h[0] for h in hits), dtype=np.float64, count=len(hits))
        ids = np.asarray(self._searcher.fast_field_values(ITEM, [h[1] for h in hits]), dtype=np.int64)
        rows = np.searchsorted(self._item_idx, ids)
        kinds = matching.kinds(words, self.vocabulary, rows)
        is_key = (self._keys[rows] == key) if key is not None else np.zeros(len(rows), dtype=bool)
        held = (kinds > matching.NONE).sum(axis=1)
        text_score = np.maximum(score - WORD_MATCHED * held - KEY_MATCHED * is_key, 0.0).astype(np.float32)
        return Found(words, ids, text_score, kinds, is_key)

    def match(self, text: str, limit: int, category: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(item ids, BM25) of the best `limit` matches, best first; empty when nothing matches."""
        found = self.find(text, limit, category)
        return found.item_idx, found.text

    def completions(self, found: Found, n: int) -> list[str]:
        """Whole queries completing the last word of `found`'s query, in the order of its matches as given
        (`matching.completions`)."""
        rows = np.searchsorted(self._item_idx, found.item_idx)
        return matching.completions(found.expanded, self.vocabulary, rows, n)


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


def order(score: np.ndarray, item_idx: np.ndarray, n: int, tiers: tuple[np.ndarray, ...] = ()) -> np.ndarray:
    """Positions of the best `n`: by each tier (higher first, the first tier most significant), then by score, ties
    to the smaller item id (deterministic)."""
    return np.lexsort((item_idx, -score, *(-np.asarray(t, dtype=np.float64) for t in reversed(tiers))))[:n]


def tiers(found: Found, cfg: SearchConfig) -> tuple[np.ndarray, ...]:
    """The matching rules' tiers, ahead of any score: the exact key (`key_first`), then the query words held and
    fewer typos (`words_first`)."""
    out: tuple[np.ndarray, ...] = ()
    if cfg.key_first:
        out += (found.key.astype(np.int64),)
    if cfg.words_first:
        out += (found.matched, -found.typos)
    return out


def log_scaled(counts: np.ndarray) -> np.ndarray:
    """Popularity counts to 0..1 on a log scale over the whole catalogue (the most popular item is 1)."""
    c = np.log1p(np.maximum(np.nan_to_num(np.asarray(counts, dtype=np.float64)), 0.0))
    top = c.max() if len(c) else 0.0
    return c / top if top > 0 else np.zeros(len(c))
