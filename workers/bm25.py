"""An incremental BM25 keyword index kept in SQLite, so a query reads only the postings of its terms.

Documents are added and removed one at a time; document frequencies and lengths are
kept up to date, so scoring never scans the collection. The caller owns the
transaction (the index writes through the connection it is given).

Tokenization and the key a token is stored under live here and nowhere else:
``token_key`` is the one place to change when tokens are to be stored as keyed hashes.

The tables have their own version line (``SCHEMAS``, with the registry of ``schemas/``): opening an
index made by earlier code brings it to the latest version.
"""

from __future__ import annotations

import math
import re
import sqlite3
from collections import Counter
from collections.abc import Iterable

from bus.sealing import Blinder
from schemas.registry import SchemaRegistry, SchemaVersion, apply_all

_WORD = re.compile(r"\w+", re.UNICODE)
_STOPWORD_TEXT = """
a about above after again against all am an and any are as at be because been before being below between
both but by can could did do does doing down during each few for from further had has have having he her
here hers herself him himself his how i if in into is it its itself just me more most my myself no nor not
now of off on once only or other our ours ourselves out over own same she should so some such than that the
their theirs them themselves then there these they this those through to too under until up very was we
were what when where which while who whom why will with would you your yours yourself yourselves
"""
STOPWORDS = frozenset(_STOPWORD_TEXT.split())

