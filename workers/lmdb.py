"""The LMDB working-memory worker: recent messages per conversation and session context, with a TTL.

One LMDB environment per process, opened in ``open()``, with one named database per kind of data:

==========  ===============================================  ==============================================
database    key                                              value
==========  ===============================================  ==============================================
messages    conversation + ts (us) + log seq, big-endian     expires_at (ms) + its ``msgids`` key (length
                                                             prefixed) + WorkingMessage
msgids      message id                                       key in ``messages`` (idempotent appends)
convs       conversation                                     number of messages held
context     session + context key                            expires_at (ms) + value
expiry      expires_at (ms) + kind + key of the item         (empty)
tracking    b"position", b"format"                           last applied log seq, ``FORMAT``
outbox      last log seq of a transaction + b"b"             its entries: count, their seqs, then one value
                                                             with each seq's encoded envelopes to publish
==========  ===============================================  ==============================================

Conversations and sessions are length-prefixed in keys, so a conversation's messages are one
contiguous range, newest last: recent messages are one backwards cursor scan. The expiry time sits in
front of every stored value, so a read skips expired items without decoding them, and the expiry index
is ordered by time, so expiring visits only what has expired (plus one entry). A message's ``msgids`` key
sits after it, so evicting the oldest message does not open it to find its id.

The map grows when full: every write of a batch goes through ``_Batch``, which journals it, so on
``lmdb.MapFullError`` the transaction is aborted, the map doubled (up to ``max_map_size``) and the
journal replayed; the failed step then runs again. At the cap, writes that add data are refused with
``StoreFull`` while room stays free for deletes, replies and the position (``LmdbSettings.reserve``).
"""

from __future__ import annotations

import functools
import hashlib
import os
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Annotated, Any, ClassVar, TypeVar

import lmdb
import msgspec
import structlog

from bus.keys import NONCE_LEN, DerivedKey, KeyRing, subkey, write_private
from bus.sealing import VERSION, open_sealed
from contracts.errors import IntegrityError, StoreError, StoreFull, StoreUnavailable, ValidationError
from contracts.inventory import InventoryItem, InventoryPage
from contracts.working import (
    APPEND,
    CONTEXT_CHANGED,
    CONTEXT_CLEAR,
    CONTEXT_GET,
    CONTEXT_SET,
    CONVERSATION_CLEAR,
    INVENTORY,
    RECENT,
    AppendMessage,
    AppendReply,
    ClearedConversation,
    ContextChanged,
    ContextClear,
    ContextClearReply,
    ContextGet,
    ContextGetReply,
    ContextSet,
    ContextSetReply,
    ConversationClear,
    ConversationClearReply,
    RecentReply,
    RecentRequest,
    WorkingInventory,
    WorkingMessage,
)
from workers.base import Backend, Context, handles

log = structlog.get_logger("membus.lmdb")

MESSAGE_CHANGED = "conversation.message.changed"
"""Published by the libSQL worker when it stores a message (its contract lives in contracts/structured.py)."""

KiB = 1024
MiB = 1024 * KiB
_U64 = struct.Struct(">Q")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_POSITION = b"position"
_FORMAT = b"format"
FORMAT = 3
"""Version of the store's layout, kept under ``tracking``; 1 (no entry): ``msgids`` keys without the ULID time;
2: message values without their ``msgids`` key."""
_OUTBOX_BATCH = b"b"
"""Suffix of an outbox record's key (the record's last seq): it holds the entries of one transaction."""
_KIND_MESSAGE, _KIND_CONTEXT, _KIND_CLEARED = b"m", b"c", b"x"
_EXPIRING = {_KIND_MESSAGE: "messages", _KIND_CONTEXT: "context", _KIND_CLEARED: "cleared"}
"""The database an expiry entry's kind points into."""
_ID_MAX_BYTES = 240
"""Two ids and the framing stay under LMDB's 511-byte key limit."""
_UNSYNCED = "unsynced"
"""In the store's folder while it may hold commits the OS has not written to disk: the boot id of that run."""
_DATABASES = ("messages", "msgids", "convs", "context", "cleared", "expiry", "tracking", "outbox")


class LmdbSettings(msgspec.Struct, frozen=True):
    ttl_seconds: Annotated[float, msgspec.Meta(gt=0)] = 24 * 3600.0
    map_size: Annotated[int, msgspec.Meta(ge=64 * KiB)] = 64 * MiB
    max_map_size: Annotated[int, msgspec.Meta(ge=2 * MiB)] = 1024 * MiB
    max_messages: Annotated[int, msgspec.Meta(ge=1)] = 200
    """Messages kept per conversation; the oldest are dropped."""
    expire_per_batch: Annotated[int, msgspec.Meta(ge=0)] = 256
    """Expired items removed at the start of every batch (0: only ``expire()`` removes them)."""
    encryption: Any = None
    """The store's KeyRing (bus.keys): values sealed with AES-256-GCM bound to their key and expiry, ids in
    keys replaced by keyed hashes (bus.sealing.Blinder). None: plaintext."""
    sync_commits: bool = False
    """Flush every batch's commit to disk. Off (where the machine's boot id can be read, Linux): commits reach
    the disk when the OS writes them back, or when the worker goes idle or stops; a process crash loses
    nothing, and after an OS crash or power loss the store is wiped at the next start and rebuilt from the log
    (the ``unsynced`` file)."""

    @property
    def reserve(self) -> int:
        """Room kept free at the cap for deletes, replies and the position: LMDB needs pages to delete,
        and cannot reuse the pages the previous transaction freed."""
        return max(self.max_map_size // 8, 1 * MiB)


class MessageChanged(msgspec.Struct, frozen=True, kw_only=True):
    """The fields of ``conversation.message.changed`` this worker follows; other fields are ignored."""

    op: str = "created"
    message_id: str
    conversation_id: str
    user_id: str
    role: str
    text: str
    created_at: float


_forks = 0
"""Forks this process is a child of: a child never uses random bytes drawn before the fork (Sealer)."""


def _forked() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_forked)


