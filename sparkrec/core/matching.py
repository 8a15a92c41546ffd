"""What a shopper's words match in the catalogue: whole words, synonyms, the word still being typed, and typos.

Every word a query can reach is a word of the catalogue. The index's own
vocabulary (`Vocabulary`: each distinct word of the items' names and
categories as a shopper would type it, with its stem and the items holding it)
turns each query word into the catalogue words it stands for (`expand`): the
same stem or a synonym (exact), a completion of the last word (prefix), or a
word within the allowed edits (a typo). The index is then asked for exactly
those words, so a typo'd match is scored by BM25 like any other and, for each
match, it is known which of the query's words it holds and how (`kinds`).

Typos are found by tantivy's FuzzyTermQuery (a Levenshtein automaton, a
transposition counting one edit as in Algolia and Typesense) over a small
in-memory index of the vocabulary's words, not over the catalogue: on the
catalogue it gives every fuzzy hit the same constant score and cannot tell
which of a query's words a document matched, and the ranking needs both (more
words matched first, exact before typo). rapidfuzz then orders the few words
found by their edit distance (optimal string alignment, tantivy's measure).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import tantivy
from rapidfuzz import process
from rapidfuzz.distance import OSA

NONE, TYPO, PREFIX, EXACT = 0, 1, 2, 3  # how a query word matched an item (higher is better)
KIND_NAMES = {NONE: "none", TYPO: "typo", PREFIX: "prefix", EXACT: "exact"}


def read_synonyms(path: str | Path) -> list[list[str]]:
    """Groups of equivalent words from a synonyms file: one group a line, comma-separated, `#` starts a comment.

    Raises:
        ValueError: the file cannot be read, or a line is not a group of two or more single words
            (the message names the file and line).
    """
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the synonyms file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    groups = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        words = [w.strip().lower() for w in line.split(",") if w.strip()]
        bad = [w for w in words if not w.replace("-", "").replace("'", "").isalnum() or " " in w]
        if bad:
            raise ValueError(f"{path}, line {number}: {bad[0]!r} is not one word (a group is single words separated "
                             "by commas, e.g. 'xmas, christmas')")
        if len(set(words)) < 2:
            raise ValueError(f"{path}, line {number}: a group needs two or more words separated by commas")
        groups.append(sorted(set(words)))
    return groups


def synonym_map(groups: list[list[str]], plain: Callable[[str], list[str]]) -> dict[str, list[str]]:
    """Each word (as the index analyses typed words) to the other words of its groups."""
    out: dict[str, set[str]] = {}
    for group in groups:
        words = [t for w in group for t in plain(w)[:1]]
        for w in words:
            out.setdefault(w, set()).update(x for x in words if x != w)
    return {w: sorted(others) for w, others in out.items()}


@dataclass
class Vocabulary:
    """The catalogue's distinct words as typed (lowercased and folded, not stemmed), sorted, and where they occur.

    Memory: one entry per distinct word (tens of thousands for a large catalogue)
    and four bytes per word occurrence of the items' searchable fields.
    """

    words: np.ndarray  # str, sorted
    stem: np.ndarray  # int32: each word's stem id
    stems: np.ndarray  # str: the stems, sorted (the index's terms)
    items: np.ndarray  # int32: how many items hold each word
    indptr: np.ndarray  # int64: row r's words are word_ids[indptr[r]:indptr[r + 1]]
    word_ids: np.ndarray  # int32
    stem_id: dict[str, int]  # a stem's position in `stems`
    fuzzy: tuple | None = None  # (schema, searcher) of the words' own index: one document per word, its id a fast field

    @classmethod
    def build(cls, rows: list[list[str]], stem_of: Callable[[str], str]) -> Vocabulary:
        """From each row's typed words (a document's searchable fields, analysed without stemming)."""
        words = np.array(sorted({w for r in rows for w in r}), dtype=object)
        lookup = {w: i for i, w in enumerate(words.tolist())}
        stem_text = [stem_of(w) for w in words.tolist()]
        stems = np.array(sorted(set(stem_text)), dtype=object)
        stem_lookup = {s: i for i, s in enumerate(stems.tolist())}
        per_row = [sorted({lookup[w] for w in r}) for r in rows]
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        indptr[1:] = np.cumsum([len(r) for r in per_row])
        word_ids = np.fromiter((i for r in per_row for i in r), dtype=np.int32, count=int(indptr[-1]))
        items = np.bincount(word_ids, minlength=len(words)).astype(np.int32)
        stem = np.array([stem_lookup[s] for s in stem_text], dtype=np.int32)
        return cls(words, stem, stems, items, indptr, word_ids, stem_lookup, _words_index(words.tolist()))

    def within(self, word: str, edits: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, edit distances) of the words within `edits` of `word`, at most `limit`: nearest, then in the most
        items, then alphabetical."""
        if self.fuzzy is None or not edits:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int32)
        schema, searcher = self.fuzzy
        q = tantivy.Query.fuzzy_term_query(schema, "w", word, distance=edits, transposition_cost_one=True)
        hits = searcher.search(q, 10_000, count=False).hits
        if not hits:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int32)
        ids = np.asarray(searcher.fast_field_values("i", [h[1] for h in hits]), dtype=np.int64)
        dist = process.cdist([word], self.words[ids].tolist(), scorer=OSA.distance, dtype=np.int32, workers=1)[0]
        order = np.lexsort((self.words[ids], -self.items[ids], dist))[:limit]
        return ids[order], dist[order]

    def starting_with(self, prefix: str) -> np.ndarray:
        """Ids of the words that start with `prefix` (a range of the sorted words)."""
        lo = int(np.searchsorted(self.words, prefix, side="left"))
        hi = int(np.searchsorted(self.words, prefix + "\U0010ffff", side="left"))
        return np.arange(lo, hi, dtype=np.int64)