V1_INDEX = SchemaVersion(1, "index", (
    """CREATE TABLE IF NOT EXISTS bm25_docs (
        doc INTEGER PRIMARY KEY,
        collection TEXT NOT NULL,
        doc_id TEXT NOT NULL,
        user_id TEXT,
        length INTEGER NOT NULL,
        UNIQUE (collection, doc_id))""",
    """CREATE TABLE IF NOT EXISTS bm25_postings (
        collection TEXT NOT NULL,
        term TEXT NOT NULL,
        doc INTEGER NOT NULL,
        tf INTEGER NOT NULL,
        PRIMARY KEY (collection, term, doc)) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS bm25_postings_by_doc ON bm25_postings (doc)",
    "CREATE INDEX IF NOT EXISTS bm25_docs_by_user ON bm25_docs (collection, user_id)",
    """CREATE TABLE IF NOT EXISTS bm25_terms (
        collection TEXT NOT NULL,
        term TEXT NOT NULL,
        df INTEGER NOT NULL,
        PRIMARY KEY (collection, term)) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS bm25_stats (
        collection TEXT PRIMARY KEY,
        docs INTEGER NOT NULL,
        total_length INTEGER NOT NULL)""",
), description="Documents, postings, document frequencies and collection sizes. IF NOT EXISTS: the index "
               "existed before it had versions, and an index made then is taken as version 1.")

V2_POSTING_LENGTH = SchemaVersion(2, "posting_length", (
    "ALTER TABLE bm25_postings ADD COLUMN length INTEGER NOT NULL DEFAULT 0",
    "UPDATE bm25_postings SET length = (SELECT d.length FROM bm25_docs d WHERE d.doc = bm25_postings.doc)",
), rollback=(
    "ALTER TABLE bm25_postings DROP COLUMN length",
), description="Each posting carries its document's length, so scoring reads no document row per posting "
               "(a common term has tens of thousands of postings at 100k documents).")

V3_CJK_BIGRAMS = SchemaVersion(3, "cjk_bigrams", (
    "CREATE TABLE IF NOT EXISTS bm25_retokenize (pending INTEGER NOT NULL)",
    "INSERT INTO bm25_retokenize VALUES (1)",
), rollback=(
    "DROP TABLE IF EXISTS bm25_retokenize",
), description="Chinese, Japanese and Korean text is indexed as overlapping pairs of characters (a sentence was "
               "one token that no query matched): the documents indexed before are indexed again once, by the "
               "chroma worker at its next start (``Bm25Index.retokenize_pending``).")

SCHEMAS = SchemaRegistry()
"""The index's own version line, kept apart from the libSQL store's (schemas.registry.REGISTRY): the index
lives in the chroma worker's sidecar database."""
SCHEMAS.register("bm25", [V1_INDEX, V2_POSTING_LENGTH, V3_CJK_BIGRAMS])


_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]+")
"""Kana, CJK ideographs and Hangul: scripts written without spaces between words (or, in Korean, with
particles joined to them), indexed as overlapping character pairs, as Lucene's CJK analyzer does."""


def tokenize(text: str) -> list[str]:
    """Lower-cased words without stopwords; a run of CJK characters as its overlapping pairs (東京都 -> 東京,
    京都), so that a word of two characters finds a sentence holding it."""
    out: list[str] = []
    for word in _WORD.findall(text.lower()):
        if word in STOPWORDS:
            continue
        if _CJK.search(word) is None:
            out.append(word)
            continue
        start = 0
        for run in _CJK.finditer(word):
            if run.start() > start:
                out.append(word[start:run.start()])
            chars = run.group()
            out += [chars] if len(chars) == 1 else [chars[i:i + 2] for i in range(len(chars) - 1)]
            start = run.end()
        if start < len(word):
            out.append(word[start:])
    return out


def has_cjk(text: str) -> bool:
    return _CJK.search(text) is not None


def token_key(token: str, blinder: Blinder | None = None) -> str:
    """The key a token is indexed and looked up under: its keyed hash when the store is encrypted."""
    return token if blinder is None else blinder.blind_text(token)


def terms(text: str, blinder: Blinder | None = None) -> list[str]:
    return [token_key(t, blinder) for t in tokenize(text)]


class Bm25Index:
    """Okapi BM25 (k1, b) over documents grouped in named collections."""

    def __init__(self, conn: sqlite3.Connection, *, k1: float = 1.2, b: float = 0.75,
                 blinder: Blinder | None = None) -> None:
        self.conn = conn
        self.k1 = k1
        self.b = b
        self.blinder = blinder
        """Tokens and user ids are stored as keyed hashes (keyed BLAKE2b, bus.sealing.Blinder) when given."""
        self._keys: dict[str, str] = {}

    def _user(self, user_id: str | None) -> str | None:
        return user_id if user_id is None or self.blinder is None else self.blinder.blind_text(user_id)

    def create(self) -> None:
        """Creates the index, or brings one made by earlier code to the latest version (no transaction may be
        open)."""
        apply_all(self.conn, SCHEMAS)

    def retokenize_pending(self) -> bool:
        """Whether documents indexed by an earlier tokenizer must be indexed again (``V3_CJK_BIGRAMS``)."""
        return self.conn.execute("SELECT 1 FROM bm25_retokenize LIMIT 1").fetchone() is not None

    def retokenized(self) -> None:
        self.conn.execute("DELETE FROM bm25_retokenize")

    def add(self, collection: str, doc_id: str, text: str, user_id: str | None = None) -> None:
        """Indexes ``text`` as ``doc_id``, replacing what was indexed under that id before."""
        self.write([(collection, doc_id, text, user_id)])

    def write(self, changes: Iterable[tuple[str, str, str | None, str | None]]) -> None:
        """Applies (collection, doc_id, text, user_id) changes in order, a text of None removing the document:
        the same index as ``add`` and ``remove`` one at a time, documents numbered alike, but the postings,
        document frequencies and sizes of all the added documents are written at the end, a few statements
        for a whole batch (per document they were most of indexing's SQLite time)."""
        changes = list(changes)
        indexed = self._indexed({(c, d) for c, d, _, _ in changes})
        added = _Added()
        for collection, doc_id, text, user_id in changes:
            if (collection, doc_id) in added.ids:
                added.write(self.conn)  # so that removing it finds its postings
                added = _Added()
            if (collection, doc_id) in indexed:
                self.remove(collection, doc_id)
            indexed.add((collection, doc_id))
            if text is None:
                continue
            counts = Counter(self._terms(text))
            length = sum(counts.values())
            doc = self.conn.execute(
                "INSERT INTO bm25_docs (collection, doc_id, user_id, length) VALUES (?, ?, ?, ?)",
                (collection, doc_id, self._user(user_id), length),
            ).lastrowid
            assert doc is not None
            added.add(collection, doc_id, doc, counts, length)
        added.write(self.conn)

    def _indexed(self, docs: set[tuple[str, str]]) -> set[tuple[str, str]]:
        """Which of ``docs`` the index holds."""
        found: set[tuple[str, str]] = set()
        for collection in {c for c, _ in docs}:
            ids = [d for c, d in docs if c == collection]
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                found.update((collection, d) for (d,) in self.conn.execute(
                    f"SELECT doc_id FROM bm25_docs WHERE collection = ? AND doc_id IN ({', '.join('?' * len(chunk))})",
                    (collection, *chunk)))
        return found

    def _terms(self, text: str) -> list[str]:
        """``terms(text, self.blinder)``, each word's keyed hash computed once (the vocabulary repeats)."""
        if self.blinder is None:
            return tokenize(text)
        keys = self._keys
        if len(keys) > KEY_CACHE:
            keys.clear()
        out = []
        for token in tokenize(text):
            key = keys.get(token)
            if key is None:
                key = keys[token] = token_key(token, self.blinder)
            out.append(key)
        return out

    def remove(self, collection: str, doc_id: str) -> bool:
        row = self.conn.execute(
            "SELECT doc, length FROM bm25_docs WHERE collection = ? AND doc_id = ?", (collection, doc_id)
        ).fetchone()
        if row is None:
            return False
        doc, length = row
        doc_terms = [t for (t,) in self.conn.execute("SELECT term FROM bm25_postings WHERE doc = ?", (doc,))]
        self.conn.executemany(
            "UPDATE bm25_terms SET df = df - 1 WHERE collection = ? AND term = ?",
            [(collection, t) for t in doc_terms],
        )
        self.conn.executemany("DELETE FROM bm25_terms WHERE collection = ? AND term = ? AND df <= 0",
                              [(collection, t) for t in doc_terms])
        self.conn.execute("DELETE FROM bm25_postings WHERE doc = ?", (doc,))
        self.conn.execute("DELETE FROM bm25_docs WHERE doc = ?", (doc,))
        self._adjust_stats(collection, -1, -length)
        return True

    def _adjust_stats(self, collection: str, docs: int, length: int) -> None:
        self.conn.execute(_ADJUST_STATS, (collection, docs, length))

    def count_of_user(self, collection: str, user_id: str) -> int:
        row = self.conn.execute("SELECT count(*) FROM bm25_docs WHERE collection = ? AND user_id = ?",
                                (collection, self._user(user_id))).fetchone()
        return int(row[0])

    def docs_of_user(self, collection: str, user_id: str) -> list[str]:
        return [doc_id for (doc_id,) in self.conn.execute(
            "SELECT doc_id FROM bm25_docs WHERE collection = ? AND user_id = ?", (collection, self._user(user_id)))]

    def count(self, collection: str) -> int:
        row = self.conn.execute("SELECT docs FROM bm25_stats WHERE collection = ?", (collection,)).fetchone()
        return int(row[0]) if row else 0

    def search(self, collection: str, query: str, k: int = 10,
               user_id: str | None = None) -> list[tuple[str, float]]:
        """The ``k`` best (doc_id, score) pairs, best first; documents sharing no term are left out.

        SQLite sums each document's score over the query's postings, which carry their document's length, and
        keeps the best ``k``; only those ``k`` read their document row (for its id). The postings of common terms
        run to tens of thousands of rows at 100k documents. Equal scores rank the document indexed first first.
        """
        stats = self.conn.execute(
            "SELECT docs, total_length FROM bm25_stats WHERE collection = ?", (collection,)
        ).fetchone()
        if not stats or stats[0] <= 0:
            return []
        n_docs, total = int(stats[0]), int(stats[1])
        avg_len = total / n_docs if total else 1.0
        keys = _unique(self._terms(query))
        if not keys:
            return []
        found = self.conn.execute(
            f"SELECT term, df FROM bm25_terms WHERE collection = ? AND term IN ({', '.join('?' * len(keys))})",
            (collection, *keys),
        ).fetchall()
        if not found:
            return []
        weights = [(term, math.log(1.0 + (n_docs - df + 0.5) / (df + 0.5))) for term, df in found]
        user = "" if user_id is None else " JOIN bm25_docs u ON u.doc = p.doc AND u.user_id = ?"
        sql = (f"WITH q (term, idf) AS (VALUES {', '.join(['(?, ?)'] * len(weights))}), "
               "best AS (SELECT p.doc, SUM(q.idf * p.tf * ? / (p.tf + ? * (1.0 - ? + ? * p.length / ?))) AS score "
               f"FROM q JOIN bm25_postings p ON p.collection = ? AND p.term = q.term{user} "
               "GROUP BY p.doc ORDER BY score DESC, p.doc LIMIT ?) "
               "SELECT d.doc_id, best.score FROM best JOIN bm25_docs d ON d.doc = best.doc "
               "ORDER BY best.score DESC, best.doc")
        params: list[object] = [v for pair in weights for v in pair]
        params += [self.k1 + 1.0, self.k1, self.b, self.b, avg_len, collection]
        if user_id is not None:
            params.append(self._user(user_id))
        params.append(k)
        return [(doc_id, float(score)) for doc_id, score in self.conn.execute(sql, params)]


KEY_CACHE = 200_000
"""Words whose keyed hash an index keeps; past that it starts over."""

_ADJUST_STATS = ("INSERT INTO bm25_stats (collection, docs, total_length) VALUES (?, ?, ?) "
                 "ON CONFLICT (collection) DO UPDATE SET docs = docs + excluded.docs, "
                 "total_length = total_length + excluded.total_length")


class _Added:
    """What documents added by one ``Bm25Index.write`` call still have to write."""

    def __init__(self) -> None:
        self.ids: set[tuple[str, str]] = set()
        self.postings: list[tuple[str, str, int, int, int]] = []
        self.sizes: dict[str, tuple[int, int]] = {}

    def add(self, collection: str, doc_id: str, doc: int, counts: Counter[str], length: int) -> None:
        self.ids.add((collection, doc_id))
        self.postings += [(collection, term, doc, tf, length) for term, tf in counts.items()]
        docs, total = self.sizes.get(collection, (0, 0))
        self.sizes[collection] = (docs + 1, total + length)

    def write(self, conn: sqlite3.Connection) -> None:
        if not self.ids:
            return
        conn.executemany("INSERT INTO bm25_postings (collection, term, doc, tf, length) VALUES (?, ?, ?, ?, ?)",
                         self.postings)
        df = Counter((c, t) for c, t, _, _, _ in self.postings)
        conn.executemany("INSERT INTO bm25_terms (collection, term, df) VALUES (?, ?, ?) "
                         "ON CONFLICT (collection, term) DO UPDATE SET df = df + excluded.df",
                         [(c, t, n) for (c, t), n in df.items()])
        conn.executemany(_ADJUST_STATS, [(c, docs, total) for c, (docs, total) in self.sizes.items()])


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))
