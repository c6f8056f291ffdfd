"""The semantic-memory worker: ChromaDB vectors plus a BM25 keyword index, fed by change events.

Chroma has no transactions, so the worker's transaction is that of a small SQLite
sidecar next to it (log position, outbox, BM25 index). Handlers queue their writes
on the transaction; at commit the batch's documents are written to BM25 together, its
texts embedded in one call and upserted under deterministic ids, then the sidecar commits. A crash in between
replays the batch, and the replay upserts the same ids again: at-least-once made
safe by idempotence.
"""

from __future__ import annotations

import base64
import datetime as dt
import itertools
import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import msgspec
import numpy as np
import structlog
from numpy.typing import NDArray

import contracts.semantic as sem
from bus.keys import KeyRing
from bus.sealing import Blinder, open_sealed, seal
from contracts.errors import BusError, IntegrityError, StoreError, StoreRejected
from contracts.inventory import InventoryItem, InventoryPage
from workers.base import Backend, Context, handles
from workers.bm25 import Bm25Index, has_cjk
from workers.change_events import FactChanged, MessageChanged, read_event, timestamp
from workers.embedding import Embedder, MembusEmbeddingFunction, load_embedder

log = structlog.get_logger("membus.chroma")

IDS_FILTER_MAX = 50_000
"""Up to this many documents of one user, a search names them by id rather than filtering on metadata."""
COLLECTIONS = {"memory": "memory_facts", "conversation": "conversation_segments"}
_PAGE = 1000
"""Records read from Chroma at a time when the worker reads a whole collection."""
SEALED_METADATA = "_sealed"
RRF_K = 60
_msgpack = msgspec.msgpack.Encoder()
_decode_items = msgspec.msgpack.Decoder(list[bytes])

SIDECAR_SCHEMA = """
CREATE TABLE IF NOT EXISTS position (id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY, items BLOB NOT NULL);
"""


def metadata_value(value: Any) -> str | int | float | bool | None:
    """A value Chroma can keep as metadata (scalars only; None is left out)."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    return json.dumps(value, default=str, sort_keys=True)


def clean_metadata(fields: dict[str, Any]) -> dict[str, str | int | float | bool]:
    out: dict[str, str | int | float | bool] = {}
    for key, value in fields.items():
        converted = metadata_value(value)
        if converted is not None:
            out[key] = converted
    return out


@dataclass
class Write:
    op: Literal["upsert", "delete"]
    collection: str
    id: str
    text: str = ""
    metadata: dict[str, str | int | float | bool] = field(default_factory=dict)


@dataclass
class ChromaTxn:
    """The sidecar transaction plus the writes queued by the batch's handlers, for Chroma and for BM25."""

    conn: sqlite3.Connection
    writes: list[Write] = field(default_factory=list)
    flushed: int = 0
    """How many of ``writes`` are in Chroma."""
    indexed: int = 0
    """How many of ``writes`` are in the BM25 index (fewer than ``flushed`` after a savepoint rolled some back)."""
    savepoints: int = 0


