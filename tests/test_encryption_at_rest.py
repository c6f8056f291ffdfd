"""Encryption at rest: the log and every store sealed, tampering detected, nothing readable in the home."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from base64 import b64encode
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import keyring
import keyring.backends.fail
import lmdb
import msgspec
import pytest

import contracts.structured  # noqa: F401  (contracts of conversation.message.changed)
from bus import keys
from bus.home import Home, Settings
from bus.keys import Argon2Params, KeyRing
from bus.log import EventLog
from bus.sealing import Blinder, KeyRingCipher, open_sealed, seal
from contracts.envelope import Envelope, decode_envelope, make_envelope
from contracts.errors import IntegrityError
from contracts.ids import id_time_ms, new_id
from contracts.registry import encode_payload
from tests.workers_util import System
from workers.apply import apply_batch
from workers.chroma import ChromaBackend
from workers.duckdb import DuckdbBackend
from workers.embedding import HashEmbedder
from workers.libsql import LibsqlBackend
from workers.lmdb import FORMAT, IdKeys, LmdbBackend, Sealer

SECRET = "zebrapineapple"
CHEAP = Argon2Params(memory_kib=64, time_cost=1, parallelism=1)


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Key files go to this test's folder; no OS keyring (as on a headless machine)."""
    for name in (keys.ENV_PASSPHRASE, keys.ENV_PASSPHRASE_FILE, keys.ENV_KEY_FILE, keys.ENV_KEY_FD,
                 "MEMBUS_ENCRYPTION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    before = keyring.get_keyring()
    keyring.set_keyring(keyring.backends.fail.Keyring())  # type: ignore[no-untyped-call]
    yield
    keyring.set_keyring(before)


@pytest.fixture
def ring(tmp_path: Path) -> KeyRing:
    return keys.init(tmp_path / "keyhome", "correct horse", params=CHEAP, remember=False).keyring("store:t")


class Log:
    def __init__(self) -> None:
        self.seq = 0

    def __call__(self, topic: str, payload: Any) -> Envelope:
        self.seq += 1
        env = make_envelope(topic, encode_payload(topic, payload), reply_to="inbox.t")
        return msgspec.structs.replace(env, seq=self.seq)


def flip_in_file(path: Path, needle: bytes) -> None:
    """Flips one bit in the first occurrence of ``needle`` in the file (which must contain it)."""
    data = bytearray(path.read_bytes())
    at = data.find(needle)
    assert at >= 0, f"{needle!r} not in {path}"
    data[at + len(needle) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def files_containing(root: Path, text: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and text in p.read_bytes()]


# -- key plumbing ----------------------------------------------------------------------------------


def test_a_child_reads_only_the_keys_handed_to_it(tmp_path: Path) -> None:
    master = keys.init(tmp_path / "h", None)
    fd = keys.keyring_pipe([master.keyring("store:lmdb")])
    code = ("from bus import keys; r = keys.inherited_keyrings(); import os; "
            "print(sorted(r), r['store:lmdb'].current.key.hex(), os.environ.get('MEMBUS_KEY_FD'))")
    try:
        out = subprocess.run([sys.executable, "-c", code], pass_fds=(fd,), capture_output=True, text=True,
                             env={**os.environ, keys.ENV_KEY_FD: str(fd)}, check=True,
                             cwd=Path(__file__).resolve().parents[1]).stdout.splitlines()[-1].split()
    finally:
        os.close(fd)
    assert out == ["['store:lmdb']", master.keyring("store:lmdb").current.key.hex(), "None"]
    assert master.key.hex() not in " ".join(out)


def test_settings_turn_encryption_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings.load(tmp_path).encryption is True
    (tmp_path / "membus.toml").write_text("encryption = false\n")
    assert Settings.load(tmp_path).encryption is False
    monkeypatch.setenv("MEMBUS_ENCRYPTION", "1")
    assert Settings.load(tmp_path).encryption is True


# -- the event log ---------------------------------------------------------------------------------


def _log(path: Path, ring: KeyRing | None) -> EventLog:
    log = EventLog(path, map_size=1 << 20, cipher=KeyRingCipher(ring) if ring else None)
    log.open()
    return log


def _append(log: EventLog, text: str) -> int:
    env = make_envelope("notes.note.changed", msgspec.msgpack.encode({"text": text}))
    seq = log.append([env])[0]
    assert isinstance(seq, int)
    return seq


@pytest.mark.parametrize("sealed", [False, True], ids=["plain", "sealed"])
def test_a_batch_the_broker_checked_as_a_whole_is_logged_as_one_checked_per_envelope(
        tmp_path: Path, ring: KeyRing, sealed: bool) -> None:
    """A batch that passes the broker's checks as a whole is prepared without a per-envelope loop (seqs, rows
    and index entries made list-wide, sealed by ``write``): the log must hold what the per-envelope path makes."""
    envs = [make_envelope(f"notes.kind{i % 3}.changed", msgspec.msgpack.encode({"i": i}),
                          correlation_id="conv-1" if i % 4 == 0 else "", recipient="inbox.x" if i % 5 == 0 else "")
            for i in range(150)]
    seen: dict[str, tuple[list[tuple[int, str, bytes]], list[int]]] = {}
    for path, check in (("whole", None), ("each", lambda env: None)):
        log = _log(tmp_path / path, ring if sealed else None)
        try:
            assert log.append([msgspec.structs.replace(e) for e in envs], check=check) == list(range(1, 151))
            log.close()
            log = _log(tmp_path / path, ring if sealed else None)  # read back from LMDB, not from memory
            records, _, done = log.read(from_seq=1, limit=1000)
            assert done
            correlated, _, _ = log.read(from_seq=1, correlation_id="conv-1", limit=1000)
            assert [log.seq_of_id(e.id) for e in envs] == list(range(1, 151))
            seen[path] = ([(r.seq, r.topic, r.body) for r in records], [r.seq for r in correlated])
        finally:
            log.close()
    assert seen["whole"] == seen["each"]
    assert seen["whole"][1] == list(range(1, 151, 4))
    bodies = [decode_envelope(body) for _, _, body in seen["whole"][0]]
    assert [(b.seq, b.id, b.recipient) for b in bodies] == [(i + 1, e.id, e.recipient) for i, e in enumerate(envs)]
    again = _log(tmp_path / "whole", ring if sealed else None)
    try:  # a retried batch is deduplicated whichever path logged it
        assert again.append([msgspec.structs.replace(e) for e in envs[:10]]) == list(range(1, 11))
        assert again.head == 150
        whole = again.prepare([msgspec.structs.replace(e, id=new_id()) for e in envs])
        each = again.prepare([msgspec.structs.replace(e, id=new_id()) for e in envs], lambda env: None)
        assert whole.addressed == each.addressed == 30  # replies the broker routes to an inbox
        assert (whole.first, each.first) == (151, 301)
    finally:
        again.abandon()
        again.close()


def test_log_records_are_sealed_and_read_back(tmp_path: Path, ring: KeyRing) -> None:
    log = _log(tmp_path / "log", ring)
    seq = _append(log, SECRET)
    assert SECRET.encode() in log.get(seq).body  # type: ignore[union-attr]
    log.close()
    assert files_containing(tmp_path / "log", SECRET.encode()) == []
    plain = _log(tmp_path / "log", None)
    with pytest.raises(IntegrityError, match="no key"):
        plain.get(seq)
    plain.close()


def test_log_tamper_and_downgrade_are_refused(tmp_path: Path, ring: KeyRing) -> None:
    log = _log(tmp_path / "log", ring)
    seq = _append(log, SECRET)
    with log.env.begin() as txn:
        found = txn.get(keys_seq(seq), db=log._log)
        assert found is not None
        raw = bytes(found)
    log.close()
    flip_in_file(tmp_path / "log" / "data.mdb", raw[-20:])  # inside the ciphertext + tag
    log = _log(tmp_path / "log", ring)
    with pytest.raises(IntegrityError) as caught:
        log.get(seq)
    assert caught.value.fields["check"] == "tag"
    # the header's key id set to 0 ("plaintext"): refused, not read as an opaque envelope
    with log.env.begin(write=True) as txn:
        txn.put(keys_seq(seq), raw[:1] + b"\x00\x00" + raw[3:], db=log._log)
    with pytest.raises(IntegrityError) as caught:
        log.get(seq)
    assert caught.value.fields["check"] == "downgrade"
    log.close()


def keys_seq(seq: int) -> bytes:
    return seq.to_bytes(8, "big")


def _append_many(log: EventLog, texts: list[str], topics: tuple[str, ...] = ("notes.note.changed",)) -> list[int]:
    envs = [make_envelope(topics[i % len(topics)], msgspec.msgpack.encode({"text": t})) for i, t in enumerate(texts)]
    seqs = log.append(envs)
    assert all(isinstance(s, int) for s in seqs)
    return seqs  # type: ignore[return-value]


def _rows(log: EventLog, first: int, last: int) -> list[bytes]:
    with log.env.begin() as txn:
        return [bytes(txn.get(keys_seq(s), db=log._log)) for s in range(first, last + 1)]


def _text(body: bytes) -> str:
    return str(msgspec.msgpack.decode(decode_envelope(body).payload)["text"])


def _place(raw: bytes) -> tuple[int, int]:
    start = 12 + raw[11]  # header (version, key id, logged-at, topic length) + topic
    return int.from_bytes(raw[start:start + 2], "big"), int.from_bytes(raw[start + 2:start + 4], "big")


def test_log_seals_one_block_per_64_records_and_reads_each_record_alone(tmp_path: Path, ring: KeyRing) -> None:
    log = _log(tmp_path / "log", ring)
    texts = [f"{SECRET} {i} " + "y" * (i % 7) * 30 for i in range(150)]
    texts[100] = SECRET + "z" * 70_000  # past the block's byte limit: a block of its own
    seqs = _append_many(log, texts, ("notes.note.changed", "notes.todo.changed"))
    rows = _rows(log, seqs[0], seqs[-1])
    assert {raw[0] for raw in rows} == {2}
    starts = [s for s, raw in zip(seqs, rows, strict=True) if _place(raw)[0] == 0]
    assert starts == [seqs[0], seqs[64], seqs[100], seqs[101]]
    assert [_place(raw)[1] for raw in rows[:1] + rows[64:65] + rows[100:102]] == [64, 36, 1, 49]
    assert files_containing(tmp_path / "log", SECRET.encode()) == []
    for i in [149, 0, 63, 64, 100, 101, 5, 120]:  # out of order: each read opens its record's block
        record = log.get(seqs[i])
        assert record is not None and _text(record.body) == texts[i]
        assert record.topic == ("notes.note.changed", "notes.todo.changed")[i % 2]
    page, _, done = log.read(from_seq=seqs[0], limit=1000)
    assert done and [_text(r.body) for r in page] == texts
    log.close()


def test_log_block_altered_anywhere_is_refused_and_other_blocks_still_read(tmp_path: Path, ring: KeyRing) -> None:
    log = _log(tmp_path / "log", ring)
    seqs = _append_many(log, [f"{SECRET} {i}" for i in range(70)])
    rows = _rows(log, seqs[0], seqs[-1])
    log.close()
    flip_in_file(tmp_path / "log" / "data.mdb", rows[30][-8:])  # inside one record's slice of the first block
    log = _log(tmp_path / "log", ring)
    for i in (0, 30, 63):
        with pytest.raises(IntegrityError) as caught:
            log.get(seqs[i])
        assert caught.value.fields["check"] == "tag"
    assert log.get(seqs[64]) is not None  # the second block is intact
    log.close()


def test_log_block_records_moved_resized_or_missing_are_refused(tmp_path: Path, ring: KeyRing) -> None:
    log = _log(tmp_path / "log", ring)
    seqs = _append_many(log, [f"{SECRET} {i}" for i in range(10)], ("notes.note.changed", "notes.todo.changed"))
    rows = _rows(log, seqs[0], seqs[-1])

    def put(changes: dict[int, bytes | None]) -> None:
        with log.env.begin(write=True) as txn:
            for i, raw in changes.items():
                if raw is None:
                    txn.delete(keys_seq(seqs[i]), db=log._log)
                else:
                    txn.put(keys_seq(seqs[i]), raw, db=log._log)
        log._last_block = None

    def refused(check: str) -> None:
        with pytest.raises(IntegrityError) as caught:
            log.get(seqs[2])
        assert caught.value.fields["check"] == check
        put(dict(enumerate(rows)))
        assert log.get(seqs[2]) is not None

    # one byte of ciphertext moved from record 3's slice to record 4's: the same block bytes, other lengths
    put({3: rows[3][:-1], 4: rows[4][:12 + rows[4][11] + 4] + rows[3][-1:] + rows[4][12 + rows[4][11] + 4:]})
    refused("tag")
    put({4: rows[5], 5: rows[4]})  # two records swapped
    refused("block")
    same_length_topic = rows[4].replace(b"notes.note.changed", b"notes.note.changex")
    put({4: same_length_topic})  # a topic renamed in clear
    refused("tag")
    put({6: None})
    refused("block")
    at = 12 + rows[2][11]
    put({2: rows[2][:at] + (12).to_bytes(2, "big") + rows[2][at + 2:]})  # index 12 of a block of 10
    refused("block")
    log.close()


# -- LMDB working memory ---------------------------------------------------------------------------


@pytest.mark.parametrize("flipped", [slice(-24, None), slice(4, 35)], ids=["sealed message", "its msgids key"])
def test_lmdb_values_sealed_ids_blinded_tamper_detected(tmp_path: Path, ring: KeyRing, flipped: slice) -> None:
    """The msgids key in clear before a sealed message is authenticated with it (a middle bit of ``flipped``)."""
    store = LmdbBackend(tmp_path / "lmdb", encryption=ring)
    store.open()
    log = Log()
    appended = log("working.message.append.request", {"conversation_id": "conv-alice", "user_id": "u1",
                                                      "role": "user", "text": SECRET})
    apply_batch(store, [
        appended,
        log("working.context.set.request", {"session_id": "sess-alice", "key": "mood", "value": SECRET}),
    ])
    assert [m.text for m in store.read_recent("conv-alice")] == [SECRET]
    assert store.read_context("sess-alice") == {"mood": SECRET}
    store.close()
    for needle in (SECRET, "conv-alice", "sess-alice", "mood", appended.id):
        assert files_containing(tmp_path / "lmdb", needle.encode()) == [], needle
    env = lmdb.open(str(tmp_path / "lmdb"), max_dbs=8, readonly=True)
    with env.begin() as txn:
        value = bytes(next(iter(txn.cursor(db=env.open_db(b"messages", txn=txn))))[1])
    env.close()
    flip_in_file(tmp_path / "lmdb" / "data.mdb", value[flipped])
    store = LmdbBackend(tmp_path / "lmdb", encryption=ring)
    store.open()
    try:
        with pytest.raises(IntegrityError):
            store.read_recent("conv-alice")
    finally:
        store.close()


def _lmdb(path: Path, ring: KeyRing) -> LmdbBackend:
    store = LmdbBackend(path, encryption=ring)
    store.open()
    return store


def _appends(log: Log, conversation: str, ids: list[str | None]) -> list[Envelope]:
    return [log("working.message.append.request",
                {"conversation_id": conversation, "user_id": "u1", "role": "user", "text": SECRET,
                 **({"message_id": i} if i else {})}) for i in ids]


def _raw(store: LmdbBackend, db: str) -> list[tuple[bytes, bytes]]:
    assert store.env is not None
    with store.env.begin() as txn:
        return [(bytes(k), bytes(v)) for k, v in txn.cursor(db=store._db[db])]


def test_lmdb_keys_are_the_blinders_hashes_and_message_ids_lead_with_their_time(tmp_path: Path,
                                                                               ring: KeyRing) -> None:
    ids, blinder = IdKeys(ring, "lmdb-ids"), Blinder(ring, "lmdb-ids")
    for value in (b"conv-alice", b"x" * 240):
        assert ids.blind(value) == ids.recurring(value) == ids.recurring(value) == blinder.blind(value)
    ulid = new_id()
    assert ids.message(ulid.encode()) == id_time_ms(ulid).to_bytes(6, "big") + blinder.blind(ulid.encode())
    assert ids.message(b"m1") == bytes(6) + blinder.blind(b"m1")  # not a ULID: no time to lead with

    store = _lmdb(tmp_path / "lmdb", ring)
    log = Log()
    try:
        envs = [env for n in range(4) for env in _appends(log, f"conv-{n}", [None, None])]
        for n in range(0, len(envs), 2):
            apply_batch(store, envs[n:n + 2])
        held = _raw(store, "msgids")
        assert {key for key, _ in held} == {ids.message(env.id.encode()) for env in envs}
        # the index grows at its end, in the order the ids were made, like the plaintext one
        assert [key[:6] for key, _ in held] == [id_time_ms(env.id).to_bytes(6, "big") for env in envs]
    finally:
        store.close()


def test_lmdb_sealer_nonces_are_fresh_per_record_and_after_a_fork(ring: KeyRing) -> None:
    sealer = Sealer(ring.current)
    sealed = [sealer.seal(b"value %d" % n, b"place %d" % n) for n in range(600)]  # more than one block
    assert len({blob[9:21] for blob in sealed}) == 600
    assert [open_sealed(ring, blob, b"place %d" % n) for n, blob in enumerate(sealed)] == \
        [b"value %d" % n for n in range(600)]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child seals once and reports its nonce
        try:
            os.write(write, sealer.seal(b"child", b"aad")[9:21])
        finally:
            os._exit(0)
    os.close(write)
    try:
        os.waitpid(pid, 0)
        child_nonce = os.read(read, 64)
    finally:
        os.close(read)
    assert len(child_nonce) == 12
    assert child_nonce != sealer.seal(b"parent", b"aad")[9:21]


def test_lmdb_outbox_record_tamper_is_refused(tmp_path: Path, ring: KeyRing) -> None:
    store = _lmdb(tmp_path / "lmdb", ring)
    try:
        apply_batch(store, _appends(Log(), "conv-alice", [None, None]))
        [(key, value)] = _raw(store, "outbox")
        assert SECRET.encode() not in value
        assert store.outbox_pending()[0][0] == 1
        assert store.env is not None
        for bad, check in ((value[:-1] + bytes([value[-1] ^ 1]), "tag"),  # a byte of the sealed items
                           (value[:4] + (7).to_bytes(8, "big") + value[12:], "tag"),  # seq 1 relabelled 7
                           (value[:10], "length")):
            with store.env.begin(write=True) as txn:
                txn.put(key, bad, db=store._db["outbox"])
            with pytest.raises(IntegrityError) as caught:
                store.outbox_pending()
            assert caught.value.fields["check"] == check
    finally:
        store.close()


def test_an_lmdb_store_of_format_1_gets_its_message_ids_rekeyed_at_open(tmp_path: Path, ring: KeyRing) -> None:
    store = _lmdb(tmp_path / "lmdb", ring)
    log = Log()
    envs = _appends(log, "conv-alice", ["m1", None]) + _appends(log, "conv-bob", [None, "m4"])
    apply_batch(store, envs)
    made = ["m1", envs[1].id, envs[2].id, "m4"]
    ids, blinder = IdKeys(ring, "lmdb-ids"), Blinder(ring, "lmdb-ids")
    assert store.env is not None
    with store.env.begin(write=True) as txn:  # what format 1 wrote: keyed hashes alone, no format entry
        for message_id in made:
            new = ids.message(message_id.encode())
            target = txn.get(new, db=store._db["msgids"])
            assert target is not None
            txn.delete(new, db=store._db["msgids"])
            txn.put(blinder.blind(message_id.encode()), target, db=store._db["msgids"])
        for key, stored in list(txn.cursor(db=store._db["messages"])):  # and messages without their msgids key
            msg = store._message(key, stored)
            txn.put(key, stored[:8] + store.codec.encode(msg, key + stored[:8]), db=store._db["messages"])
        txn.delete(b"format", db=store._db["tracking"])
    store.close()

    store = _lmdb(tmp_path / "lmdb", ring)
    try:
        assert {key for key, _ in _raw(store, "msgids")} == {ids.message(m.encode()) for m in made}
        assert dict(_raw(store, "tracking"))[b"format"] == FORMAT.to_bytes(8, "big")
        [again] = apply_batch(store, _appends(log, "conv-alice", ["m1"]))[0]
        assert again.reply.stored is False  # still known by its id
        apply_batch(store, [log("working.conversation.clear.request", {"conversation_id": "conv-bob"})])
        assert {key for key, _ in _raw(store, "msgids")} == {ids.message(m.encode()) for m in made[:2]}
    finally:
        store.close()


# -- libSQL -----------------------------------------------------------------------------------------


def _libsql(path: Path, ring: KeyRing) -> LibsqlBackend:
    store = LibsqlBackend(path, encryption=ring)
    store.open()
    return store


def _append_message(store: LibsqlBackend, log: Log, text: str) -> None:
    outcomes, _ = apply_batch(store, [log("conversation.message.append.request", {
        "conversation_id": "c1", "user_id": "u1", "role": "user", "text": text,
        "message_id": "m1", "metadata": {"note": SECRET}})])
    assert outcomes[0].status == "applied", outcomes


def _search(store: LibsqlBackend, log: Log, query: str) -> Any:
    return apply_batch(store, [log("memory.search.text.request", {"query": query})])[0][0]


def test_libsql_file_encrypted_and_fts_works(tmp_path: Path, ring: KeyRing) -> None:
    store = _libsql(tmp_path / "sql", ring)
    log = Log()
    _append_message(store, log, f"I saw a {SECRET} today")
    assert _search(store, log, SECRET).status == "applied"
    with store.transaction() as txn:
        raw_meta = txn.one("SELECT metadata FROM messages WHERE id = 'm1'")[0]
    assert SECRET not in raw_meta  # sealed inside the (also encrypted) file
    store.close()
    assert files_containing(tmp_path / "sql", SECRET.encode()) == []
    assert files_containing(tmp_path / "sql", b"SQLite format 3") == []
    store = _libsql(tmp_path / "sql", ring)
    out = _search(store, log, SECRET)
    store.close()
    assert out.status == "applied"


def test_libsql_flipped_byte_is_an_integrity_error(tmp_path: Path, ring: KeyRing) -> None:
    store = _libsql(tmp_path / "sql", ring)
    _append_message(store, Log(), SECRET)
    store.close()
    path = tmp_path / "sql" / "membus.db"
    data = bytearray(path.read_bytes())
    for page in range(1, len(data) // 4096):  # one byte in every page but the header page
        data[page * 4096 + 2000] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        store = _libsql(tmp_path / "sql", ring)
        try:
            with store.transaction() as txn:
                txn.all("SELECT * FROM messages")
        finally:
            store.close()


def test_libsql_sealed_value_moved_or_altered_is_refused(tmp_path: Path, ring: KeyRing) -> None:
    store = _libsql(tmp_path / "sql", ring)
    log = Log()
    _append_message(store, log, SECRET)
    with store.transaction() as txn:  # a changed plaintext copy (what a flipped CBC block would give)
        txn.execute("UPDATE messages SET text = 'something else' WHERE id = 'm1'")
    out = apply_batch(store, [log("conversation.history.request", {"conversation_id": "c1"})])[0][0]
    store.close()
    assert out.status == "failed" and out.error is not None and out.error.code == "integrity"


# -- ChromaDB ---------------------------------------------------------------------------------------


def test_chroma_documents_metadata_and_tokens_sealed(tmp_path: Path, ring: KeyRing) -> None:
    store = ChromaBackend(tmp_path / "chroma", embedder=HashEmbedder(), encryption=ring)
    store.open()
    log = Log()
    apply_batch(store, [log("semantic.index.request", {"collection": "memory", "id": "f1", "user_id": "alice",
                                                       "text": f"the {SECRET} is yellow",
                                                       "metadata": {"topic": "fruitbasket"}})])
    hits = apply_batch(store, [log("memory.search.hybrid.request", {"query": SECRET, "user_id": "alice",
                                                                    "where": {"topic": "fruitbasket"}})])
    store.close()
    assert hits[0][0].status == "applied"
    for needle in (SECRET, "fruitbasket", "alice"):
        assert files_containing(tmp_path / "chroma", needle.encode()) == [], needle


@pytest.fixture
def sealed_fact(tmp_path: Path, ring: KeyRing) -> Iterator[tuple[ChromaBackend, Log]]:
    """An encrypted chroma store holding fact f1 (user u1, text SECRET), and the log that wrote it."""
    store = ChromaBackend(tmp_path / "chroma", embedder=HashEmbedder(), encryption=ring)
    store.open()
    log = Log()
    apply_batch(store, [log("semantic.index.request", {"collection": "memory", "id": "f1", "user_id": "u1",
                                                       "text": SECRET})])
    try:
        yield store, log
    finally:
        store.close()


def test_chroma_keeps_no_document_and_refuses_an_altered_sealed_record(
        sealed_fact: tuple[ChromaBackend, Log]) -> None:
    store, log = sealed_fact
    got = store.collection("memory").get(ids=["f1"], include=["documents", "metadatas"])
    assert got["documents"][0] is None  # the text is inside the sealed record, not in Chroma's text index
    meta = dict(got["metadatas"][0])
    sealed = str(meta["_sealed"])
    meta["_sealed"] = sealed[:30] + ("A" if sealed[30] != "A" else "B") + sealed[31:]
    store.collection("memory").update(ids=["f1"], metadatas=[meta])
    out = apply_batch(store, [log("memory.search.semantic.request", {"query": SECRET})])[0][0]
    assert out.status == "failed" and out.error is not None and out.error.code == "integrity"


def test_chroma_reads_records_sealed_in_the_earlier_two_part_format(
        sealed_fact: tuple[ChromaBackend, Log], ring: KeyRing) -> None:
    store, log = sealed_fact
    stored = store.collection("memory").get(ids=["f1"], include=["metadatas", "embeddings"])
    meta = dict(stored["metadatas"][0])
    document = seal(ring.current, SECRET.encode(), b"chroma|memory|f1|document")
    meta["_sealed"] = b64encode(seal(ring.current, b'{"user_id": "u1"}', b"chroma|memory|f1|metadata")).decode()
    # the text's own vector, as the old format stored it: without it Chroma would embed the ciphertext, a random
    # vector that passes the query's relevance threshold only sometimes
    store.collection("memory").update(ids=["f1"], documents=[b64encode(document).decode()], metadatas=[meta],
                                      embeddings=[stored["embeddings"][0]])
    out = apply_batch(store, [log("memory.search.semantic.request", {"query": SECRET})])[0][0]
    assert out.status == "applied"
    assert [(h.id, h.text, h.metadata) for h in out.reply.hits] == [("f1", SECRET, {"user_id": "u1"})]


def test_chroma_sidecar_outbox_tamper_is_refused(tmp_path: Path, ring: KeyRing) -> None:
    store = ChromaBackend(tmp_path / "chroma", embedder=HashEmbedder(), encryption=ring)
    store.open()
    with store.transaction() as txn:
        store.outbox_add(txn, 7, [SECRET.encode()])
    assert store.outbox_pending() == [(7, [SECRET.encode()])]
    (blob,) = store.conn.execute("SELECT items FROM outbox").fetchone()
    store.conn.execute("UPDATE outbox SET items = ?", (blob[:-1] + bytes([blob[-1] ^ 1]),))
    try:
        with pytest.raises(IntegrityError):
            store.outbox_pending()
    finally:
        store.close()


# -- DuckDB -----------------------------------------------------------------------------------------


def test_duckdb_keeps_analytics_in_memory_when_encrypted(tmp_path: Path, ring: KeyRing) -> None:
    store = DuckdbBackend(tmp_path / "duck", encryption=ring)
    store.open()
    log = Log()
    apply_batch(store, [log("conversation.message.changed", {
        "op": "created", "message_id": "m1", "conversation_id": "c1", "user_id": "u1", "role": "user",
        "text": SECRET, "created_at": 1735689600.0, "timestamp": "2025-01-01T00:00:00Z"})])
    assert store.load_position() == 1
    store.close()
    assert files_containing(tmp_path / "duck", SECRET.encode()) == []
    again = DuckdbBackend(tmp_path / "duck", encryption=ring)
    again.open()
    assert again.load_position() == 0  # rebuilt from the log at start: the broker replays from seq 1
    again.close()


# -- the whole system -------------------------------------------------------------------------------


def test_system_home_holds_no_plaintext(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {"MEMBUS_EMBEDDING_MODEL": "hash"}
    with System(home, worker_env=env) as system:
        for name in ("libsql", "lmdb", "duckdb", "chroma"):
            system.worker(name)
        bus = system.bus
        bus.request("conversation.message.append.request", {
            "conversation_id": "c1", "user_id": "u1", "role": "user", "text": f"my {SECRET} story"})
        recent = bus.request("working.recent.request", {"conversation_id": "c1"}).payload
        assert SECRET in recent.messages[0].text
        hits = bus.request("memory.search.text.request", {"query": SECRET}).payload
        assert any(SECRET in h.text for h in hits.hits)
        deadline = time.monotonic() + 60
        while True:  # chroma follows the change event
            sem = bus.request("memory.search.hybrid.request", {"query": SECRET, "collection": "conversation"})
            if sem.payload.hits or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert SECRET in sem.payload.hits[0].text
    found = subprocess.run(["grep", "-rl", SECRET, str(home)], capture_output=True, text=True)
    assert found.stdout == "", found.stdout
    assert found.returncode == 1
    assert keys.metadata_path(home).exists()
    assert Home(home).settings().encryption


def test_log_reseal_after_rotation_and_of_plaintext_records(tmp_path: Path) -> None:
    keyhome = tmp_path / "keyhome"
    keys.init(keyhome, None)
    log = _log(tmp_path / "log", None)
    plain_seq = _append(log, "before encryption")
    log.close()
    log = _log(tmp_path / "log", keys.load_master_key(keyhome).keyring("log"))
    sealed_seq = _append(log, SECRET)
    log.close()
    rotation = keys.rotate(keyhome)
    log = _log(tmp_path / "log", rotation.new.keyring("log"))
    assert log.reseal(batch=1) == 2
    assert SECRET.encode() in log.get(sealed_seq).body  # type: ignore[union-attr]
    assert b"before encryption" in log.get(plain_seq).body  # type: ignore[union-attr]
    log.close()
    old_only = _log(tmp_path / "log", rotation.old.keyring("log"))
    for seq in (plain_seq, sealed_seq):
        with pytest.raises(IntegrityError) as caught:
            old_only.get(seq)
        assert caught.value.fields["check"] == "key_id"
    old_only.close()


def test_an_encrypted_index_made_before_cjk_pairs_is_indexed_again_once_at_open(
        tmp_path: Path, ring: KeyRing, monkeypatch: pytest.MonkeyPatch) -> None:
    """The texts are read back from their sealed records (Chroma keeps no document) and their tokens blinded."""
    from tests.test_chroma_store import check_cjk_reindexed_at_open

    check_cjk_reindexed_at_open(
        lambda: ChromaBackend(tmp_path / "chroma", embedder=HashEmbedder(), encryption=ring), monkeypatch)