def _words_index(words: list[str]) -> tuple | None:
    """An in-memory tantivy index of `words` for their fuzzy search (a word per document, as one raw term)."""
    if not words:
        return None
    b = tantivy.SchemaBuilder()
    b.add_text_field("w", stored=False, tokenizer_name="raw", index_option="basic")
    b.add_integer_field("i", stored=False, indexed=False, fast=True)
    schema = b.build()
    index = tantivy.Index(schema)
    writer = index.writer(heap_size=15_000_000, num_threads=1)
    for i, w in enumerate(words):
        doc = tantivy.Document()
        doc.add_text("w", w)
        doc.add_integer("i", i)
        writer.add_document(doc)
    writer.commit()
    writer.wait_merging_threads()
    index.reload()
    return schema, index.searcher()


@dataclass
class Word:
    """One query word and the catalogue words it stands for, each with how it matched (`EXACT`, `PREFIX`, `TYPO`)."""

    text: str
    ids: np.ndarray  # int64 word ids
    kind: np.ndarray  # int8, aligned with ids

    def terms(self, vocab: Vocabulary) -> dict[str, int]:
        """The index terms (stems) to search and the best kind each carries."""
        out: dict[str, int] = {}
        for stem, kind in zip(vocab.stems[vocab.stem[self.ids]].tolist(), self.kind.tolist()):
            out[stem] = max(out.get(stem, NONE), kind)
        return out


def allowed_edits(word: str, rules: dict[str, Any]) -> int:
    typos = rules["typos"]
    if not typos["enabled"]:
        return 0
    n = len(word)
    return 2 if n >= typos["two_typos_letters"] else 1 if n >= typos["one_typo_letters"] else 0


