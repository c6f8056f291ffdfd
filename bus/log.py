"""The durable event log: every published message, in order, under a sequence number.

LMDB, one environment, named databases:
    log     seq (8-byte big-endian) -> record
    ids     message id -> seq                  (idempotent publish: a retried id is stored once)
    corr    correlation id + 0x00 + seq -> b"" (trace one conversation or request)
    groups  group name -> {"floor": seq, "patterns": [...]}   (consumer-group positions)
    meta    b"created" -> first open time; b"journal" -> (epoch, number) of the next journal frame to apply;
            b"ordered_ids" -> the first seq whose worker replies carry ids ordered by seq (``ordered_ids_from``)

A write is durable once its frame is in the journal (bus/journal.py: one write, one fdatasync) and is
acknowledged then. Frames are applied to LMDB behind it, many per synced LMDB commit, on another thread than
the writes (bus/writer.py), so a write never waits for an apply; until then their records are served from
memory (``_fresh``). Opening the log applies any frame LMDB does not hold yet. A big write (a busy bus's)
goes straight to LMDB in one synced commit, with the frames before it.

A record is ``header | topic | body``. The header is version (1 byte), key id (2
bytes, 0 = plaintext), logged-at time (unix ns, 8 bytes, non-decreasing along the
log) and topic length (1 byte). Version 1: the body is the envelope's MessagePack
(key id 0), or the envelope sealed on its own with the seq and topic bound as
associated data. Version 2 (what a sealing log writes): records are sealed in
blocks of up to 64 consecutive seqs with one AES-GCM call; each record's body is
``index in block (2) | block length (2) | its slice of the block's seal``, and the
slices of a block, joined in seq order, are one sealed record (bus/sealing.py) whose
associated data binds the first seq, the count, and every record's topic and length.
Reading one record opens its whole block (a one-block cache serves the neighbours).
Everything written in one call is one journal frame (group commit).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import shutil
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import lmdb
import msgspec
import structlog

from bus.journal import Frame, Journal
from bus.sealing import OVERHEAD, TAG_LEN
from contracts.envelope import Envelope, encode_envelope
from contracts.errors import BusError, IntegrityError, StoreError, StoreFull, StoreUnavailable
from contracts.topics import matches_any

log = structlog.get_logger("membus.log")

RECORD_VERSION = 1
BLOCK_VERSION = 2
BLOCK_RECORDS = 64
BLOCK_BYTES = 64 << 10
"""A block closes at 64 records or 64 KB of envelopes: one AES-GCM call and one nonce for all of them, and a
reader of one record opens at most that much."""
_HEADER = struct.Struct(">BHQB")
_SEQ = struct.Struct(">Q")
_PLACE = struct.Struct(">HH")
"""A block record's index in its block and the block's length."""
_BLOCK_AAD = struct.Struct(">QH")
_LEN = struct.Struct(">I")
_SEAL_LEAD = OVERHEAD - TAG_LEN
"""The sealed record's version, key id and nonce: the first record of a block carries them, the last the tag."""
_group_codec_enc = msgspec.msgpack.Encoder()
_group_codec_dec = msgspec.msgpack.Decoder()
_POSITION = struct.Struct(">QQ")
"""The (epoch, number) of the next journal frame LMDB expects."""
APPLY_AFTER_S = 0.03
APPLY_BYTES = 4 << 20
"""Journal frames are applied to LMDB once the oldest waited this long or they add up to this much. Each synced
commit rewrites the right edge of the log's B-trees: 30 ms writes a fifth less than 10 ms, with no cost measured
(docs/benchmarks.md, thirteenth pass)."""
REWIND_AT = 8 << 20
"""Past this offset, the journal starts again at 0 once LMDB holds every frame."""
DIRECT_ROWS = 512
"""A write of this many records goes straight to LMDB."""
MAX_UNAPPLIED = 64 << 20
"""While applying to LMDB fails (a disk error), the journal takes this much more, then refuses writes."""


class RecordCipher(Protocol):
    """Seals record bodies at rest (bus/sealing.py provides the AES-256-GCM one)."""

    key_id: int

    def seal(self, body: bytes, aad: bytes) -> bytes:
        """``version (1) | key id (8) | nonce (12) | ciphertext | tag (16)``: what the block slices split."""
        ...

    def open(self, key_id: int, blob: bytes, aad: bytes) -> bytes: ...


PAGE_BYTES = 2 << 20
"""A replay page ends after the record that brings it to this many bytes."""


class Record(NamedTuple):
    """A tuple: one is made for every record a replay or a catch-up reads, and a frozen dataclass costs 2.7x."""

    seq: int
    topic: str
    logged_ns: int
    body: bytes
    """The envelope's MessagePack, opened if it was sealed."""


def seq_key(seq: int) -> bytes:
    return _SEQ.pack(seq)


@functools.cache
def _places(count: int) -> tuple[bytes, ...]:
    """The place fields (index, count) of the records of a block of ``count``."""
    return tuple(_PLACE.pack(i, count) for i in range(count))