class Sealer:
    """``bus.sealing.seal`` (the same record format, opened by ``open_sealed``) with its nonces drawn from
    ``os.urandom`` in blocks: one system call per 256 records instead of one per record. Each nonce is still
    an independent random 96-bit value; a forked child draws its own block. Seals only inside LMDB write
    transactions, which one writer at a time holds."""

    _BLOCK = 256 * NONCE_LEN

    def __init__(self, key: DerivedKey) -> None:
        self._header = bytes([VERSION]) + key.key_id
        self._encrypt = key.aead.encrypt
        self._pool = b""
        self._at = 0
        self._forks = _forks

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        at = self._at
        if at >= len(self._pool) or self._forks != _forks:
            self._pool, self._forks, at = os.urandom(self._BLOCK), _forks, 0
        nonce = self._pool[at : at + NONCE_LEN]
        self._at = at + NONCE_LEN
        header = self._header
        return header + nonce + self._encrypt(nonce, plaintext, header + aad)


class ValueCodec:
    """Every stored value is encoded and decoded here; with a keyring, sealed bound to ``aad`` (its place)."""

    def __init__(self, keyring: KeyRing | None = None) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._decoders: dict[Any, msgspec.msgpack.Decoder[Any]] = {}
        self.keyring = keyring
        self._sealer = None if keyring is None else Sealer(keyring.current)

    def encode(self, value: Any, aad: bytes) -> bytes:
        data = self._encoder.encode(value)
        return data if self._sealer is None else self._sealer.seal(data, aad)

    def decode(self, data: bytes | memoryview, type_: Any, aad: bytes) -> Any:
        decoder = self._decoders.get(type_)
        if decoder is None:
            decoder = self._decoders[type_] = msgspec.msgpack.Decoder(type_)
        if self.keyring is not None:
            data = open_sealed(self.keyring, data, aad)
        try:
            return decoder.decode(data)
        except msgspec.DecodeError as exc:
            raise IntegrityError(f"lmdb value undecodable: {exc}", check="decode") from None


_CROCKFORD = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_TO_BASE32 = bytes(b"0123456789abcdefghijklmnopqrstuv"[_CROCKFORD.index(c)] if c in _CROCKFORD else ord("!")
                   for c in range(256))
"""Crockford base32 (ULIDs, contracts/ids.py) to the digits ``int(_, 32)`` reads; "!" makes it fail."""
_NO_TIME = bytes(6)
_ulid_times: dict[bytes, bytes] = {}
"""Recent ULID time prefixes (10 characters) and their value: ids made in one millisecond share one."""


def _ulid_ms(raw_id: bytes) -> bytes:
    """The 48-bit creation time (ms, big-endian) of an id that is a ULID, else six zero bytes."""
    if len(raw_id) != 26:
        return _NO_TIME
    prefix = raw_id[:10]
    ms = _ulid_times.get(prefix)
    if ms is None:
        try:
            value = int(prefix.translate(_TO_BASE32), 32)
        except ValueError:
            return _NO_TIME
        if len(_ulid_times) >= 1024:
            _ulid_times.clear()
        ms = _ulid_times[prefix] = _U64.pack(value)[2:] if value >> 48 == 0 else _NO_TIME
    return ms


class IdKeys:
    """What ids become in LMDB keys. Without a keyring, the ids themselves. With one, their keyed hashes:
    the values of ``bus.sealing.Blinder(keyring, purpose)`` (keyed BLAKE2b, 16 bytes), computed from a keyed
    state made once and remembered for conversation and session ids, which recur; a message id's key starts
    with the id's own ULID time, so that the ``msgids`` index grows at its end like the plaintext one."""

    MEMO = 4096

    def __init__(self, keyring: KeyRing | None, purpose: str) -> None:
        self._keyed = None if keyring is None else hashlib.blake2b(key=subkey(keyring.current, purpose),
                                                                  digest_size=16)
        self._memo: dict[bytes, bytes] = {}

    @property
    def enabled(self) -> bool:
        return self._keyed is not None

    def blind(self, raw_id: bytes) -> bytes:
        if self._keyed is None:
            return raw_id
        h = self._keyed.copy()
        h.update(raw_id)
        return h.digest()

    def recurring(self, raw_id: bytes) -> bytes:
        """``blind``, remembered: for ids that come back (conversations, sessions)."""
        blinded = self._memo.get(raw_id)
        if blinded is None:
            if len(self._memo) >= self.MEMO:
                self._memo.clear()
            blinded = self._memo[raw_id] = self.blind(raw_id)
        return blinded

    def message(self, raw_id: bytes) -> bytes:
        """The key of a message id in ``msgids``."""
        return raw_id if self._keyed is None else _ulid_ms(raw_id) + self.blind(raw_id)