class ChromaBackend(Backend):
    name = "chroma"
    patterns: ClassVar[tuple[str, ...]] = (
        "memory.fact.changed",
        "conversation.message.changed",
        "memory.search.semantic.request",
        "memory.search.hybrid.request",
        "semantic.index.request",
        "semantic.remove.request",
        "semantic.inventory.request",
    )
    ack_timeout_s = 600.0
    """A batch of 500 texts takes 3 s of embedding on a quiet 2-core CPU and over 30 s (the broker's default)
    on a busy one, and the second batch in credit waits for the first: with the default, applied messages were
    redelivered and, after max_attempts, could be dead-lettered."""

    def __init__(self, data_dir: Path, **settings: Any) -> None:
        super().__init__(data_dir, **settings)
        self._conn: sqlite3.Connection | None = None
        self._client: Any = None
        self._collections: dict[str, Any] = {}
        self._sizes: dict[str, int] = {}
        """Each collection's count, known since its last write: Chroma counts 100k records in ~8 ms."""
        self._scopes: dict[tuple[str, str], tuple[dict[str, Any] | None, list[str] | None]] = {}
        """(collection, user) -> how a search selects the user's documents (``_scope``), since the last write."""
        self.embedder: Embedder | None = settings.get("embedder")
        self.bm25: Bm25Index | None = None
        self.keyring: KeyRing | None = settings.get("encryption")
        """Text and metadata sealed together in the metadata (no document kept), filterable strings and BM25
        tokens as keyed hashes (docs/security.md)."""
        self.blinder = Blinder(self.keyring, "chroma-index") if self.keyring is not None else None

    # -- lifecycle ---------------------------------------------------------------------------

    def open(self) -> None:
        import chromadb
        from chromadb.config import Settings

        self.data_dir.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.data_dir / "sidecar.sqlite3", isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")  # a lost tail is replayed from the log, idempotently
        conn.executescript(SIDECAR_SCHEMA)
        self.bm25 = Bm25Index(conn, blinder=self.blinder)
        self.bm25.create()
        self._conn = conn
        if self.embedder is None:
            self.embedder = load_embedder(self.settings.get("embedding_model"),
                                          self.settings.get("embedding_device"))
        function = MembusEmbeddingFunction(self.embedder)
        self._client = chromadb.PersistentClient(
            path=str(self.data_dir / "chroma"),
            settings=Settings(anonymized_telemetry=False, allow_reset=False),
        )
        for kind, name in COLLECTIONS.items():
            collection = self._client.get_or_create_collection(
                name, embedding_function=function, configuration={"hnsw": {"space": "cosine"}},
            )
            self._check_embedder(collection, function)
            self._collections[kind] = collection
        if self.bm25.retokenize_pending():
            self._retokenize()
        log.info("chroma.opened", path=str(self.data_dir), model=self.embedder.name)

    def _retokenize(self) -> None:
        """Indexes again in BM25 the texts an earlier tokenizer split otherwise (those with CJK characters), in
        one transaction with clearing the mark: once, at the first start after the upgrade."""
        assert self.bm25 is not None
        changes = []
        for kind in COLLECTIONS:
            for offset in itertools.count(0, _PAGE):
                page = self.collection(kind).get(include=["documents", "metadatas"], limit=_PAGE, offset=offset)
                for doc_id, document, meta in zip(page["ids"], page["documents"], page["metadatas"], strict=True):
                    text, metadata = self._opened(kind, doc_id, document, meta)
                    if has_cjk(text):
                        changes.append((kind, doc_id, text, _owner(metadata)))
                if len(page["ids"]) < _PAGE:
                    break
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            self.bm25.write(changes)
            self.bm25.retokenized()
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")
        log.info("chroma.bm25_retokenized", documents=len(changes))

    def _check_embedder(self, collection: Any, function: MembusEmbeddingFunction) -> None:
        """Vectors of one model only: a collection embedded by another is refused, with what to do (Chroma itself
        would open it, and every later search and write would fail on the vectors' size, or rank nonsense)."""
        made_by = ((collection.configuration_json or {}).get("embedding_function") or {}).get("config") or {}
        now = function.get_config()
        if not made_by or (made_by.get("model"), made_by.get("dimensions")) == (now["model"], now["dimensions"]):
            return
        if collection.count():
            raise StoreError(
                f"the chroma store's {collection.name} collection holds vectors of the embedding model "
                f"{made_by.get('model')!r} ({made_by.get('dimensions')} dimensions), and this worker runs "
                f"{now['model']!r} ({now['dimensions']}): set MEMBUS_EMBEDDING_MODEL (or "
                "embedding_model in [stores.chroma] of membus.toml) to the first, or rebuild the store with this "
                "one (membus rebuild chroma)", store="chroma")
        collection.modify(configuration={"embedding_function": function})  # empty: it is this model's now

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        self._collections.clear()
        self._forget(*COLLECTIONS)
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError("the chroma worker's store is not open")
        return self._conn

    def collection(self, kind: str) -> Any:
        return self._collections[kind]

    def _forget(self, *kinds: str) -> None:
        """What the worker knows of these collections' contents, before it writes them."""
        for kind in kinds:
            self._sizes.pop(kind, None)
        self._scopes = {key: scope for key, scope in self._scopes.items() if key[0] not in kinds}

    def size(self, kind: str) -> int:
        """How many records the collection holds (this worker is the only one writing it)."""
        size = self._sizes.get(kind)
        if size is None:
            size = self._sizes[kind] = self.collection(kind).count()
        return size

    # -- transactions ------------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[ChromaTxn]:
        conn = self.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            txn = ChromaTxn(conn)
            try:
                yield txn
                self.flush(txn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except BusError:
            raise
        except (sqlite3.Error, _chroma_error()) as exc:
            raise StoreError(f"chroma store: {type(exc).__name__}: {exc}", store="chroma") from exc

    @contextmanager
    def savepoint(self, txn: ChromaTxn) -> Iterator[None]:
        txn.savepoints += 1
        name = f"sp{txn.savepoints}"
        mark, indexed = len(txn.writes), txn.indexed
        txn.conn.execute(f"SAVEPOINT {name}")
        try:
            yield
        except BaseException:
            txn.conn.execute(f"ROLLBACK TO {name}")
            txn.conn.execute(f"RELEASE {name}")
            del txn.writes[max(mark, txn.flushed):]
            # a flush inside the savepoint (a search) indexed earlier messages' writes in BM25: undone with it
            txn.indexed = min(txn.indexed, indexed)
            raise
        txn.conn.execute(f"RELEASE {name}")

    def flush(self, txn: ChromaTxn) -> None:
        """Indexes the queued writes in BM25 (in order, as a batch), embeds every text queued since the last
        flush in one call, then writes them to Chroma."""
        assert self.bm25 is not None
        self.bm25.write((w.collection, w.id, w.text if w.op == "upsert" else None, _owner(w.metadata))
                        for w in txn.writes[txn.indexed:])
        txn.indexed = len(txn.writes)
        final: dict[tuple[str, str], Write] = {}
        for write in txn.writes[txn.flushed:]:
            final[(write.collection, write.id)] = write  # the last write of an id wins
        txn.flushed = len(txn.writes)
        upserts = [w for w in final.values() if w.op == "upsert"]
        assert self.embedder is not None
        vectors = self.embedder.embed([w.text for w in upserts])
        for kind in COLLECTIONS:
            rows = [i for i, w in enumerate(upserts) if w.collection == kind]
            if rows:
                chosen = [upserts[i] for i in rows]
                self._forget(kind)
                ids, documents = [w.id for w in chosen], [self._stored_document(w) for w in chosen]
                metadatas = [self._stored_metadata(w) for w in chosen]
                try:
                    self.collection(kind).upsert(ids=ids, embeddings=vectors[rows] if len(rows) < len(upserts)
                                                 else vectors, documents=documents, metadatas=metadatas)
                except (_invalid_argument(), TypeError, ValueError, OverflowError) as exc:
                    raise StoreRejected(f"{type(exc).__name__} for a {kind} record: {exc}", store="chroma") from exc
            gone = [w.id for w in final.values() if w.op == "delete" and w.collection == kind]
            if gone:
                self._forget(kind)
                self.collection(kind).delete(ids=gone)

    # -- position and outbox -----------------------------------------------------------------

    def load_position(self) -> int:
        row = self.conn.execute("SELECT seq FROM position WHERE id = 1").fetchone()
        return int(row[0]) if row else 0

    def save_position(self, txn: ChromaTxn, seq: int) -> None:
        txn.conn.execute("INSERT INTO position (id, seq) VALUES (1, ?) "
                         "ON CONFLICT (id) DO UPDATE SET seq = excluded.seq", (seq,))

    def outbox_add(self, txn: ChromaTxn, seq: int, items: list[bytes]) -> None:
        body = _msgpack.encode(items)
        if self.keyring is not None:
            body = seal(self.keyring.current, body, b"chroma|outbox|%d" % seq)
        txn.conn.execute("INSERT OR REPLACE INTO outbox (seq, items) VALUES (?, ?)", (seq, body))

    def outbox_pending(self) -> list[tuple[int, list[bytes]]]:
        rows = self.conn.execute("SELECT seq, items FROM outbox ORDER BY seq").fetchall()
        if self.keyring is not None:
            rows = [(seq, open_sealed(self.keyring, items, b"chroma|outbox|%d" % seq)) for seq, items in rows]
        return [(int(seq), _decode_items.decode(items)) for seq, items in rows]

    def outbox_remove(self, seqs: list[int]) -> None:
        with self.conn:
            self.conn.executemany("DELETE FROM outbox WHERE seq = ?", [(s,) for s in seqs])

    def stats(self) -> dict[str, Any]:
        return {kind: self.size(kind) for kind in COLLECTIONS} if self._collections else {}

    # -- sealing -----------------------------------------------------------------------------

    def _stored_document(self, w: Write) -> str | None:
        """The plaintext, or nothing when sealed: the text then travels inside the metadata's sealed record,
        so Chroma does not index ciphertext in its full-text table (40% of its upsert cost; docs/security.md)."""
        return w.text if self.keyring is None else None

    def _stored_metadata(self, w: Write) -> dict[str, str | int | float | bool] | None:
        """Numbers and booleans stay (range filters), strings become keyed hashes (equality filters), and
        the text with the original metadata is sealed under ``_sealed``."""
        if self.keyring is None or self.blinder is None:
            return w.metadata or None
        out: dict[str, str | int | float | bool] = {
            k: self.blinder.blind_text(v) if isinstance(v, str) else v for k, v in w.metadata.items()}
        blob = seal(self.keyring.current, json.dumps({"text": w.text, "metadata": w.metadata}).encode(),
                    f"chroma|{w.collection}|{w.id}|record".encode())
        out[SEALED_METADATA] = base64.b64encode(blob).decode()
        return out

    def _opened(self, kind: str, doc_id: str, document: str | None,
                meta: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
        """The plaintext text and metadata of a stored hit (IntegrityError if either was altered)."""
        if self.keyring is None:
            return document or "", dict(meta or {})
        try:
            meta_blob = base64.b64decode(str((meta or {})[SEALED_METADATA]).encode(), validate=True)
            doc_blob = None if document is None else base64.b64decode(document.encode(), validate=True)
        except (ValueError, KeyError) as exc:
            raise IntegrityError(f"chroma {kind} {doc_id!r} is not sealed: {exc}", check="encoding") from None
        if doc_blob is None:
            record = json.loads(open_sealed(self.keyring, meta_blob, f"chroma|{kind}|{doc_id}|record".encode()))
            return record["text"], record["metadata"]
        # written before 2026-11-26: text sealed in the document, metadata sealed on its own
        text = open_sealed(self.keyring, doc_blob, f"chroma|{kind}|{doc_id}|document".encode()).decode()
        plain = open_sealed(self.keyring, meta_blob, f"chroma|{kind}|{doc_id}|metadata".encode())
        return text, json.loads(plain)

    def _where(self, user_id: str | None, fields: dict[str, Any]) -> dict[str, Any] | None:
        where = chroma_where(user_id, fields)
        return where if where is None or self.blinder is None else _blind_where(where, self.blinder)

    # -- indexing ----------------------------------------------------------------------------

    def index(self, txn: ChromaTxn, kind: str, doc_id: str, text: str,
              metadata: dict[str, str | int | float | bool]) -> None:
        """Queues ``text`` for Chroma and BM25, both written at the next flush (a search, or the commit)."""
        txn.writes.append(Write("upsert", kind, doc_id, text, metadata))

    def unindex(self, txn: ChromaTxn, kind: str, doc_id: str) -> None:
        txn.writes.append(Write("delete", kind, doc_id))

    @handles("memory.fact.changed")
    def on_fact_changed(self, txn: ChromaTxn, payload: Any, ctx: Context) -> None:
        fact = read_event(payload, FactChanged, ctx.envelope.topic)
        if fact.removed or not fact.text.strip():
            self.unindex(txn, "memory", fact.fact_id)
            return
        extra = {f"meta_{k}": v for k, v in (fact.metadata or {}).items()}
        metadata = clean_metadata({
            **extra,
            "kind": "fact",
            "user_id": fact.user_id,
            "fact_type": fact.fact_type or None,  # each as libSQL has it: a search filters on either
            "category": fact.category or None,
            "confidence": fact.confidence,
            "version": fact.version,
            "created_at": fact.created_at,
            "updated_at": fact.updated_at,
            "created_ts": timestamp(fact.created_at),
            "updated_ts": timestamp(fact.updated_at),
        })
        self.index(txn, "memory", fact.fact_id, fact.text, metadata)

    @handles("conversation.message.changed")
    def on_message_changed(self, txn: ChromaTxn, payload: Any, ctx: Context) -> None:
        msg = read_event(payload, MessageChanged, ctx.envelope.topic)
        if msg.removed or not msg.text.strip():
            self.unindex(txn, "conversation", msg.message_id)
            return
        metadata = clean_metadata({
            "kind": "message",
            "user_id": msg.user_id,
            "conversation_id": msg.conversation_id,
            "role": msg.role,
            "sentiment": msg.sentiment,
            "created_at": msg.created_at,
            "created_ts": timestamp(msg.created_at),
        })
        self.index(txn, "conversation", msg.message_id, msg.text, metadata)

    @handles("semantic.index.request")
    def on_index(self, txn: ChromaTxn, req: sem.IndexText, ctx: Context) -> sem.Indexed:
        owner = {} if req.user_id is None else {"user_id": req.user_id}  # else the metadata's own user_id, if any
        metadata = clean_metadata({**req.metadata, **owner})
        self.index(txn, req.collection, req.id, req.text, metadata)
        return sem.Indexed(id=req.id, collection=req.collection)

    @handles("semantic.remove.request")
    def on_remove(self, txn: ChromaTxn, req: sem.RemoveText, ctx: Context) -> sem.Indexed:
        self.unindex(txn, req.collection, req.id)
        return sem.Indexed(id=req.id, collection=req.collection)

    # -- search ------------------------------------------------------------------------------

    @handles("memory.search.semantic.request")
    def on_semantic(self, txn: ChromaTxn, req: sem.SemanticSearch, ctx: Context) -> sem.SearchResult:
        self.flush(txn)  # writes earlier in this batch are visible to its searches
        return sem.SearchResult(hits=self.semantic_search(req))

    @handles("memory.search.hybrid.request")
    def on_hybrid(self, txn: ChromaTxn, req: sem.HybridSearch, ctx: Context) -> sem.SearchResult:
        self.flush(txn)
        return sem.SearchResult(hits=self.hybrid_search(req))

    def _kinds(self, collection: str) -> list[str]:
        return list(COLLECTIONS) if collection == "all" else [collection]

    def _embed_query(self, text: str) -> NDArray[np.float32]:
        assert self.embedder is not None
        vector: NDArray[np.float32] = self.embedder.embed([text])[0]
        return vector

    def semantic_search(self, req: sem.SemanticSearch, *, k: int | None = None,
                        query_vector: NDArray[np.float32] | None = None) -> list[sem.SearchHit]:
        k = k or req.k
        vector = query_vector if query_vector is not None else self._embed_query(req.query)
        hits: list[sem.SearchHit] = []
        for kind in self._kinds(req.collection):
            coll = self.collection(kind)
            size = self.size(kind)
            if size == 0:
                continue
            where, ids = self._scope(kind, size, req.user_id, req.where)
            if ids == []:
                continue
            found = coll.query(query_embeddings=[vector], n_results=min(k, size if ids is None else len(ids)),
                               where=where, ids=ids, include=["documents", "metadatas", "distances"])
            for doc_id, text, meta, dist in zip(found["ids"][0], found["documents"][0], found["metadatas"][0],
                                                found["distances"][0], strict=True):
                relevance = 1.0 - float(dist)
                if relevance >= req.min_relevance:
                    text, plain = self._opened(kind, doc_id, text, meta)
                    hits.append(sem.SearchHit(id=doc_id, collection=kind, text=text, score=relevance,
                                              semantic=relevance, metadata=plain))
        hits.sort(key=lambda h: (-h.score, h.id))
        return hits[:k]

    def _scope(self, kind: str, size: int, user_id: str | None,
               fields: dict[str, Any]) -> tuple[dict[str, Any] | None, list[str] | None]:
        """The cheapest (where, ids) that selects a user's documents: local Chroma's ``where`` reads metadata
        for ~35 ms at 100k records whatever it matches (chroma-core/chroma#7092), a list of ids costs 10-28 ms
        up to 50k ids, no filter 3-8 ms. The BM25 table holds the same documents with their users, so it tells
        whether the user owns all of them (one person's local store: no filter needed) or how many."""
        assert self.bm25 is not None
        if user_id is None or fields:
            return self._where(user_id, fields), None
        scope = self._scopes.get((kind, user_id))
        if scope is None:
            owned = self.bm25.count_of_user(kind, user_id)
            if owned == size:
                scope = None, None
            elif owned <= IDS_FILTER_MAX:
                scope = None, self.bm25.docs_of_user(kind, user_id)
            else:
                scope = self._where(user_id, fields), None
            self._scopes[(kind, user_id)] = scope
        return scope

    def hybrid_search(self, req: sem.HybridSearch) -> list[sem.SearchHit]:
        assert self.bm25 is not None
        vector = self._embed_query(req.query)
        semantic = self.semantic_search(req, k=req.candidates, query_vector=vector)
        fused: dict[tuple[str, str], float] = {}
        hits: dict[tuple[str, str], sem.SearchHit] = {}
        for rank, hit in enumerate(semantic):
            key = (hit.collection, hit.id)
            fused[key] = 1.0 / (RRF_K + rank + 1)
            hits[key] = hit
        keyword: list[tuple[str, str, float]] = []
        for kind in self._kinds(req.collection):
            keyword += [(kind, doc_id, score) for doc_id, score in
                        self.bm25.search(kind, req.query, req.candidates, req.user_id)]
        keyword.sort(key=lambda item: (-item[2], item[1]))
        self._fetch_missing(req, vector, [(c, d) for c, d, _ in keyword if (c, d) not in hits], hits)
        rank = 0
        for kind, doc_id, score in keyword[:req.candidates]:
            key = (kind, doc_id)
            if key not in hits:
                continue  # filtered out by ``where`` or below the relevance threshold
            hits[key].bm25 = score
            fused[key] = fused.get(key, 0.0) + 1.0 / (RRF_K + rank + 1)
            rank += 1
        best = sorted(fused, key=lambda key: (-fused[key], key[1]))[: req.k]
        out = []
        for key in best:
            hit = hits[key]
            hit.score = fused[key]
            out.append(hit)
        return out

    def _fetch_missing(self, req: sem.HybridSearch, vector: NDArray[np.float32], keys: list[tuple[str, str]],
                       hits: dict[tuple[str, str], sem.SearchHit]) -> None:
        """Texts, metadata and semantic relevance of keyword-only hits, with ``where`` applied. BM25 applied the
        user filter already (it indexes each document's user), so Chroma gets ids alone unless ``where`` asks for
        more: its ``where`` reads the metadata of all of a user's documents, not just those ids."""
        where = self._where(None, req.where)
        for kind in COLLECTIONS:
            ids = [doc_id for c, doc_id in keys if c == kind]
            if not ids:
                continue
            got = self.collection(kind).get(ids=ids, where=where,
                                            include=["documents", "metadatas", "embeddings"])
            rows = zip(got["ids"], got["documents"], got["metadatas"], got["embeddings"], strict=True)
            for doc_id, text, meta, emb in rows:
                relevance = float(np.dot(vector, np.asarray(emb, dtype=np.float32)))
                if relevance >= req.min_relevance:
                    text, plain = self._opened(kind, doc_id, text, meta)
                    hits[(kind, doc_id)] = sem.SearchHit(
                        id=doc_id, collection=kind, text=text, score=0.0, semantic=relevance,
                        metadata=plain)

    @handles("semantic.inventory.request")
    def on_inventory(self, txn: ChromaTxn, req: sem.SemanticInventory, ctx: Context) -> InventoryPage:
        """The collection's ids in id order (Chroma pages by insertion, which a cursor cannot follow)."""
        self.flush(txn)
        ids = sorted(i for i in self.collection(req.kind).get(include=[])["ids"] if i > req.cursor)
        page = ids[: req.limit]
        return InventoryPage(kind=req.kind, items=[InventoryItem(id=i) for i in page],
                             cursor=page[-1] if len(ids) > req.limit else "")


def _owner(metadata: dict[str, Any]) -> str | None:
    user = metadata.get("user_id")
    return None if user is None else str(user)


def chroma_where(user_id: str | None, fields: dict[str, Any]) -> dict[str, Any] | None:
    clauses = [{key: value} for key, value in fields.items()]
    if user_id is not None:
        clauses.append({"user_id": user_id})
    if not clauses:
        return None
    return clauses[0] if len(clauses) == 1 else {"$and": clauses}


def _blind_where(where: Any, blinder: Blinder) -> Any:
    """``where`` with every string compared replaced by its keyed hash, as stored (operators kept)."""
    if isinstance(where, dict):
        return {k: _blind_where(v, blinder) for k, v in where.items()}
    if isinstance(where, list):
        return [_blind_where(v, blinder) for v in where]
    return blinder.blind_text(where) if isinstance(where, str) else where


def _invalid_argument() -> type[Exception]:
    """What Chroma raises for a record it cannot hold (a reserved or empty metadata key, ...)."""
    from chromadb.errors import InvalidArgumentError

    return InvalidArgumentError


def _chroma_error() -> type[Exception]:
    from chromadb.errors import ChromaError

    return ChromaError