@dataclass(slots=True)
class Prepared:
    """A batch of records ready to write: seqs assigned, records sealed (EventLog.prepare)."""

    results: list[int | Rejected]
    """Per envelope, in order: its seq (new, or the original one of a duplicate) or why it was refused."""
    rows: list[tuple[bytes, bytes]]
    id_rows: list[tuple[bytes, bytes]]
    corr_rows: list[tuple[bytes, bytes]]
    bodies: list[bytes]
    """The plaintext envelopes of the new records, seqs first..last (the broker's tail cache)."""
    topics: list[str]
    """The topics of the new records, seqs first..last."""
    first: int
    last: int
    """New seqs first..last; last < first when the batch adds no record."""
    groups: dict[str, dict[str, Any]]
    """Consumer-group states written with them."""
    logged_ns: int = 0
    refused: int = 0
    """How many of ``results`` are Rejected."""
    addressed: int = 0
    """How many new records have a recipient (replies to route to an inbox)."""
    unsealed: list[bytes] | None = None
    """Each new record's header + topic while its rows wait to be sealed: ``write`` seals them, on the writer's
    thread, so the broker's loop goes on receiving meanwhile."""


@dataclass(slots=True)
class _Unapplied:
    """A journal frame's writes, waiting to be applied to LMDB."""

    rows: list[tuple[bytes, bytes]]
    id_rows: list[tuple[bytes, bytes]]
    corr_rows: list[tuple[bytes, bytes]]
    groups: dict[str, bytes]
    last: int
    """The newest seq the log holds with this frame."""
    next_frame: tuple[int, int] = (0, 0)
    """The (epoch, number) of the journal frame after this one: what LMDB records once it holds this one."""
    size: int = 0
    """The frame's body length (0 for a write that went straight to LMDB)."""
    since: float = 0.0
    """When it was written (monotonic)."""


