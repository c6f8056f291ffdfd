"""bus/sealing.py: AES-256-GCM records that open only with the right key, in the right place, unaltered."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import keyring
import keyring.backends.fail
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bus import keys
from bus.keys import Argon2Params, DerivedKey, KeyRing, KeySource, MasterKey, init, load_master_key, rotate
from bus.sealing import OVERHEAD, VERSION, KeyRingCipher, open_sealed, seal
from contracts.errors import IntegrityError

CHEAP = Argon2Params(memory_kib=64, time_cost=1, parallelism=1)
AAD = (41).to_bytes(8, "big") + b"memory.store.request"


def random_master(generation: int = 1) -> MasterKey:
    key = os.urandom(32)
    return MasterKey(key, keys.master_key_id(key), generation, KeySource.PASSPHRASE)


@pytest.fixture(scope="module")
def ring() -> KeyRing:
    return random_master().keyring("log")


@pytest.fixture
def headless(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    for name in (keys.ENV_PASSPHRASE, keys.ENV_PASSPHRASE_FILE, keys.ENV_KEY_FILE):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    before = keyring.get_keyring()
    keyring.set_keyring(keyring.backends.fail.Keyring())  # type: ignore[no-untyped-call]
    yield
    keyring.set_keyring(before)


def test_round_trip(ring: KeyRing) -> None:
    blob = seal(ring.current, b"a memory", AAD)
    assert open_sealed(ring, blob, AAD) == b"a memory"
    assert len(blob) == len(b"a memory") + OVERHEAD
    assert blob[0] == VERSION and blob[1:9] == ring.current.key_id
    assert b"a memory" not in blob


def test_opens_from_a_zero_copy_buffer(ring: KeyRing) -> None:
    blob = seal(ring.current, b"from lmdb", AAD)
    assert open_sealed(ring, memoryview(bytearray(blob)), AAD) == b"from lmdb"


def test_empty_plaintext_and_empty_aad(ring: KeyRing) -> None:
    assert open_sealed(ring, seal(ring.current, b"", b""), b"") == b""


def test_same_plaintext_seals_differently(ring: KeyRing) -> None:
    assert seal(ring.current, b"same", AAD) != seal(ring.current, b"same", AAD)


def test_every_flipped_byte_is_detected(ring: KeyRing) -> None:
    blob = seal(ring.current, b"x" * 40, AAD)
    for position in range(len(blob)):
        tampered = bytearray(blob)
        tampered[position] ^= 0x01
        with pytest.raises(IntegrityError) as err:
            open_sealed(ring, bytes(tampered), AAD)
        expected = "version" if position == 0 else "key_id" if position < 9 else "tag"
        assert err.value.fields["check"] == expected, position


def test_truncated_or_extended_records_are_detected(ring: KeyRing) -> None:
    blob = seal(ring.current, b"payload", AAD)
    for broken in (blob[:-1], blob + b"\x00", blob[: OVERHEAD - 1], b""):
        with pytest.raises(IntegrityError):
            open_sealed(ring, broken, AAD)


def test_a_record_moved_to_another_place_does_not_open(ring: KeyRing) -> None:
    blob = seal(ring.current, b"payload", AAD)
    with pytest.raises(IntegrityError, match="associated data") as err:
        open_sealed(ring, blob, (42).to_bytes(8, "big") + b"memory.store.request")
    assert err.value.fields["check"] == "tag"


def test_a_key_of_another_purpose_does_not_open(ring: KeyRing) -> None:
    other = random_master().keyring("store:lmdb")
    with pytest.raises(IntegrityError) as err:
        open_sealed(other, seal(ring.current, b"payload", AAD), AAD)
    assert err.value.fields["check"] == "key_id"
    assert err.value.fields["key_id"] == ring.current.key_id.hex()


def test_a_wrong_key_under_the_same_id_does_not_open(ring: KeyRing) -> None:
    impostor = DerivedKey(os.urandom(32), ring.current.key_id, "log", 1)
    blob = seal(impostor, b"payload", AAD)
    with pytest.raises(IntegrityError) as err:
        open_sealed(ring, blob, AAD)
    assert err.value.fields["check"] == "tag"


def test_rotation_opens_old_records_and_seals_with_the_new_generation(tmp_path: Path, headless: None) -> None:
    home = tmp_path / "home"
    first = init(home, "p", params=CHEAP)
    old_record = seal(first.keyring("log").current, b"from gen 1", b"seq=1")

    rotation = rotate(home, passphrase="p")
    old_ring, new_ring = rotation.keyrings("log")

    assert new_ring.current.generation == 2
    assert open_sealed(new_ring, old_record, b"seq=1") == b"from gen 1"
    new_record = seal(new_ring.current, b"from gen 2", b"seq=2")
    assert new_record[1:9] == new_ring.current.key_id != old_ring.current.key_id
    with pytest.raises(IntegrityError):
        open_sealed(old_ring, new_record, b"seq=2")
    reopened = load_master_key(home, passphrase="p").keyring("log")
    assert open_sealed(reopened, old_record, b"seq=1") == b"from gen 1"
    assert open_sealed(reopened, new_record, b"seq=2") == b"from gen 2"


@settings(deadline=None)
@given(plaintext=st.binary(max_size=2048), aad=st.binary(max_size=128))
def test_any_plaintext_and_aad_round_trip(ring: KeyRing, plaintext: bytes, aad: bytes) -> None:
    assert open_sealed(ring, seal(ring.current, plaintext, aad), aad) == plaintext


@settings(deadline=None)
@given(data=st.binary(max_size=256), with_header=st.booleans())
def test_arbitrary_bytes_raise_integrity_error_only(ring: KeyRing, data: bytes, with_header: bool) -> None:
    blob = (bytes([VERSION]) + ring.current.key_id + data) if with_header else data
    with pytest.raises(IntegrityError):
        open_sealed(ring, blob, AAD)


def test_the_log_cipher_adapter_checks_the_generation_in_the_header() -> None:
    old = random_master(1)
    new = random_master(2)
    new = MasterKey(new.key, new.key_id, 2, new.source, (old,))
    before, after = KeyRingCipher(old.keyring("log")), KeyRingCipher(new.keyring("log"))
    assert (before.key_id, after.key_id) == (1, 2)
    blob = before.seal(b"body", AAD)
    assert after.open(1, blob, AAD) == b"body"
    with pytest.raises(IntegrityError) as err:
        after.open(2, blob, AAD)
    assert err.value.fields["check"] == "generation"
    assert after.open(2, after.seal(b"new body", AAD), AAD) == b"new body"