def expand(words: list[str], typing: bool, vocab: Vocabulary, rules: dict[str, Any], stem_of: Callable[[str], str],
           synonyms: dict[str, list[str]]) -> list[Word]:
    """The catalogue words each query word stands for.

    Exact: a word with the same stem ('bags' for 'bag'), or a synonym's. Prefix:
    when `typing` (no blank after the last word), the last word's completions,
    those in the most items first. Typo: the other words within its allowed
    edits, nearest then commonest (as Algolia and Meilisearch do: a typo can
    make a real word, 'hear' for 'heart'; the ranking puts fewer typos first). A
    word that stands for nothing is kept (it counts in the share of words
    matched) with no ids.
    """
    stem_index = vocab.stem_id
    out = []
    for n, w in enumerate(words):
        kinds: dict[int, int] = {}
        wanted = {stem_of(w)} | {stem_of(s) for s in synonyms.get(w, ())}
        sids = [stem_index[s] for s in wanted if s in stem_index]
        if sids:
            for i in np.flatnonzero(np.isin(vocab.stem, sids)).tolist():
                kinds[i] = EXACT
        prefix = rules["prefix"]
        if typing and n == len(words) - 1 and prefix["enabled"] and len(w) >= prefix["min_letters"]:
            ids = vocab.starting_with(w)
            if len(ids) > prefix["max_words"]:
                ids = ids[np.lexsort((ids, -vocab.items[ids]))[:prefix["max_words"]]]
            for i in ids.tolist():
                kinds.setdefault(i, PREFIX)
        edits = allowed_edits(w, rules)
        if edits:
            ids, _ = vocab.within(w, edits, rules["typos"]["max_words"] + len(kinds))
            for i in ids.tolist():
                kinds.setdefault(i, TYPO)
        ids = np.fromiter(kinds, dtype=np.int64, count=len(kinds))
        out.append(Word(w, ids, np.fromiter(kinds.values(), dtype=np.int8, count=len(kinds))))
    return out


def kinds(words: list[Word], vocab: Vocabulary, rows: np.ndarray) -> np.ndarray:
    """(len(rows), len(words)) int8: how each row (a document of the vocabulary) matched each query word: the best
    kind among the row's words whose stem one of the query word's catalogue words has."""
    out = np.zeros((len(rows), len(words)), dtype=np.int8)
    if not len(rows) or not words:
        return out
    starts, ends = vocab.indptr[rows], vocab.indptr[rows + 1]
    lengths = ends - starts
    flat = np.concatenate([vocab.word_ids[s:e] for s, e in zip(starts.tolist(), ends.tolist())]) if lengths.sum() else \
        np.zeros(0, dtype=np.int32)
    owner = np.repeat(np.arange(len(rows)), lengths)
    stems = vocab.stem[flat]
    for j, w in enumerate(words):
        if not len(w.ids):
            continue
        # By stem, as the index searches: 'handle' reached by a typo also reaches an item whose word is 'handl'.
        table = np.zeros(len(vocab.stems), dtype=np.int8)
        np.maximum.at(table, vocab.stem[w.ids], w.kind)
        np.maximum.at(out[:, j], owner, table[stems])
    return out


def completions(words: list[Word], vocab: Vocabulary, rows: np.ndarray, n: int) -> list[str]:
    """Up to `n` whole queries that complete the last word: the earlier words as typed, then a catalogue word the
    last one stands for. In the order of the first of the ranked `rows` (the matches, best first) holding it, then
    the rest by how they matched and how many items hold them; one word per stem ('lantern', not also 'lanterns')."""
    if not words or not len(words[-1].ids) or n <= 0:
        return []
    last = words[-1]
    kind_of = dict(zip(last.ids.tolist(), last.kind.tolist()))
    picked: list[int] = []
    stems: set[int] = set()

    def add(i: int) -> None:
        if int(vocab.stem[i]) not in stems:
            stems.add(int(vocab.stem[i]))
            picked.append(i)

    for r in rows.tolist():
        for i in vocab.word_ids[vocab.indptr[r]:vocab.indptr[r + 1]].tolist():
            if i in kind_of:
                add(i)
        if len(picked) >= n:
            break
    for i in sorted(kind_of, key=lambda i: (-kind_of[i], -int(vocab.items[i]), vocab.words[i])):
        if len(picked) >= n:
            break
        add(i)
    head = " ".join(w.text for w in words[:-1])
    return [f"{head} {vocab.words[i]}".strip() for i in picked[:n]]