_frame_codec = msgspec.msgpack.Decoder(tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]],
                                             list[tuple[bytes, bytes]], dict[str, bytes], int])


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
        """The last durable seq."""
        self._assigned = 0
        """The last seq given to a prepared batch (ahead of ``head`` while batches are being written)."""
        self._pending_ids: dict[bytes, bytes] = {}
        """Message id -> seq of prepared records not yet in LMDB: a retry in between is still a duplicate."""
        self._pending_older: dict[bytes, bytes] = {}
        self._older_last = 0
        """The ids of ``_pending_ids`` as it was when LMDB last caught up with it, all at or below this seq: dropped
        whole once LMDB holds that seq (no per-id work while LMDB follows a busy log)."""
        self._last_ns = 0
        self._last_block: tuple[int, int, list[bytes]] | None = None
        self._journal = Journal(self.path / "journal")
        self.lmdb_head = 0
        """The last seq in LMDB, as the reading thread knows it: newer ones are read from ``_fresh``."""
        self._fresh: list[Prepared] = []
        """Committed batches with records, not yet known to be in LMDB, in seq order."""
        self._unapplied: list[_Unapplied] = []
        """Journal frames not yet applied to LMDB: the writing thread adds them, the applying thread removes them
        once LMDB holds them (both under ``_state``)."""
        self._unapplied_bytes = 0
        self._state = threading.Lock()
        self._applying = threading.RLock()
        """Held while a thread writes to LMDB (apply, a direct write) or grows the map: one at a time."""
        self._lmdb_last = 0
        """The last seq in LMDB, as the applying side knows it."""
        self._full_at = 0
        """The map size at the last MapFullError: the writer and the applier can both report one for the same
        size, and the map must grow once for it, not twice (nor refuse the second as over the limit)."""
        self._epoch = 1
        self._number = 0
        """The next journal frame's (epoch, number)."""
        self._journaled = 0
        """The last seq in the journal (the writing thread's)."""
        self._apply_failing = False
        self.ordered_ids_from = 1
        """The first seq whose worker replies carry ids ordered by seq (set by ``open``)."""

    def open(self) -> None:
        """Raises StoreError if another process (or EventLog) has the log open."""
        self.path.mkdir(parents=True, exist_ok=True)
        frames = self._journal.open()  # first: it takes the log's lock
        env = lmdb.open(str(self.path), map_size=self.map_size, max_dbs=8, sync=True, metasync=True,
                        readahead=False)
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
        self._recover(frames)
        with env.begin() as txn:
            cur = txn.cursor(db=self._log)
            if cur.last():
                self.head = _SEQ.unpack(cur.key())[0]
                self._last_ns = _HEADER.unpack_from(cur.value())[2]
        self._assigned = self.lmdb_head = self._journaled = self._lmdb_last = self.head
        self.ordered_ids_from = self._ordered_ids_from()
        log.info("log.opened", path=str(self.path), head=self.head, ordered_ids_from=self.ordered_ids_from)

    def _ordered_ids_from(self) -> int:
        """Replies to the seqs logged before this code first opened the log keep their hashed ids, so a store
        rebuilt from it republishes them under the same ids (workers.apply.derived_id): from here on, ordered."""
        with self.env.begin(write=True) as txn:
            raw = txn.get(b"ordered_ids", db=self._meta)
            if raw is None:
                raw = _SEQ.pack(self.head + 1)
                txn.put(b"ordered_ids", raw, db=self._meta)
        return int(_SEQ.unpack(raw)[0])

    def _recover(self, frames: list[Frame]) -> None:
        """Applies the journal frames LMDB does not hold yet, then starts a new epoch.

        LMDB records the next frame it expects; after a rewind that frame never came and the journal goes
        on with the next epoch's first."""
        with self.env.begin() as txn:
            raw = txn.get(b"journal", db=self._meta)
        expected = _POSITION.unpack(raw) if raw is not None else (0, 0)
        newer = [f for f in frames if (f.epoch, f.number) >= expected]
        if newer and (newer[0].epoch, newer[0].number) not in (expected, (expected[0] + 1, 0)):
            log.error("journal.gap", expected=expected, first_frame=(newer[0].epoch, newer[0].number))
            newer = []
        for f in newer:
            self._unapplied.append(_Unapplied(*_frame_codec.decode(f.body), next_frame=(f.epoch, f.number + 1)))
        epoch = expected[0]
        if newer:
            self._epoch, self._number = newer[-1].epoch, newer[-1].number + 1
            while True:
                try:
                    self.apply()
                    break
                except lmdb.MapFullError:
                    self.grow()
            epoch = newer[-1].epoch
            log.info("journal.recovered", frames=len(newer), epoch=epoch)
        self._epoch, self._number = epoch + 1, 0
        self._journal.rewind()
        with self.env.begin(write=True) as txn:
            txn.put(b"journal", _POSITION.pack(self._epoch, 0), db=self._meta)

    def close(self) -> None:
        if self._env is not None:
            with contextlib.suppress(lmdb.Error, BusError):
                self.apply()
            self._journal.close()
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
        """Appends envelopes durably (one journal frame, then applied to LMDB); returns a seq or a Rejected per
        envelope.

        An envelope whose id is already in the log gets its original seq (idempotent publish).
        ``groups`` are consumer-group states written in the same frame. The broker splits this into
        ``prepare`` (its loop), ``write`` and ``apply`` (its writer thread), ``committed`` and ``applied``
        (its loop again).
        """
        batch = self.prepare(envelopes, check, groups)
        try:
            while True:
                try:
                    self.write([batch])
                    break
                except lmdb.MapFullError:
                    self.grow()
        except BaseException:
            self.abandon()
            raise
        self.committed([batch])
        while True:
            try:
                self.applied(self.apply())
                break
            except lmdb.MapFullError:
                self.grow()
        return batch.results

    def grow(self, *, after_full: bool = False) -> None:
        """Doubles the map (no other transaction of this process may be open: LMDB's rule for set_mapsize; the
        caller's thread has none, and ``_applying`` keeps the other threads' writes out). ``after_full``: only
        if it has not grown since the last MapFullError."""
        with self._applying:
            if after_full and self.map_size > self._full_at:
                return
            if self.map_size >= self.max_map_size:
                raise StoreFull("the event log reached its maximum size", max_map_size=self.max_map_size)
            self.map_size = min(self.map_size * 2, self.max_map_size)
            self.env.set_mapsize(self.map_size)
        log.warning("log.map_grown", map_size=self.map_size)

    def prepare(self, envelopes: Sequence[Envelope], check: Callable[[Envelope], None] | None = None,
                groups: dict[str, dict[str, Any]] | None = None) -> Prepared:
        """Decides each envelope's fate and seq and makes its record, without writing anything (``write`` seals it).

        Seqs continue from the last prepared batch, not from the durable head: batches are written in the
        order they were prepared, or, after a failed write, abandoned together.
        """
        results: list[int | Rejected] = []
        head = self._assigned
        first = head + 1
        sealing = self.cipher is not None
        key_id = 0 if self.cipher is None else self.cipher.key_id
        version = BLOCK_VERSION if sealing else RECORD_VERSION
        logged_ns = max(time.time_ns(), self._last_ns)  # one logged-at time per batch
        prefixes: dict[str, bytes] = {}
        """topic -> record header + topic: the same for every record of a topic in this batch."""
        rows: list[tuple[bytes, bytes]] = []
        prefixes_of_rows: list[bytes] = []
        plain: list[bytes] = []
        topics: list[str] = []
        refused = addressed = 0
        id_rows: list[tuple[bytes, bytes]] = []
        corr_rows: list[tuple[bytes, bytes]] = []
        id_list = [env.id.encode() for env in envelopes]
        known: dict[bytes, bytes] = {}
        if id_list:
            with self.env.begin() as txn:
                known = dict(txn.cursor(db=self._ids).getmulti(id_list))
        pending, older = self._pending_ids, self._pending_older
        if (id_list and check is None and not known and pending.keys().isdisjoint(id_list)
                and older.keys().isdisjoint(id_list) and len(set(id_list)) == len(id_list)):
            fresh = self._prepare_fresh(envelopes, id_list, version, key_id, logged_ns, groups)
            if fresh is not None:
                return fresh
        pack_seq, encode = _SEQ.pack, encode_envelope
        for env, id_b in zip(envelopes, id_list, strict=True):
            seen = pending.get(id_b) or (older.get(id_b) if older else None) or (known.get(id_b) if known else None)
            if seen is not None:
                results.append(_SEQ.unpack(seen)[0])
                continue
            topic = env.topic
            try:
                if check is not None:
                    check(env)
                prefix = prefixes.get(topic)
                if prefix is None:
                    topic_b = topic.encode()
                    if len(topic_b) > 255:
                        raise Rejected("validation", f"topic longer than 255 bytes: {topic[:40]}...")
                    prefix = prefixes[topic] = _HEADER.pack(version, key_id, logged_ns, len(topic_b)) + topic_b
            except Rejected as exc:
                results.append(exc)
                refused += 1
                continue
            head += 1
            env.seq = head
            key = pack_seq(head)
            body = encode(env)
            plain.append(body)
            topics.append(topic)
            if sealing:
                prefixes_of_rows.append(prefix)
            else:
                rows.append((key, prefix + body))
            pending[id_b] = key
            id_rows.append((id_b, key))
            if env.recipient:
                addressed += 1
            cid = env.correlation_id
            if cid and cid != env.id:
                corr_rows.append((cid.encode() + b"\x00" + key, b""))
            results.append(head)
        if plain:
            self._last_ns = logged_ns
        self._assigned = head
        return Prepared(results, rows, id_rows, corr_rows, plain, topics, first, head, groups or {}, logged_ns,
                        refused, addressed, prefixes_of_rows if sealing and plain else None)

    def _prepare_fresh(self, envelopes: Sequence[Envelope], id_list: list[bytes], version: int, key_id: int,
                       logged_ns: int, groups: dict[str, dict[str, Any]] | None) -> Prepared | None:
        """``prepare`` of a batch whose envelopes all become new records (checked already, no id seen before):
        the same records, made by C-level maps over the batch instead of a Python loop turn per record. None
        when a topic is too long for a record (the per-record path refuses just those)."""
        topics = [env.topic for env in envelopes]
        heads: dict[str, bytes] = {}
        for topic in set(topics):
            topic_b = topic.encode()
            if len(topic_b) > 255:
                return None
            heads[topic] = _HEADER.pack(version, key_id, logged_ns, len(topic_b)) + topic_b
        first = self._assigned + 1
        seqs = range(first, first + len(envelopes))
        for env, seq in zip(envelopes, seqs, strict=True):
            env.seq = seq
        keys = list(map(_SEQ.pack, seqs))
        plain = list(map(encode_envelope, envelopes))
        prefixes = list(map(heads.__getitem__, topics))
        sealing = self.cipher is not None
        rows = [] if sealing else list(zip(keys, map(bytes.__add__, prefixes, plain), strict=True))
        id_rows = list(zip(id_list, keys, strict=True))
        self._pending_ids.update(id_rows)
        corr_rows = [(cid.encode() + b"\x00" + key, b"") for env, key in zip(envelopes, keys, strict=True)
                     if (cid := env.correlation_id) and cid != env.id]
        addressed = sum(1 for env in envelopes if env.recipient)
        self._last_ns = logged_ns
        self._assigned = seqs[-1]
        return Prepared(list(seqs), rows, id_rows, corr_rows, plain, topics, first, seqs[-1], groups or {},
                        logged_ns, 0, addressed, prefixes if sealing else None)

    def _sealed_rows(self, first: int, prefixes: list[bytes], bodies: list[bytes]) -> list[tuple[bytes, bytes]]:
        """The rows of records ``first``.. sealed in blocks (``prefixes``: each record's header + topic).

        Written as chains of C-level map/zip calls: this runs for every record the broker logs."""
        assert self.cipher is not None
        seal, pack_len, join = self.cipher.seal, _LEN.pack, b"".join
        lens = list(map(len, bodies))
        heads = {p: p[_HEADER.size - 1:] for p in set(prefixes)}
        """Header + topic -> topic length + topic: the record's part of the associated data."""
        rows: list[tuple[bytes, bytes]] = []
        start, total = 0, len(bodies)
        while start < total:
            end = min(start + BLOCK_RECORDS, total)
            if sum(lens[start:end]) > BLOCK_BYTES:
                end, size = start + 1, lens[start]
                while end < total and end - start < BLOCK_RECORDS and size + lens[end] <= BLOCK_BYTES:
                    size += lens[end]
                    end += 1
            n = end - start
            block_prefixes, block_lens = prefixes[start:end], lens[start:end]
            aad = _BLOCK_AAD.pack(first + start, n) + join(map(join, zip(
                map(heads.__getitem__, block_prefixes), map(pack_len, block_lens), strict=True)))
            sealed = memoryview(seal(join(bodies[start:end]), aad))
            bounds = list(itertools.accumulate(block_lens, initial=_SEAL_LEAD))
            # the first slice leads with the seal's header, the last ends with its tag
            bounds[0], bounds[n] = 0, len(sealed)
            slices = map(sealed.__getitem__, map(slice, bounds, bounds[1:]))
            rows.extend(zip(map(_SEQ.pack, range(first + start, first + end)),
                            map(join, zip(block_prefixes, _places(n), slices, strict=True)), strict=True))
            start = end
        return rows

    def write(self, batches: Sequence[Prepared]) -> int:
        """Makes prepared batches durable (any thread, one at a time; ``apply`` may run at the same time on
        another): as one journal frame (one write, one fdatasync), or, from ``DIRECT_ROWS`` records on, in one
        synced LMDB commit with the frames before them (a big batch gains nothing from the journal but a second
        copy). Returns the last seq LMDB holds if it wrote to LMDB, else 0.

        Raises StoreFull (the log could not hold them at its maximum size), lmdb.MapFullError (nothing written:
        grow, then write the same batches again) or OSError.
        """
        for b in batches:
            if b.unsealed is not None:  # kept if this write fails and is tried again
                b.rows, b.unsealed = self._sealed_rows(b.first, b.unsealed, b.bodies), None
        rows = [row for b in batches for row in b.rows]
        id_rows = [row for b in batches for row in b.id_rows]
        corr_rows = [row for b in batches for row in b.corr_rows]
        groups = {name: _group_codec_enc.encode(state) for b in batches for name, state in b.groups.items()}
        last = max([self._journaled, *(b.last for b in batches)])
        if len(rows) >= DIRECT_ROWS:
            with self._applying:  # no apply takes this entry before it is written, nor after it failed
                with self._state:
                    self._unapplied.append(_Unapplied(rows, id_rows, corr_rows, groups, last,
                                                      next_frame=(self._epoch, self._number)))
                try:
                    applied = self._apply_locked()
                except BaseException:
                    with self._state:
                        self._unapplied.pop()
                    raise
            self._journaled = last
            return applied
        body = _group_codec_enc.encode((rows, id_rows, corr_rows, groups, last))
        if self._apply_failing and self._unapplied_bytes + len(body) > MAX_UNAPPLIED:
            raise StoreError("the log's journal cannot be applied to LMDB (see the broker's log): not taking more",
                             unapplied_bytes=self._unapplied_bytes)
        applied = 0
        if not self._fits(len(body)) or not self._journal.room(len(body)):
            applied = self.apply()  # every frame so far (only this thread adds frames)
            if not self._fits(len(body)):
                raise StoreFull("the event log reached its maximum size", max_map_size=self.max_map_size)
            self._rewind()
        elif self._journal.offset > REWIND_AT and not self._unapplied:
            self._rewind()
        self._journal.append(self._epoch, self._number, body)
        self._number += 1
        with self._state:
            self._unapplied.append(_Unapplied(rows, id_rows, corr_rows, groups, last, (self._epoch, self._number),
                                              len(body), time.monotonic()))
            self._unapplied_bytes += len(body)
        self._journaled = last
        return applied

    def unavailable(self, error: BaseException) -> BusError:
        """What publishers are told when a write failed: a BusError as it is; anything else (a disk error from
        the journal or LMDB: LMDB reports a full disk as an I/O error) as StoreUnavailable, naming the log's
        folder and the room left on its disk."""
        if isinstance(error, BusError):
            return error
        try:
            free: int | None = shutil.disk_usage(self.path).free
        except OSError:
            free = None
        room = "free space unknown" if free is None else f"{free / 2**20:.0f} MiB free on its disk"
        return StoreUnavailable(f"the event log at {self.path} could not be written ({room}): {error}",
                                path=str(self.path), free_bytes=free)

    def _fits(self, adding: int) -> bool:
        """Whether LMDB at its maximum size surely holds the frames waiting and one of ``adding`` bytes: an
        acknowledged frame must fit."""
        used = (self.env.info()["last_pgno"] + 1) * self.env.stat()["psize"]
        return used + 2 * (self._unapplied_bytes + adding) + (256 << 10) <= self.max_map_size

    @property
    def unapplied_frames(self) -> int:
        return len(self._unapplied)

    def apply_due(self) -> float | None:
        """Seconds until the journal's frames should be applied to LMDB (0: now), None when there are none."""
        with self._state:
            if not self._unapplied:
                return None
            if self._unapplied_bytes >= APPLY_BYTES:
                return 0.0
            since = self._unapplied[0].since
        return max(0.0, since + APPLY_AFTER_S - time.monotonic())

    def apply(self) -> int:
        """Copies the journal's frames written so far into LMDB in one synced commit (any thread: frames written
        meanwhile wait for the next apply); returns the last seq LMDB now holds.

        Raises lmdb.MapFullError (nothing applied: grow, then apply again) or StoreError."""
        with self._applying:
            return self._apply_locked()

    def _apply_locked(self) -> int:
        with self._state:
            todo = self._unapplied[:]
        if not todo:
            return self._lmdb_last
        try:
            self._to_lmdb(todo)
        except BaseException as exc:
            self._apply_failing = True
            if isinstance(exc, lmdb.MapFullError):
                self._full_at = self.map_size
            raise
        self._apply_failing = False
        with self._state:
            del self._unapplied[:len(todo)]
            self._unapplied_bytes -= sum(u.size for u in todo)
        self._lmdb_last = todo[-1].last
        return todo[-1].last

    def _to_lmdb(self, todo: list[_Unapplied]) -> None:
        """One synced commit of ``todo``'s writes, recording the journal frame that follows the last of them
        (not the newest frame: the writer may have added frames since ``todo`` was taken)."""
        with self.env.begin(write=True) as txn:
            log_cur = txn.cursor(db=self._log)
            ids_cur = txn.cursor(db=self._ids)
            corr_cur = txn.cursor(db=self._corr)
            groups: dict[str, bytes] = {}
            for u in todo:
                if u.rows:
                    log_cur.putmulti(u.rows, append=True)
                    ids_cur.putmulti(u.id_rows)
                if u.corr_rows:
                    corr_cur.putmulti(u.corr_rows)
                groups.update(u.groups)
            for name, state in groups.items():
                txn.put(name.encode(), state, db=self._groups)
            txn.put(b"journal", _POSITION.pack(*todo[-1].next_frame), db=self._meta)

    def _rewind(self) -> None:
        """The journal starts again at 0 with a new epoch (every frame in it is in LMDB)."""
        self._epoch += 1
        self._number = 0
        self._journal.rewind()

    def committed(self, batches: Sequence[Prepared]) -> None:
        """Records that ``write(batches)`` succeeded: the durable head moves on; their records are read from
        memory until ``applied`` says LMDB holds them."""
        for b in batches:
            if b.last >= b.first:
                self.head = b.last
                self._fresh.append(b)

    def applied(self, last: int) -> None:
        """Records that LMDB holds every record up to ``last`` (what ``apply`` returned). An apply can report
        records whose write this thread has not heard of yet: it counts only up to the durable head."""
        self.lmdb_head = max(self.lmdb_head, min(last, self.head))
        fresh = self._fresh
        done = 0
        while done < len(fresh) and fresh[done].last <= last:
            done += 1
        del fresh[:done]
        if self.lmdb_head == self._assigned:  # nothing else in flight: no id is pending
            self._pending_ids.clear()
            self._pending_older = {}
        elif self.lmdb_head >= self._older_last:
            self._pending_older, self._pending_ids = self._pending_ids, {}
            self._older_last = self._assigned

    def abandon(self) -> None:
        """Forgets every prepared batch not yet committed (after a write failed for good)."""
        self._assigned = self.head
        head = self.head
        self._pending_ids = {k: v for k, v in self._pending_ids.items() if _SEQ.unpack(v)[0] <= head}
        self._pending_older = {k: v for k, v in self._pending_older.items() if _SEQ.unpack(v)[0] <= head}

    def load_groups(self) -> dict[str, dict[str, Any]]:
        with self.env.begin() as txn:
            return {k.decode(): _group_codec_dec.decode(v) for k, v in txn.cursor(db=self._groups)}

    # -- reading ---------------------------------------------------------------------------------

    def _decode(self, key: bytes, raw: bytes | memoryview[int], txn: lmdb.Transaction | None = None) -> Record:
        version, key_id, logged_ns, tlen = _HEADER.unpack_from(raw)
        topic = bytes(raw[_HEADER.size:_HEADER.size + tlen]).decode()
        return self._record(_SEQ.unpack(key)[0], raw, version, key_id, logged_ns, topic, txn)

    def _record(self, seq: int, raw: bytes | memoryview[int], version: int, key_id: int, logged_ns: int,
                topic: str, txn: lmdb.Transaction | None) -> Record:
        """The record of a stored row whose header and topic are already read; its body opened if sealed."""
        if version not in (RECORD_VERSION, BLOCK_VERSION):
            raise IntegrityError(f"log record {seq} has unknown format {version}", check="version", seq=seq)
        if key_id == 0 and self.cipher is not None:  # the header's key id is not authenticated: 0 is a downgrade
            raise IntegrityError("log record is not sealed but encryption is on", seq=seq, check="downgrade")
        if (key_id or version == BLOCK_VERSION) and self.cipher is None:
            raise IntegrityError("log record is sealed but no key is loaded", seq=seq)
        start = _HEADER.size + raw[_HEADER.size - 1]
        if version == BLOCK_VERSION:
            index, count = _PLACE.unpack_from(raw, start)
            if not index < count <= BLOCK_RECORDS or index >= seq:
                raise IntegrityError(f"log record {seq} has an impossible place in its block", check="block", seq=seq)
            body = self._block(seq - index, count, txn)[index]
        elif key_id:
            assert self.cipher is not None
            body = self.cipher.open(key_id, bytes(raw[start:]), _SEQ.pack(seq) + topic.encode())
        else:
            body = bytes(raw[start:])
        return Record(seq, topic, logged_ns, body)

    def _block(self, first: int, count: int, txn: lmdb.Transaction | None = None) -> list[bytes]:
        """The envelopes of the block of records ``first``..``first + count - 1``, opened (the last one cached),
        read in ``txn`` if given."""
        cached = self._last_block
        if cached is not None and cached[0] == first and cached[1] == count:
            return cached[2]
        if txn is None:
            with self.env.begin(buffers=True) as own:
                bodies = self._open_block(own, first, count)
        else:
            bodies = self._open_block(txn, first, count)
        self._last_block = (first, count, bodies)
        return bodies

    def _open_block(self, txn: lmdb.Transaction, first: int, count: int) -> list[bytes]:
        """Reads the block's rows with one cursor walk and slices them with list-wide calls: replay and group
        catch-up read every record through here."""
        assert self.cipher is not None
        cur = txn.cursor(db=self._log)
        rows = list(itertools.islice(cur.iternext(), count)) if cur.set_range(_SEQ.pack(first)) else []
        # keys ascend: with the first and the last in place, every seq between is there
        if len(rows) < count or (_SEQ.unpack(rows[0][0])[0], _SEQ.unpack(rows[-1][0])[0]) != (first, first + count - 1):
            present = {_SEQ.unpack(key)[0] for key, _ in rows}
            seq = next(s for s in range(first, first + count) if s not in present)
            raise IntegrityError(f"log record {seq} of the block at {first} is missing", check="block", seq=seq)
        raws = [raw for _, raw in rows]
        heads = list(map(_HEADER.unpack_from, raws))
        starts = [_HEADER.size + head[3] for head in heads]
        key_id = heads[0][1]
        places = list(map(_PLACE.unpack_from, raws, starts))
        stray = next((i for i, (head, place) in enumerate(zip(heads, places, strict=True))
                      if head[0] != BLOCK_VERSION or head[1] != key_id or place != (i, count)), None)
        if stray is not None:
            raise IntegrityError(f"log record {first + stray} does not belong to the block at {first}",
                                 check="block", seq=first + stray)
        pieces = [raw[start + _PLACE.size:] for raw, start in zip(raws, starts, strict=True)]
        lengths = list(map(len, pieces))
        lengths[0] -= _SEAL_LEAD  # the first slice leads with the seal's header, the last ends with its tag
        lengths[-1] -= TAG_LEN
        if min(lengths) < 0:
            seq = first + next(i for i, n in enumerate(lengths) if n < 0)
            raise IntegrityError(f"log record {seq} is too short", check="length", seq=seq)
        topics = [raw[_HEADER.size - 1:start] for raw, start in zip(raws, starts, strict=True)]
        aad = _BLOCK_AAD.pack(first, count) + b"".join(
            itertools.chain.from_iterable(zip(topics, map(_LEN.pack, lengths), strict=True)))
        plain = memoryview(self.cipher.open(key_id, b"".join(pieces), aad))
        bounds = list(itertools.accumulate(lengths, initial=0))
        return list(map(bytes, map(plain.__getitem__, map(slice, bounds, bounds[1:]))))

    def _fresh_records(self, from_seq: int, to_seq: int) -> Iterator[Record]:
        """Records ``from_seq``..``to_seq`` of those not yet in LMDB, in order."""
        for b in self._fresh:
            if b.last < from_seq:
                continue
            if b.first > to_seq:
                return
            for i in range(max(from_seq, b.first) - b.first, min(to_seq, b.last) - b.first + 1):
                yield Record(b.first + i, b.topics[i], b.logged_ns, b.bodies[i])

    def get(self, seq: int) -> Record | None:
        if seq > self.lmdb_head:
            return next(self._fresh_records(seq, seq), None)
        with self.env.begin(buffers=True) as txn:
            raw = txn.get(_SEQ.pack(seq), db=self._log)
            return None if raw is None else self._decode(_SEQ.pack(seq), raw, txn)

    def seq_of_id(self, message_id: str) -> int | None:
        id_b = message_id.encode()
        pending = self._pending_ids.get(id_b) or self._pending_older.get(id_b)
        if pending is not None and _SEQ.unpack(pending)[0] <= self.head:
            return int(_SEQ.unpack(pending)[0])
        with self.env.begin() as txn:
            v = txn.get(id_b, db=self._ids)
            return None if v is None else int(_SEQ.unpack(v)[0])

    def traced_after(self, message_id: str, correlation_id: str, budget: int = 256) -> list[Record]:
        """The records of trace ``correlation_id`` logged after message ``message_id`` (at most ``budget`` of them,
        a page at most): where the replies to a request are."""
        seq = self.seq_of_id(message_id)
        if seq is None or not correlation_id:
            return []
        return self._read_correlated(correlation_id, seq + 1, self.head, (), None, budget, PAGE_BYTES, budget)[0]

    def topic_scan(self, from_seq: int, limit: int) -> Iterator[tuple[int, str, memoryview | None]]:
        """(seq, topic, raw record) from ``from_seq`` on, without decoding bodies: for routing. The raw record
        is None for a record not yet in LMDB (``body_of`` finds it in memory)."""
        n = 0
        if from_seq <= self.lmdb_head:
            with self.env.begin(buffers=True) as txn:
                cur = txn.cursor(db=self._log)
                if cur.set_range(_SEQ.pack(max(from_seq, 1))):
                    for key, raw in cur:
                        seq = _SEQ.unpack(key)[0]
                        if seq > self.lmdb_head:
                            break
                        tlen = raw[_HEADER.size - 1]
                        yield seq, bytes(raw[_HEADER.size:_HEADER.size + tlen]).decode(), raw
                        n += 1
                        if n >= limit:
                            return
                        from_seq = seq + 1
        for rec in self._fresh_records(max(from_seq, self.lmdb_head + 1), self.head):
            yield rec.seq, rec.topic, None
            n += 1
            if n >= limit:
                return

    def body_of(self, seq: int, raw: memoryview | bytes | None) -> bytes:
        if raw is None:
            rec = self.get(seq)
            if rec is None:
                raise IntegrityError(f"log record {seq} is missing", check="missing", seq=seq)
            return rec.body
        return self._decode(_SEQ.pack(seq), raw).body

    def seq_at_time(self, ns: int) -> int:
        """The first seq logged at or after ``ns`` (head + 1 if none): binary search on logged-at time."""
        fresh = next((b.first for b in self._fresh if b.logged_ns >= ns), None)
        lo, hi = 1, self.lmdb_head + 1
        with self.env.begin(buffers=True) as txn:
            while lo < hi:
                mid = (lo + hi) // 2
                raw = txn.get(_SEQ.pack(mid), db=self._log)
                if raw is None or _HEADER.unpack_from(raw)[2] >= ns:
                    hi = mid
                else:
                    lo = mid + 1
        if lo <= self.lmdb_head:
            return lo
        return fresh if fresh is not None else self.head + 1

    def read(self, *, from_seq: int = 1, to_seq: int | None = None, patterns: Sequence[str] = (),
             since_ns: int | None = None, until_ns: int | None = None, correlation_id: str = "",
             limit: int = 1000, budget: int = 100_000,
             max_bytes: int = PAGE_BYTES) -> tuple[list[Record], int, bool]:
        """One page of a replay: (records, next_seq, done). Scans at most ``budget`` records, and ends after the
        record that brings it to ``max_bytes`` (one loop turn of the broker must not build a page of 1 MB
        messages a thousand long)."""
        to_seq = self.head if to_seq is None else min(to_seq, self.head)
        if since_ns is not None:
            from_seq = max(from_seq, self.seq_at_time(since_ns))
        if correlation_id:
            return self._read_correlated(correlation_id, from_seq, to_seq, patterns, until_ns, limit, max_bytes)
        out: list[Record] = []
        seq = max(from_seq, 1)
        pats = tuple(patterns)
        scanned = size = 0
        if seq > to_seq:
            return out, seq, True
        in_lmdb = min(to_seq, self.lmdb_head)
        if seq <= in_lmdb:
            with self.env.begin(buffers=True) as txn:
                cur = txn.cursor(db=self._log)
                for key, raw in (cur if cur.set_range(_SEQ.pack(seq)) else ()):
                    seq = _SEQ.unpack(key)[0]
                    if seq > in_lmdb:
                        break
                    scanned += 1
                    version, key_id, ns, tlen = _HEADER.unpack_from(raw)
                    if until_ns is not None and ns > until_ns:
                        return out, seq, True
                    topic = bytes(raw[_HEADER.size:_HEADER.size + tlen]).decode()
                    if not pats or matches_any(pats, topic):
                        out.append(rec := self._record(seq, raw, version, key_id, ns, topic, txn))
                        size += len(rec.body)
                        if len(out) >= limit or size >= max_bytes:
                            return out, seq + 1, seq >= to_seq
                    if scanned >= budget:
                        return out, seq + 1, seq >= to_seq
        for rec in self._fresh_records(max(seq, self.lmdb_head + 1), to_seq):
            seq = rec.seq
            scanned += 1
            if until_ns is not None and rec.logged_ns > until_ns:
                return out, seq, True
            if not pats or matches_any(pats, rec.topic):
                out.append(rec)
                size += len(rec.body)
                if len(out) >= limit or size >= max_bytes:
                    return out, seq + 1, seq >= to_seq
            if scanned >= budget:
                return out, seq + 1, seq >= to_seq
        return out, to_seq + 1, True

    def _read_correlated(self, cid: str, from_seq: int, to_seq: int, patterns: Sequence[str], until_ns: int | None,
                         limit: int, max_bytes: int, budget: int = 10_000) -> tuple[list[Record], int, bool]:
        """A page of one trace: the request (its id is the correlation id) and the records indexed under it, from
        ``from_seq`` on. The index is read from ``from_seq`` for at most ``budget`` entries, so a page of a long
        trace costs the same as the first one."""
        from_seq = max(from_seq, 1)
        prefix = cid.encode() + b"\x00"
        seqs: set[int] = set()
        more = False  # entries left in the index past what this page read
        with self.env.begin() as txn:
            cur = txn.cursor(db=self._corr)
            if cur.set_range(prefix + _SEQ.pack(from_seq)):
                for key in cur.iternext(values=False):
                    if not key.startswith(prefix):
                        break
                    s = _SEQ.unpack(key[len(prefix):])[0]
                    if s > to_seq:
                        break
                    if len(seqs) >= budget:
                        more = True
                        break
                    seqs.add(s)
        last = max(seqs) if more else to_seq  # indexed entries past ``last`` are for the next page
        root = self.seq_of_id(cid)
        if root is not None and from_seq <= root <= last:
            seqs.add(root)
        seqs.update(s for b in self._fresh for key, _ in b.corr_rows if key.startswith(prefix)
                    and from_seq <= (s := _SEQ.unpack(key[len(prefix):])[0]) <= last)
        out: list[Record] = []
        pats = tuple(patterns)
        size = 0
        for s in sorted(seqs):
            rec = self.get(s)
            if rec is None:
                continue
            if until_ns is not None and rec.logged_ns > until_ns:
                return out, s, True
            if not pats or matches_any(pats, rec.topic):
                out.append(rec)
                size += len(rec.body)
                if len(out) >= limit or size >= max_bytes:
                    return out, s + 1, s >= to_seq
        return out, last + 1, not more

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
                while len(rows) < batch:
                    if not cur.set_range(_SEQ.pack(seq)):
                        seq = self.head + 1
                        break
                    key, raw = cur.key(), cur.value()
                    seq = _SEQ.unpack(key)[0]
                    version, key_id, logged_ns, tlen = _HEADER.unpack_from(raw)
                    if version == BLOCK_VERSION:
                        index, count = _PLACE.unpack_from(raw, _HEADER.size + tlen)
                        if key_id != cipher.key_id:
                            rows.extend(self._resealed_block(txn, seq - index, count))
                        seq += count - index
                        continue
                    if key_id != cipher.key_id:
                        topic_b = raw[_HEADER.size:_HEADER.size + tlen]
                        # key id 0: a record from before encryption was turned on, sealed now
                        plain = raw[_HEADER.size + tlen:] if key_id == 0 else self._decode(key, raw).body
                        header = _HEADER.pack(version, cipher.key_id, logged_ns, tlen)
                        rows.append((key, header + topic_b + cipher.seal(plain, key + topic_b)))
                    seq += 1
                for key, value in rows:
                    txn.put(key, value, db=self._log)
            done += len(rows)
        self._last_block = None
        log.info("log.resealed", records=done, key_id=cipher.key_id)
        return done

    def _resealed_block(self, txn: lmdb.Transaction, first: int, count: int) -> list[tuple[bytes, bytes]]:
        assert self.cipher is not None
        bodies = self._open_block(txn, first, count)
        prefixes = []
        for seq in range(first, first + count):
            raw = txn.get(_SEQ.pack(seq), db=self._log)
            assert raw is not None, "_open_block read every record of the block"
            _version, _key_id, logged_ns, tlen = _HEADER.unpack_from(raw)
            prefixes.append(_HEADER.pack(BLOCK_VERSION, self.cipher.key_id, logged_ns, tlen)
                            + raw[_HEADER.size:_HEADER.size + tlen])
        return self._sealed_rows(first, prefixes, bodies)

    def stats(self) -> dict[str, Any]:
        info = self.env.info()
        stat = self.env.stat()
        return {"head": self.head, "in_lmdb": self.lmdb_head, "map_size": info["map_size"],
                "last_page": info["last_pgno"], "page_size": stat["psize"], "path": str(self.path)}