def boot_id() -> str | None:
    """This boot of the machine, or None where it cannot be read (not Linux: every commit is then synced)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _u64(value: int) -> bytes:
    return _U64.pack(value)


def _expires_ms(stored: bytes | memoryview) -> int:
    """The expiry time in front of a stored value."""
    try:
        return int(_U64.unpack_from(stored)[0])
    except struct.error:
        raise IntegrityError(f"lmdb value of {len(stored)} bytes, too short", check="decode") from None


def _id_bytes(value: str, topic: str, field: str, blinded: bool = False) -> bytes:
    """``blinded``: the id goes into keys as its 16-byte keyed hash, so any length fits."""
    raw = value.encode()
    if not raw or (len(raw) > _ID_MAX_BYTES and not blinded):
        raise ValidationError(f"invalid payload for topic {topic!r} field {field!r}: expected 1 to "
                              f"{_ID_MAX_BYTES} bytes of UTF-8, got {len(raw)}", topic=topic, field=field,
                              expected=f"1..{_ID_MAX_BYTES} bytes")
    return raw


def _prefix(raw_id: bytes) -> bytes:
    return _U16.pack(len(raw_id)) + raw_id


def _now(ctx: Context) -> float:
    """A handler's clock: the request's creation time, so replaying the log gives the same answers."""
    return ctx.envelope.ts / 1e9 if ctx.envelope.ts else time.time()


Write = tuple[Any, bytes, bytes | None]
"""A journalled write: (database, key, value); value None is a delete."""


class _Batch:
    """The write transaction handed to handlers: one LMDB write transaction plus a journal of every write.

    Savepoints are marks in the journal, not LMDB nested transactions (a nested begin and commit per message
    cost about a tenth of the worker's CPU). Rolling one back aborts the transaction and replays the journal
    up to its mark, which only happens when a handler fails after it wrote something. The same replay moves
    the whole transaction into a bigger map after MapFullError.
    """

    def __init__(self, env: lmdb.Environment) -> None:
        self._env = env
        self._txn: lmdb.Transaction | None = env.begin(write=True)
        self._marks: list[tuple[int, int]] = []
        """(journal length, outbox length) when each open savepoint began."""
        self.journal: list[Write] = []
        self.outbox: list[tuple[int, list[bytes]]] = []
        """Outbox entries added in this transaction: written as one record when it commits."""

    @property
    def current(self) -> lmdb.Transaction:
        """The open transaction: read from it, write through put/delete."""
        txn = self._txn
        if txn is None:
            raise StoreError("the LMDB transaction was aborted: its writes no longer fit in the map")
        return txn

    def get(self, db: Any, key: bytes) -> bytes | None:
        value = self.current.get(key, db=db)
        return None if value is None else bytes(value)

    def put(self, db: Any, key: bytes, value: bytes) -> None:
        self.current.put(key, value, db=db)
        self.journal.append((db, key, value))

    def delete(self, db: Any, key: bytes) -> bool:
        found = bool(self.current.delete(key, db=db))
        if found:
            self.journal.append((db, key, None))
        return found

    def savepoint(self) -> _Savepoint:
        return _Savepoint(self)

    def begin_savepoint(self) -> None:
        self._marks.append((len(self.journal), len(self.outbox)))

    def release_savepoint(self) -> None:
        self._marks.pop()

    def rollback_savepoint(self) -> None:
        mark, outbox_mark = self._marks.pop()
        del self.outbox[outbox_mark:]
        if len(self.journal) > mark and self._txn is not None:
            self.replay(mark)

    def commit(self) -> None:
        txn = self.current
        self._txn = None
        txn.commit()

    def abort(self) -> None:
        if self._txn is not None:
            self._txn.abort()
            self._txn = None

    def replay(self, keep: int) -> None:
        """Aborts the transaction and replays its first ``keep`` writes in a new one. Raises MapFullError
        if they do not fit, leaving everything aborted."""
        self.abort()
        del self.journal[keep:]
        txn = self._env.begin(write=True)
        try:
            for db, key, value in self.journal:
                if value is None:
                    txn.delete(key, db=db)
                else:
                    txn.put(key, value, db=db)
        except BaseException:
            txn.abort()
            raise
        self._txn = txn


class _Savepoint:
    """``with batch.savepoint():`` the writes inside are undone alone if the block raises."""

    __slots__ = ("_batch",)

    def __init__(self, batch: _Batch) -> None:
        self._batch = batch

    def __enter__(self) -> None:
        self._batch.begin_savepoint()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc_type is None:
            self._batch.release_savepoint()
        else:
            self._batch.rollback_savepoint()


F = TypeVar("F", bound=Callable[..., Any])


def _writes(*, adds_data: bool) -> Callable[[F], F]:
    """Runs a handler again in a bigger map when LMDB reports the map full.

    ``adds_data`` handlers are refused with StoreFull once the store nears ``max_map_size``.
    """

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def run(self: LmdbBackend, txn: _Batch, payload: Any, ctx: Context) -> Any:
            emitted, mark = len(ctx.events), len(txn.journal)
            try:  # the first try without _with_growth's closure: this runs for every message
                if adds_data:
                    self._check_budget(txn, ctx.envelope.topic)
                return fn(self, txn, payload, ctx)
            except lmdb.MapFullError:
                self._grow(txn, keep=mark, topic=ctx.envelope.topic)

            def attempt() -> Any:
                del ctx.events[emitted:]
                return fn(self, txn, payload, ctx)

            return self._with_growth(txn, attempt, adds_data=adds_data, topic=ctx.envelope.topic)

        return run  # type: ignore[return-value]

    return wrap


_opened: set[Path] = set()
"""Environments open in this process: LMDB forbids opening one twice."""


class LmdbBackend(Backend):
    """Working memory: recent messages per conversation and session context, expiring after a TTL."""

    name: ClassVar[str] = "lmdb"
    patterns: ClassVar[tuple[str, ...]] = (APPEND, MESSAGE_CHANGED, RECENT, CONVERSATION_CLEAR, CONTEXT_SET,
                                           CONTEXT_GET, CONTEXT_CLEAR, INVENTORY)

    def __init__(self, data_dir: Path, **settings: Any) -> None:
        super().__init__(data_dir, **settings)
        try:
            self.cfg = msgspec.convert(settings, LmdbSettings, strict=False)  # "3600" from a variable
        except msgspec.ValidationError as exc:
            raise ValidationError(f"invalid lmdb settings: {exc}", field="settings",
                                  expected=str(exc)) from None
        if self.cfg.map_size > self.cfg.max_map_size:
            raise ValidationError("lmdb setting map_size exceeds max_map_size", field="map_size",
                                  expected=f"<= {self.cfg.max_map_size}")
        unknown = sorted(set(settings) - set(LmdbSettings.__struct_fields__))
        if unknown:
            log.warning("lmdb.unknown_settings", names=unknown)
        self.codec = ValueCodec(self.cfg.encryption)
        self.ids = IdKeys(self.cfg.encryption, "lmdb-ids")
        """Conversation, session, message ids and context names in keys: keyed hashes when encrypted."""
        self.env: lmdb.Environment | None = None
        self._db: dict[str, Any] = {}
        self._pid = 0
        self._page_size = 4096
        self._map_size = 0
        self._budget = self.cfg.max_map_size - self.cfg.reserve
        self._boot: str | None = None
        """This boot's id when commits are not synced (the ``unsynced`` file then names it), else None."""
        self._marked = False
        self.counters = {"expiry_visited": 0, "expired": 0, "map_grown": 0}

    # -- lifecycle ---------------------------------------------------------------------------------

    def open(self) -> None:
        path = self.data_dir.resolve()
        if path in _opened:
            raise StoreError(f"LMDB environment {path} is already open in this process", path=str(path))
        path.mkdir(parents=True, exist_ok=True)
        self._discard_if_unsynced_at_a_crash(path)
        self._boot = None if self.cfg.sync_commits else boot_id()
        data_file = path / "data.mdb"
        used = data_file.stat().st_size if data_file.exists() else 0
        map_size = max(self.cfg.map_size, min(self.cfg.max_map_size, 2 * used))
        try:
            # metasync off: a synced commit flushes its data pages but not the meta page, so an OS crash can undo
            # the last commit, position included (the file stays consistent). The worker then resumes from its
            # older position and the log re-applies what was undone; a process crash loses nothing. Unsynced
            # (sync_commits off): see _discard_if_unsynced_at_a_crash.
            env = lmdb.open(str(path), map_size=map_size, max_dbs=len(_DATABASES), subdir=True, metasync=False,
                            sync=self._boot is None)
        except lmdb.Error as exc:
            raise StoreError(f"cannot open LMDB environment {path}: {exc}", path=str(path)) from exc
        try:
            self._db = {name: env.open_db(name.encode()) for name in _DATABASES}
        except lmdb.Error as exc:
            env.close()
            raise StoreError(f"cannot open LMDB databases in {path}: {exc}", path=str(path)) from exc
        self.env, self._pid = env, os.getpid()
        self._page_size = int(env.stat()["psize"])
        self._map_size = int(env.info()["map_size"])
        _opened.add(path)
        try:
            self._upgrade()
        except BaseException:
            self.close()
            raise
        log.info("lmdb.opened", path=str(path), map_size=env.info()["map_size"])

    def _upgrade(self) -> None:
        """Brings a store written by an earlier version to ``FORMAT``. Format 1 keyed message ids by their
        keyed hash alone: an encrypted store's ``msgids`` is rebuilt from its messages (IdKeys.message). Formats
        1 and 2 stored a message without its ``msgids`` key: every message is written again with it."""
        tracking, msgids, messages = self._db["tracking"], self._db["msgids"], self._db["messages"]
        with self._read() as r:
            raw = r.get(_FORMAT, db=tracking)
        found = 1 if raw is None else int(_U64.unpack(raw)[0])
        if found == FORMAT:
            return
        if found > FORMAT:
            raise StoreError(f"the LMDB store has format {found}, newer than this version's {FORMAT}",
                             path=str(self.data_dir), format=found)
        with self._write(expire_step=False) as txn:
            rekeyed = 0
            held = [(key, stored[:8], self.codec.decode(stored[8:], WorkingMessage, key + stored[:8]))
                    for key, stored in self._range(txn, messages, b"")]
            if found == 1 and self.ids.enabled:
                for key, _ in self._range(txn, msgids, b""):
                    self._with_growth(txn, functools.partial(txn.delete, msgids, key), adds_data=False)
                for key, _, message in held:
                    msgid = self.ids.message(message.message_id.encode())
                    self._with_growth(txn, functools.partial(txn.put, msgids, msgid, key), adds_data=False)
                rekeyed = len(held)
            for key, expires, message in held:
                value = self._message_value(key, expires, self.ids.message(message.message_id.encode()), message)
                self._with_growth(txn, functools.partial(txn.put, messages, key, value), adds_data=False)
            self._with_growth(txn, functools.partial(txn.put, tracking, _FORMAT, _u64(FORMAT)), adds_data=False)
        if held:  # a new store only gets its format entry
            log.info("lmdb.upgraded", path=str(self.data_dir), old=found, new=FORMAT, messages=len(held),
                     msgids_rekeyed=rekeyed)

    def _discard_if_unsynced_at_a_crash(self, path: Path) -> None:
        """Commits not synced are in the OS's cache, which a process crash leaves intact; an OS crash or power
        loss does not, and LMDB's file is then not even known to be consistent (the OS may have written its pages
        in any order). So a store left ``unsynced`` in another boot of the machine is deleted: the worker starts
        from position 0 and the log rebuilds it (its replies and events are logged already: stored once)."""
        marker = path / _UNSYNCED
        try:
            made_in = marker.read_text().strip()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StoreError(f"cannot read {marker}: {exc}", path=str(path)) from exc
        if made_in == boot_id():
            self._marked = True  # removed once this run has flushed the store
            return
        log.warning("lmdb.wiped_after_os_restart", path=str(path), detail="the machine restarted while this store "
                    "held commits not yet on disk: it is rebuilt from the log")
        for name in ("data.mdb", "lock.mdb", _UNSYNCED):
            (path / name).unlink(missing_ok=True)
        _fsync_dir(path)

    def _mark_unsynced(self) -> None:
        """Before the first commit not synced since the store was last flushed: the marker names this boot."""
        assert self._boot is not None
        marker = self.data_dir / _UNSYNCED
        try:
            write_private(marker, self._boot.encode())
        except OSError as exc:  # a full disk: nothing written, the batch is tried again
            raise StoreUnavailable(f"cannot write {marker}: {exc}", exception=type(exc).__name__) from exc
        self._marked = True

    def _flushed(self) -> None:
        """Every commit is on disk: the marker goes (left behind, it costs a rebuild after an OS restart)."""
        if self._marked:
            try:
                (self.data_dir / _UNSYNCED).unlink(missing_ok=True)
                _fsync_dir(self.data_dir)
            except OSError as exc:
                log.warning("lmdb.unsynced_marker_kept", path=str(self.data_dir), error=repr(exc))
            self._marked = False

    def idle(self) -> None:
        """Flushes the commits made since the store was last flushed (one ``fdatasync``)."""
        if self._marked:
            self._env().sync(True)
            self._flushed()

    def close(self) -> None:
        if self.env is not None:
            self.env.sync(True)
            self.env.close()
            _opened.discard(self.data_dir.resolve())
            self.env = None
            self._flushed()

    def _env(self) -> lmdb.Environment:
        if self.env is None:
            raise StoreError("the LMDB store is not open", worker=self.name)
        if self._pid != os.getpid():
            raise StoreError("the LMDB environment was opened before fork; open it in the worker process",
                             worker=self.name)
        return self.env

    @property
    def map_size(self) -> int:
        return int(self._env().info()["map_size"])

    # -- transactions ------------------------------------------------------------------------------

    def transaction(self) -> AbstractContextManager[_Batch]:
        return self._write(expire_step=True)

    @contextmanager
    def _write(self, *, expire_step: bool) -> Iterator[_Batch]:
        env = self._env()
        try:
            txn = _Batch(env)
        except lmdb.Error as exc:
            raise StoreError(f"lmdb: {exc}") from exc
        try:
            if expire_step and self.cfg.expire_per_batch:
                self._with_growth(txn, lambda: self._expire_some(txn, time.time(), self.cfg.expire_per_batch),
                                  adds_data=False)
            yield txn
            if txn.outbox:
                key, value = self._outbox_record(txn.outbox)
                self._with_growth(txn, functools.partial(txn.put, self._db["outbox"], key, value), adds_data=False)
            if self._boot is not None and not self._marked and txn.journal:  # an empty commit writes nothing
                self._mark_unsynced()
            while True:
                try:
                    txn.commit()
                    break
                except lmdb.MapFullError:
                    self._grow(txn, keep=len(txn.journal))
        except BaseException as exc:
            txn.abort()
            if isinstance(exc, lmdb.Error):  # a full disk shows as an I/O error at the commit
                raise StoreUnavailable(f"lmdb: {exc}", exception=type(exc).__name__) from exc
            raise

    def savepoint(self, txn: _Batch) -> AbstractContextManager[None]:
        return txn.savepoint()

    def _with_growth(self, txn: _Batch, step: Callable[[], Any], *, adds_data: bool, topic: str = "") -> Any:
        """Runs ``step`` (which writes through ``txn``); when the map is full, grows it and runs it again."""
        while True:
            mark = len(txn.journal)
            try:
                if adds_data:
                    self._check_budget(txn, topic)
                return step()
            except lmdb.MapFullError:
                self._grow(txn, keep=mark, topic=topic)

    def _grow(self, txn: _Batch, *, keep: int, topic: str = "") -> None:
        """Doubles the map (up to max_map_size) and replays the transaction's first ``keep`` writes."""
        env = self._env()
        while True:
            size = int(env.info()["map_size"])
            if size >= self.cfg.max_map_size:
                log.warning("lmdb.store_full", map_size=size, topic=topic)
                raise StoreFull(f"working memory is full: the LMDB map reached max_map_size ({size} bytes)",
                                topic=topic, map_size=size, max_map_size=self.cfg.max_map_size)
            new_size = min(2 * size, self.cfg.max_map_size)
            txn.abort()
            env.set_mapsize(new_size)
            self._map_size = new_size
            self.counters["map_grown"] += 1
            log.info("lmdb.map_grown", old=size, new=new_size)
            try:
                txn.replay(keep)
                return
            except lmdb.MapFullError:
                continue

    def _check_budget(self, txn: _Batch, topic: str) -> None:
        """Refuses new data once the live pages fill max_map_size less the reserve, so that a full
        store still answers, records its position and can be cleared."""
        budget = self._budget
        if self._map_size <= budget:
            return  # the live pages cannot outgrow the map
        pages = 0
        for db in self._db.values():
            st = txn.current.stat(db)
            pages += st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
        used = pages * self._page_size
        if used >= budget:
            log.warning("lmdb.store_full", used=used, budget=budget, topic=topic)
            raise StoreFull(f"working memory is full: {used} bytes in use of a {budget}-byte budget "
                            f"(max_map_size {self.cfg.max_map_size})", topic=topic, used=used,
                            max_map_size=self.cfg.max_map_size)

    # -- position and outbox -----------------------------------------------------------------------

    def load_position(self) -> int:
        with self._read() as r:
            raw = r.get(_POSITION, db=self._db["tracking"])
            return int(_U64.unpack(raw)[0]) if raw is not None else 0

    def save_position(self, txn: _Batch, seq: int) -> None:
        self._with_growth(txn, lambda: txn.put(self._db["tracking"], _POSITION, _u64(seq)), adds_data=False)

    def outbox_add(self, txn: _Batch, seq: int, items: list[bytes]) -> None:
        txn.outbox.append((seq, items))

    def _outbox_record(self, entries: list[tuple[int, list[bytes]]]) -> tuple[bytes, bytes]:
        """One outbox record for a transaction's entries (in seq order): sealed once, not once per entry."""
        seqs = b"".join([_u64(seq) for seq, _ in entries])
        key = seqs[-8:] + _OUTBOX_BATCH
        head = _U32.pack(len(entries)) + seqs
        return key, head + self.codec.encode([items for _, items in entries], b"outbox" + key + head)

    def _outbox_seqs(self, key: bytes, value: bytes | memoryview) -> list[int]:
        if len(key) == 8:  # an entry of its own (stores written before batch records)
            return [int(_U64.unpack(key)[0])]
        count = int(_U32.unpack_from(value)[0]) if len(value) >= 4 else -1
        if count < 1 or len(value) < 4 + 8 * count:
            raise IntegrityError("lmdb outbox record truncated", check="length", length=len(value))
        return [int(_U64.unpack_from(value, 4 + 8 * i)[0]) for i in range(count)]

    def _outbox_entries(self, key: bytes, value: bytes | memoryview) -> list[tuple[int, list[bytes]]]:
        seqs = self._outbox_seqs(key, value)
        if len(key) == 8:
            return [(seqs[0], self.codec.decode(value, list[bytes], b"outbox" + key))]
        head = 4 + 8 * len(seqs)
        items = self.codec.decode(value[head:], list[list[bytes]], b"outbox" + key + bytes(value[:head]))
        if len(items) != len(seqs):
            raise IntegrityError("lmdb outbox record holds another number of entries than it names",
                                 check="decode")
        return list(zip(seqs, items, strict=True))

    def outbox_pending(self) -> list[tuple[int, list[bytes]]]:
        with self._read() as r:
            return [entry for key, value in r.cursor(db=self._db["outbox"])
                    for entry in self._outbox_entries(bytes(key), value)]

    def outbox_remove(self, seqs: list[int]) -> None:
        done = set(seqs)
        outbox = self._db["outbox"]
        with self._write(expire_step=False) as txn:
            for key, value in self._range(txn, outbox, b""):
                held = self._outbox_seqs(key, value)
                if done.isdisjoint(held):
                    continue
                self._with_growth(txn, functools.partial(txn.delete, outbox, key), adds_data=False)
                if not done.issuperset(held):  # part of a record was logged (a publish failed half-way)
                    record = self._outbox_record([e for e in self._outbox_entries(key, value) if e[0] not in done])
                    self._with_growth(txn, functools.partial(txn.put, outbox, *record), adds_data=False)

    @contextmanager
    def _read(self) -> Iterator[lmdb.Transaction]:
        try:
            with self._env().begin(buffers=True) as r:
                yield r
        except lmdb.Error as exc:
            raise StoreError(f"lmdb: {exc}", exception=type(exc).__name__) from exc

    # -- expiry ------------------------------------------------------------------------------------

    def expire(self, now: float | None = None, limit: int = 10_000) -> int:
        """Removes up to ``limit`` items expired at ``now`` (unix seconds); returns how many.

        Visits only expired index entries, plus the first one still alive.
        """
        removed = 0
        with self._write(expire_step=False) as txn:
            at = time.time() if now is None else now
            removed = self._with_growth(txn, lambda: self._expire_some(txn, at, limit), adds_data=False)
        return int(removed)

    def _expire_some(self, txn: _Batch, now: float, limit: int) -> int:
        now_ms = int(now * 1000)
        due: list[bytes] = []
        cursor = txn.current.cursor(db=self._db["expiry"])
        for key in cursor.iternext(keys=True, values=False):
            self.counters["expiry_visited"] += 1
            if _expires_ms(key) > now_ms or len(due) >= limit:
                break
            due.append(bytes(key))
        cursor.close()
        for key in due:
            expires = key[:8]
            kind, target = key[8:9], key[9:]
            db = self._db[_EXPIRING[kind]]
            stored = txn.get(db, target)
            # An item rewritten with a later expiry keeps its new index entry; this one is just stale.
            if stored is not None and stored[:8] == expires:
                if kind == _KIND_MESSAGE:
                    self._drop_message(txn, target, stored, index=False)
                else:
                    txn.delete(db, target)
            txn.delete(self._db["expiry"], key)
        self.counters["expired"] += len(due)
        if due:
            log.debug("lmdb.expired", count=len(due))
        return len(due)

    # -- messages ----------------------------------------------------------------------------------

    @handles(APPEND)
    @_writes(adds_data=True)
    def append(self, txn: _Batch, payload: AppendMessage, ctx: Context) -> AppendReply:
        message = WorkingMessage(message_id=payload.message_id or ctx.envelope.id, user_id=payload.user_id,
                                 role=payload.role, text=payload.text,
                                 ts=payload.ts if payload.ts is not None else _now(ctx))
        return self._append(txn, payload.conversation_id, message, payload.ttl, ctx)

    @handles(MESSAGE_CHANGED)
    @_writes(adds_data=True)
    def follow_message(self, txn: _Batch, payload: Any, ctx: Context) -> AppendReply | None:
        """Keeps every message the libSQL worker stores (``op`` created) in working memory too."""
        try:
            event = msgspec.convert(msgspec.to_builtins(payload), MessageChanged)
        except msgspec.ValidationError as exc:
            raise ValidationError(f"invalid payload for topic {MESSAGE_CHANGED!r}: {exc}",
                                  topic=MESSAGE_CHANGED, field="", expected=str(exc)) from None
        if event.op != "created":
            log.debug("lmdb.event_ignored", op=event.op, message_id=event.message_id)
            return None
        message = WorkingMessage(message_id=event.message_id, user_id=event.user_id, role=event.role,
                                 text=event.text, ts=event.created_at)
        return self._append(txn, event.conversation_id, message, None, ctx)

    def _append(self, txn: _Batch, conversation_id: str, message: WorkingMessage, ttl: float | None,
                ctx: Context) -> AppendReply:
        topic = ctx.envelope.topic
        conv = self._conv(conversation_id, topic)
        msgid = self.ids.message(_id_bytes(message.message_id, topic, "message_id", self.ids.enabled))
        count = self._count(txn, conv)
        expires_at = message.ts + (ttl or self.cfg.ttl_seconds)
        if txn.get(self._db["msgids"], msgid) is not None or expires_at <= _now(ctx):
            return AppendReply(conversation_id, message.message_id, count, stored=False)
        key = conv + _u64(int(message.ts * 1_000_000)) + _u64(ctx.seq)
        expires = _u64(int(expires_at * 1000))
        txn.put(self._db["messages"], key, self._message_value(key, expires, msgid, message))
        txn.put(self._db["msgids"], msgid, key)
        txn.put(self._db["expiry"], expires + _KIND_MESSAGE + key, b"")
        count += 1
        while count > self.cfg.max_messages:
            oldest = self._first_key(txn, conv)
            stored = txn.get(self._db["messages"], oldest)
            assert stored is not None
            self._drop_message(txn, oldest, stored, count=False)
            count -= 1
        txn.put(self._db["convs"], conv, _u64(count))
        return AppendReply(conversation_id, message.message_id, count, stored=True)

    def _count(self, txn: _Batch, conv: bytes) -> int:
        raw = txn.get(self._db["convs"], conv)
        return int(_U64.unpack(raw)[0]) if raw is not None else 0

    def _first_key(self, txn: _Batch, conv: bytes) -> bytes:
        cursor = txn.current.cursor(db=self._db["messages"])
        found = cursor.set_range(conv)
        key = bytes(cursor.key())
        cursor.close()
        if not found or not key.startswith(conv):
            raise StoreError("conversation count and messages disagree", conversation=conv[2:].decode())
        return key

    def _message_value(self, key: bytes, expires: bytes, msgid: bytes, message: WorkingMessage) -> bytes:
        """A message as stored: its expiry, its ``msgids`` key, then the message sealed to all three and its key."""
        head = expires + bytes((len(msgid),)) + msgid
        return head + self.codec.encode(message, key + head)

    def _message(self, key: bytes, stored: bytes | memoryview) -> WorkingMessage:
        if len(stored) < 9:
            raise IntegrityError(f"lmdb value of {len(stored)} bytes, too short", check="decode")
        end = 9 + stored[8]
        message: WorkingMessage = self.codec.decode(stored[end:], WorkingMessage, key + bytes(stored[:end]))
        return message

    @staticmethod
    def _msgid_key(stored: bytes | memoryview) -> bytes:
        if len(stored) < 9 or len(stored) < 9 + stored[8]:
            raise IntegrityError(f"lmdb value of {len(stored)} bytes, too short", check="decode")
        return bytes(stored[9:9 + stored[8]])

    def _drop_message(self, txn: _Batch, key: bytes, stored: bytes, *, index: bool = True,
                      count: bool = True) -> None:
        """Deletes a message with its id entry, and (unless the caller does) its expiry entry and count."""
        txn.delete(self._db["messages"], key)
        txn.delete(self._db["msgids"], self._msgid_key(stored))
        if index:
            txn.delete(self._db["expiry"], stored[:8] + _KIND_MESSAGE + key)
        if count:
            conv = key[:-16]
            left = self._count(txn, conv) - 1
            if left > 0:
                txn.put(self._db["convs"], conv, _u64(left))
            else:
                txn.delete(self._db["convs"], conv)

    @handles(RECENT)
    def recent(self, txn: _Batch, payload: RecentRequest, ctx: Context) -> RecentReply:
        conv = self._conv(payload.conversation_id, ctx.envelope.topic)
        messages = self._recent(txn.current, conv, payload.limit, _now(ctx))
        return RecentReply(payload.conversation_id, messages)

    def read_recent(self, conversation_id: str, limit: int = 20, *,
                    now: float | None = None) -> list[WorkingMessage]:
        """The most recent messages, oldest first, from a read-only transaction (no write lock)."""
        conv = self._conv(conversation_id, RECENT)
        with self._read() as r:
            return self._recent(r, conv, limit, time.time() if now is None else now)

    def _recent(self, r: lmdb.Transaction, conv: bytes, limit: int, now: float) -> list[WorkingMessage]:
        now_ms = int(now * 1000)
        picked: list[tuple[bytes, bytes | memoryview]] = []
        cursor = r.cursor(db=self._db["messages"])
        # Start past the conversation's last key and walk backwards: newest first, decode only what is kept.
        positioned = cursor.prev() if cursor.set_range(conv + b"\xff" * 16) else cursor.last()
        while positioned and len(picked) < limit:
            if bytes(cursor.key()[: len(conv)]) != conv:
                break
            stored = cursor.value()
            if _expires_ms(stored) > now_ms:
                picked.append((bytes(cursor.key()), stored))
            positioned = cursor.prev()
        cursor.close()
        return [self._message(key, stored) for key, stored in reversed(picked)]

    @handles(CONVERSATION_CLEAR)
    @_writes(adds_data=False)
    def clear_conversation(self, txn: _Batch, payload: ConversationClear,
                           ctx: Context) -> ConversationClearReply:
        conv = self._conv(payload.conversation_id, ctx.envelope.topic)
        held = self._range(txn, self._db["messages"], conv)
        for key, stored in held:
            self._drop_message(txn, key, stored, count=False)
        txn.delete(self._db["convs"], conv)
        # kept for the TTL, the time by which every message older than the clear has expired anyway, so that
        # `membus check` does not expect them here
        at = _now(ctx)
        expires = _u64(int((at + self.cfg.ttl_seconds) * 1000))
        old = txn.get(self._db["cleared"], conv)
        if old is not None:
            txn.delete(self._db["expiry"], old[:8] + _KIND_CLEARED + conv)
        txn.put(self._db["cleared"], conv,
                expires + self.codec.encode(ClearedConversation(payload.conversation_id, at), conv + expires))
        txn.put(self._db["expiry"], expires + _KIND_CLEARED + conv, b"")
        return ConversationClearReply(payload.conversation_id, len(held))

    def _range(self, txn: _Batch, db: Any, prefix: bytes) -> list[tuple[bytes, bytes]]:
        """Every (key, value) under ``prefix``, copied out before the caller writes."""
        out: list[tuple[bytes, bytes]] = []
        cursor = txn.current.cursor(db=db)
        if cursor.set_range(prefix):
            for key, value in cursor:
                if not bytes(key).startswith(prefix):
                    break
                out.append((bytes(key), bytes(value)))
        cursor.close()
        return out

    # -- session context ---------------------------------------------------------------------------

    @handles(CONTEXT_SET)
    @_writes(adds_data=True)
    def context_set(self, txn: _Batch, payload: ContextSet, ctx: Context) -> ContextSetReply:
        key = self._context_key(payload.session_id, payload.key, ctx.envelope.topic)
        expires_at = _now(ctx) + (payload.ttl or self.cfg.ttl_seconds)
        expires = _u64(int(expires_at * 1000))
        old = txn.get(self._db["context"], key)
        if old is not None:
            txn.delete(self._db["expiry"], old[:8] + _KIND_CONTEXT + key)
        txn.put(self._db["context"], key, expires + self.codec.encode([payload.key, payload.value], key + expires))
        txn.put(self._db["expiry"], expires + _KIND_CONTEXT + key, b"")
        ctx.emit(CONTEXT_CHANGED, ContextChanged(payload.session_id, "set", [payload.key]))
        return ContextSetReply(payload.session_id, payload.key, expires_at)

    @handles(CONTEXT_GET)
    def context_get(self, txn: _Batch, payload: ContextGet, ctx: Context) -> ContextGetReply:
        session = self._session(payload.session_id, ctx.envelope.topic)
        return ContextGetReply(payload.session_id, self._context(txn.current, session, _now(ctx)))

    def read_context(self, session_id: str, *, now: float | None = None) -> dict[str, Any]:
        """A session's context from a read-only transaction."""
        session = self._session(session_id, CONTEXT_GET)
        with self._read() as r:
            return self._context(r, session, time.time() if now is None else now)

    def _context(self, r: lmdb.Transaction, session: bytes, now: float) -> dict[str, Any]:
        now_ms = int(now * 1000)
        values: dict[str, Any] = {}
        cursor = r.cursor(db=self._db["context"])
        if cursor.set_range(session):
            for key, stored in cursor:
                if bytes(key[: len(session)]) != session:
                    break
                if _expires_ms(stored) > now_ms:
                    name, value = self._context_item(bytes(key), stored)
                    values[name] = value
        cursor.close()
        return values

    @handles(CONTEXT_CLEAR)
    @_writes(adds_data=False)
    def context_clear(self, txn: _Batch, payload: ContextClear, ctx: Context) -> ContextClearReply:
        topic = ctx.envelope.topic
        session = self._session(payload.session_id, topic)
        if payload.key is None:
            held = self._range(txn, self._db["context"], session)
        else:
            key = self._context_key(payload.session_id, payload.key, topic)
            stored = txn.get(self._db["context"], key)
            held = [] if stored is None else [(key, stored)]
        for key, stored in held:
            txn.delete(self._db["context"], key)
            txn.delete(self._db["expiry"], stored[:8] + _KIND_CONTEXT + key)
        if held:
            keys = [self._context_item(key, stored)[0] for key, stored in held]
            ctx.emit(CONTEXT_CHANGED, ContextChanged(payload.session_id, "clear", keys))
        return ContextClearReply(payload.session_id, len(held))

    def _context_key(self, session_id: str, key: str, topic: str) -> bytes:
        return self._session(session_id, topic) + self.ids.recurring(_id_bytes(key, topic, "key", self.ids.enabled))

    def _context_item(self, key: bytes, stored: bytes | memoryview) -> tuple[str, Any]:
        """(context key name, value) of a stored context entry: the name is kept in the value too, since
        the LMDB key holds only its keyed hash when the store is encrypted."""
        name, value = self.codec.decode(stored[8:], tuple[str, Any], key + bytes(stored[:8]))
        return name, value

    def _conv(self, conversation_id: str, topic: str) -> bytes:
        return _prefix(self.ids.recurring(_id_bytes(conversation_id, topic, "conversation_id", self.ids.enabled)))

    def _session(self, session_id: str, topic: str) -> bytes:
        return _prefix(self.ids.recurring(_id_bytes(session_id, topic, "session_id", self.ids.enabled)))

    # -- inventory (membus check) ------------------------------------------------------------------

    @handles(INVENTORY)
    def inventory(self, txn: _Batch, payload: WorkingInventory, ctx: Context) -> InventoryPage:
        """Unexpired messages in key order (conversation, then time), or cleared conversations; the cursor is the
        last key, in hex. A message's ``group`` is a token of its conversation, not its id (keys hold blinded ids
        when encryption is on)."""
        now_ms = int(_now(ctx) * 1000)
        items: list[InventoryItem] = []
        last = b""
        cursor = txn.current.cursor(db=self._db[payload.kind])
        try:
            start = bytes.fromhex(payload.cursor)
        except ValueError:
            raise ValidationError(f"cursor {payload.cursor[:40]!r} is not one this worker returned",
                                  topic=ctx.envelope.topic, field="cursor",
                                  expected="the cursor of the previous page, or empty") from None
        positioned = cursor.set_range(start) if start else cursor.first()
        if positioned and start and bytes(cursor.key()) == start:
            positioned = cursor.next()
        while positioned and len(items) < payload.limit:
            key, stored = bytes(cursor.key()), cursor.value()
            last = key
            if _expires_ms(stored) > now_ms and payload.kind == "cleared":
                cleared: ClearedConversation = self.codec.decode(stored[8:], ClearedConversation,
                                                                 key + bytes(stored[:8]))
                items.append(InventoryItem(id=cleared.conversation_id, ts=cleared.at))
            elif _expires_ms(stored) > now_ms:
                message = self._message(key, stored)
                conversation = key[: 2 + _U16.unpack_from(key)[0]].hex()  # opaque: ids may be blinded
                items.append(InventoryItem(id=message.message_id, group=conversation, ts=message.ts))
            positioned = cursor.next()
        cursor.close()
        return InventoryPage(kind=payload.kind, items=items, cursor=last.hex() if positioned else "",
                             info={"ttl_seconds": self.cfg.ttl_seconds, "max_messages": self.cfg.max_messages})

    # -- introspection -----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        env = self._env()
        with self._read() as r:
            entries = {name: int(r.stat(db)["entries"]) for name, db in self._db.items()}
        return {"map_size": int(env.info()["map_size"]), "entries": entries, **self.counters}
