"""The durable event log: every published message, in order, under a sequence number.

LMDB, one environment, named databases:
    log     seq (8-byte big-endian) -> record
    ids     message id -> seq                  (idempotent publish: a retried id is stored once)
    corr    correlation id + 0x00 + seq -> b"" (trace one conversation or request)
    groups  group name -> {"floor": seq, "patterns": [...]}   (consumer-group positions)
    meta    b"created" -> first open time

A record is ``header | topic | body``. The header is version (1 byte), key id (2
bytes, 0 = plaintext), logged-at time (unix ns, 8 bytes, non-decreasing along the
log) and topic length (1 byte). The body is the envelope's MessagePack, or, when
the key id is not 0, the envelope sealed (nonce and tag inside the body) with the
seq and topic bound as associated data. Everything appended in one call is
committed with one fsync (group commit).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import lmdb
import msgspec
import structlog

from contracts.envelope import Envelope, encode_envelope
from contracts.errors import IntegrityError, StoreError, StoreFull
from contracts.topics import matches_any

log = structlog.get_logger("membus.log")

RECORD_VERSION = 1
_HEADER = struct.Struct(">BHQB")
_SEQ = struct.Struct(">Q")
_group_codec_enc = msgspec.msgpack.Encoder()
_group_codec_dec = msgspec.msgpack.Decoder()


class RecordCipher(Protocol):
    """Seals record bodies at rest (bus/sealing.py provides the AES-256-GCM one)."""

    key_id: int

    def seal(self, body: bytes, aad: bytes) -> bytes: ...

    def open(self, key_id: int, blob: bytes, aad: bytes) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Record:
    seq: int
    topic: str
    logged_ns: int
    body: bytes
    """The envelope's MessagePack, opened if it was sealed."""


def seq_key(seq: int) -> bytes:
    return _SEQ.pack(seq)


class Rejected(Exception):
    """An envelope the log refuses; the broker turns it into a per-message error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class EventLog:
    def __init__(self, path: Path, *, map_size: int = 1 << 30, max_map_size: int = 1 << 40,
                 cipher: RecordCipher | None = None) -> None:
        self.path = Path(path)
        self.map_size = map_size
        self.max_map_size = max_map_size
        self.cipher = cipher
        self._env: lmdb.Environment | None = None
        self.head = 0
        self._last_ns = 0
        self.last_bodies: list[bytes] = []
        """The plaintext envelopes the last append stored, in seq order (the broker's tail cache feeds on them)."""

    def open(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        env = lmdb.open(str(self.path), map_size=self.map_size, max_dbs=8, sync=True, metasync=True,
                        readahead=False, meminit=False)
        self._env = env
        self._log = env.open_db(b"log")
        self._ids = env.open_db(b"ids")
        self._corr = env.open_db(b"corr")
        self._groups = env.open_db(b"groups")
        self._meta = env.open_db(b"meta")
        self.map_size = env.info()["map_size"]
        with env.begin(write=True) as txn:
            if txn.get(b"created", db=self._meta) is None:
                txn.put(b"created", _SEQ.pack(time.time_ns()), db=self._meta)
            cur = txn.cursor(db=self._log)
            if cur.last():
                self.head = _SEQ.unpack(cur.key())[0]
                self._last_ns = _HEADER.unpack_from(cur.value())[2]
        log.info("log.opened", path=str(self.path), head=self.head)

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None

    @property
    def env(self) -> lmdb.Environment:
        if self._env is None:
            raise StoreError("the event log is not open")
        return self._env

    # -- appending -------------------------------------------------------------------------------

    def append(self, envelopes: Sequence[Envelope], *, groups: dict[str, dict[str, Any]] | None = None,
               check: Callable[[Envelope], None] | None = None) -> list[int | Rejected]:
        """Appends envelopes in one transaction with one fsync; returns a seq or a Rejected per envelope.

        An envelope whose id is already in the log gets its original seq (idempotent publish).
        ``groups`` are consumer-group states written in the same transaction.
        """
        while True:
            try:
                return self._append_once(envelopes, groups or {}, check)
            except lmdb.MapFullError:
                self._grow()

    def _grow(self) -> None:
        if self.map_size >= self.max_map_size:
            raise StoreFull("the event log reached its maximum size", max_map_size=self.max_map_size)
        self.map_size = min(self.map_size * 2, self.max_map_size)
        self.env.set_mapsize(self.map_size)
        log.warning("log.map_grown", map_size=self.map_size)

    def _append_once(self, envelopes: Sequence[Envelope], groups: dict[str, dict[str, Any]],
                     check: Callable[[Envelope], None] | None) -> list[int | Rejected]:
        results: list[int | Rejected] = []
        head = self.head
        last_ns = self._last_ns
        ids_db, log_db, corr_db = self._ids, self._log, self._corr
        cipher = self.cipher
        rows: list[tuple[bytes, bytes]] = []
        plain: list[bytes] = []
        with self.env.begin(write=True) as txn:
            for env in envelopes:
                id_b = env.id.encode()
                known = txn.get(id_b, db=ids_db)
                if known is not None:
                    results.append(_SEQ.unpack(known)[0])
                    continue
                try:
                    if check is not None:
                        check(env)
                    topic_b = env.topic.encode()
                    if len(topic_b) > 255:
                        raise Rejected("validation", f"topic longer than 255 bytes: {env.topic[:40]}...")
                except Rejected as exc:
                    results.append(exc)
                    continue
                head += 1
                now = time.time_ns()
                last_ns = now if now > last_ns else last_ns
                env.seq = head
                key = _SEQ.pack(head)
                body = encode_envelope(env)
                plain.append(body)
                key_id = 0
                if cipher is not None:
                    key_id = cipher.key_id
                    body = cipher.seal(body, key + topic_b)
                rows.append((key, _HEADER.pack(RECORD_VERSION, key_id, last_ns, len(topic_b)) + topic_b + body))
                txn.put(id_b, key, db=ids_db)
                if env.correlation_id and env.correlation_id != env.id:
                    txn.put(env.correlation_id.encode() + b"\x00" + key, b"", db=corr_db)
                results.append(head)
            if rows:
                txn.cursor(db=log_db).putmulti(rows, append=True)
            for name, state in groups.items():
                txn.put(name.encode(), _group_codec_enc.encode(state), db=self._groups)
        self.head = head
        self.last_bodies = plain
        self._last_ns = last_ns
        return results

    def save_groups(self, groups: dict[str, dict[str, Any]]) -> None:
        self.append([], groups=groups)

    def load_groups(self) -> dict[str, dict[str, Any]]:
        with self.env.begin() as txn:
            return {k.decode(): _group_codec_dec.decode(v) for k, v in txn.cursor(db=self._groups)}

    # -- reading ---------------------------------------------------------------------------------

    def _decode(self, key: bytes, raw: bytes | memoryview[int]) -> Record:
        version, key_id, logged_ns, tlen = _HEADER.unpack_from(raw)
        if version != RECORD_VERSION:
            raise IntegrityError(f"log record {_SEQ.unpack(key)[0]} has unknown format {version}")
        start = _HEADER.size
        topic_b = bytes(raw[start:start + tlen])
        body = bytes(raw[start + tlen:])
        if key_id:
            if self.cipher is None:
                raise IntegrityError("log record is sealed but no key is loaded", seq=_SEQ.unpack(key)[0])
            body = self.cipher.open(key_id, body, key + topic_b)
        elif self.cipher is not None:  # the header's key id is not authenticated: 0 would be a downgrade
            raise IntegrityError("log record is not sealed but encryption is on", seq=_SEQ.unpack(key)[0],
                                 check="downgrade")
        return Record(_SEQ.unpack(key)[0], topic_b.decode(), logged_ns, body)

    def get(self, seq: int) -> Record | None:
        with self.env.begin(buffers=True) as txn:
            raw = txn.get(_SEQ.pack(seq), db=self._log)
            return None if raw is None else self._decode(_SEQ.pack(seq), raw)

    def seq_of_id(self, message_id: str) -> int | None:
        with self.env.begin() as txn:
            v = txn.get(message_id.encode(), db=self._ids)
            return None if v is None else int(_SEQ.unpack(v)[0])

    def topic_scan(self, from_seq: int, limit: int) -> Iterator[tuple[int, str, memoryview]]:
        """(seq, topic, raw record) from ``from_seq`` on, without decoding bodies: for routing."""
        with self.env.begin(buffers=True) as txn:
            cur = txn.cursor(db=self._log)
            if not cur.set_range(_SEQ.pack(max(from_seq, 1))):
                return
            for n, (key, raw) in enumerate(cur, 1):
                tlen = raw[_HEADER.size - 1]
                yield _SEQ.unpack(key)[0], bytes(raw[_HEADER.size:_HEADER.size + tlen]).decode(), raw
                if n >= limit:
                    return

    def body_of(self, seq: int, raw: memoryview | bytes) -> bytes:
        return self._decode(_SEQ.pack(seq), raw).body

    def seq_at_time(self, ns: int) -> int:
        """The first seq logged at or after ``ns`` (head + 1 if none): binary search on logged-at time."""
        lo, hi = 1, self.head + 1
        with self.env.begin(buffers=True) as txn:
            while lo < hi:
                mid = (lo + hi) // 2
                raw = txn.get(_SEQ.pack(mid), db=self._log)
                if raw is None or _HEADER.unpack_from(raw)[2] >= ns:
                    hi = mid
                else:
                    lo = mid + 1
        return lo

    def read(self, *, from_seq: int = 1, to_seq: int | None = None, patterns: Sequence[str] = (),
             since_ns: int | None = None, until_ns: int | None = None, correlation_id: str = "",
             limit: int = 1000, budget: int = 100_000) -> tuple[list[Record], int, bool]:
        """One page of a replay: (records, next_seq, done). Scans at most ``budget`` records."""
        to_seq = self.head if to_seq is None else min(to_seq, self.head)
        if since_ns is not None:
            from_seq = max(from_seq, self.seq_at_time(since_ns))
        if correlation_id:
            return self._read_correlated(correlation_id, from_seq, to_seq, patterns, limit)
        out: list[Record] = []
        seq = max(from_seq, 1)
        pats = tuple(patterns)
        scanned = 0
        with self.env.begin(buffers=True) as txn:
            cur = txn.cursor(db=self._log)
            if seq > to_seq or not cur.set_range(_SEQ.pack(seq)):
                return out, seq, True
            for key, raw in cur:
                seq = _SEQ.unpack(key)[0]
                if seq > to_seq:
                    return out, seq, True
                scanned += 1
                ns = _HEADER.unpack_from(raw)[2]
                if until_ns is not None and ns > until_ns:
                    return out, seq, True
                tlen = raw[_HEADER.size - 1]
                topic = bytes(raw[_HEADER.size:_HEADER.size + tlen]).decode()
                if not pats or matches_any(pats, topic):
                    out.append(self._decode(bytes(key), raw))
                    if len(out) >= limit:
                        return out, seq + 1, seq >= to_seq
                if scanned >= budget:
                    return out, seq + 1, seq >= to_seq
        return out, seq + 1, True

    def _read_correlated(self, cid: str, from_seq: int, to_seq: int, patterns: Sequence[str],
                         limit: int) -> tuple[list[Record], int, bool]:
        seqs: list[int] = []
        root = self.seq_of_id(cid)
        if root is not None:
            seqs.append(root)
        prefix = cid.encode() + b"\x00"
        with self.env.begin() as txn:
            cur = txn.cursor(db=self._corr)
            if cur.set_range(prefix):
                for key in cur.iternext(values=False):
                    if not key.startswith(prefix):
                        break
                    seqs.append(_SEQ.unpack(key[len(prefix):])[0])
        wanted = sorted(s for s in set(seqs) if from_seq <= s <= to_seq)
        out: list[Record] = []
        pats = tuple(patterns)
        for s in wanted:
            rec = self.get(s)
            if rec is not None and (not pats or matches_any(pats, rec.topic)):
                out.append(rec)
                if len(out) >= limit:
                    return out, s + 1, False
        return out, to_seq + 1, True

    def reseal(self, batch: int = 1000) -> int:
        """Seals again, with the cipher's current key, every record sealed under another key id (after
        ``membus keys rotate``, with the broker stopped); returns how many records were rewritten."""
        cipher = self.cipher
        if cipher is None:
            raise StoreError("resealing the log needs its cipher")
        done, seq = 0, 1
        while seq <= self.head:
            rows: list[tuple[bytes, bytes]] = []
            with self.env.begin(write=True) as txn:
                cur = txn.cursor(db=self._log)
                if not cur.set_range(_SEQ.pack(seq)):
                    break
                for key, raw in cur:
                    seq = _SEQ.unpack(key)[0] + 1
                    version, key_id, logged_ns, tlen = _HEADER.unpack_from(raw)
                    if key_id != cipher.key_id:
                        topic_b = raw[_HEADER.size:_HEADER.size + tlen]
                        # key id 0: a record from before encryption was turned on, sealed now
                        plain = raw[_HEADER.size + tlen:] if key_id == 0 else self._decode(key, raw).body
                        body = cipher.seal(plain, key + topic_b)
                        header = _HEADER.pack(version, cipher.key_id, logged_ns, tlen)
                        rows.append((key, header + topic_b + body))
                    if len(rows) >= batch:
                        break
                else:
                    seq = self.head + 1
                for key, value in rows:
                    txn.put(key, value, db=self._log)
            done += len(rows)
        log.info("log.resealed", records=done, key_id=cipher.key_id)
        return done

    def stats(self) -> dict[str, Any]:
        info = self.env.info()
        stat = self.env.stat()
        return {"head": self.head, "map_size": info["map_size"], "last_page": info["last_pgno"],
                "page_size": stat["psize"], "path": str(self.path)}
