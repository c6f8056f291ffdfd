"""bus/keys.py: master key creation, where it is kept, the headless fallbacks, passphrase change, rotation."""

from __future__ import annotations

import base64
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import keyring
import keyring.backend
import keyring.backends.chainer
import keyring.backends.fail
import keyring.errors
import pytest
from structlog.testing import capture_logs

from bus import keys
from bus.keys import (
    DEFAULT_ARGON2,
    Argon2Params,
    KeySource,
    change_passphrase,
    derive_key,
    init,
    load_master_key,
    metadata_path,
    rotate,
    secure_backend,
    status,
)
from bus.sealing import open_sealed, seal
from contracts.errors import IntegrityError, NotAuthorized, NotFound, ValidationError

CHEAP = Argon2Params(memory_kib=64, time_cost=1, parallelism=1)
REPO = Path(__file__).resolve().parent.parent


class MemoryKeyring(keyring.backend.KeyringBackend):
    """Stand-in for a secure OS keyring (none exists on this machine)."""

    priority = 1

    def __init__(self) -> None:
        self.entries: dict[tuple[str, str], str] = {}

    def get_password(self, service: str, username: str) -> str | None:
        return self.entries.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.entries[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        self.entries.pop((service, username), None)


class PlaintextKeyring(MemoryKeyring):
    """Looks like keyrings.alt's plaintext file backend."""


PlaintextKeyring.__module__ = "keyrings.alt.file"


def fail_backend() -> keyring.backend.KeyringBackend:
    """The backend keyring picks when the machine has no OS keyring."""
    return keyring.backends.fail.Keyring()  # type: ignore[no-untyped-call]


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    for name in (keys.ENV_PASSPHRASE, keys.ENV_PASSPHRASE_FILE, keys.ENV_KEY_FILE):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "user" / ".config"))
    before = keyring.get_keyring()
    keyring.set_keyring(fail_backend())
    yield
    keyring.set_keyring(before)


@pytest.fixture
def os_keyring() -> MemoryKeyring:
    backend = MemoryKeyring()
    keyring.set_keyring(backend)
    return backend


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


def home_id(home: Path) -> str:
    return str(json.loads(metadata_path(home).read_text())["home_id"])


def test_defaults_are_the_measured_parameters(home: Path, os_keyring: MemoryKeyring) -> None:
    assert Argon2Params() == DEFAULT_ARGON2 == Argon2Params(memory_kib=262_144, time_cost=4, parallelism=2)
    doc = (REPO / "docs" / "security.md").read_text()
    assert "262144 KiB" in doc and "time cost 4" in doc and "parallelism 2" in doc
    init(home, "correct horse")  # default params: the one slow Argon2 call of this file
    kdf = json.loads(metadata_path(home).read_text())["kdf"]
    assert (kdf["name"], kdf["memory_kib"], kdf["time_cost"], kdf["parallelism"]) == (
        "argon2id",
        262_144,
        4,
        2,
    )


def test_init_keeps_the_unlock_key_in_a_secure_keyring(home: Path, os_keyring: MemoryKeyring) -> None:
    created = init(home, "correct horse", params=CHEAP)
    assert created.source is KeySource.KEYRING
    assert list(os_keyring.entries) == [("membus", home_id(home))]
    loaded = load_master_key(home)
    assert (loaded.key, loaded.key_id, loaded.generation) == (created.key, created.key_id, 1)
    assert loaded.source is KeySource.KEYRING
    assert not keys.key_file_path(home_id(home)).exists()


def test_remember_writes_the_key_file_as_well(home: Path, os_keyring: MemoryKeyring) -> None:
    created = init(home, "p", params=CHEAP, remember=True)
    assert created.source is KeySource.KEYRING and keys.key_file_path(home_id(home)).exists()
    os_keyring.entries.clear()
    assert load_master_key(home).source is KeySource.KEY_FILE


def test_nothing_secret_is_written_in_the_home(home: Path, os_keyring: MemoryKeyring) -> None:
    passphrase = "correct horse battery"
    master = init(home, passphrase, params=CHEAP)
    unlock = base64.b64decode(next(iter(os_keyring.entries.values())))
    on_disk = b"".join(p.read_bytes() for p in home.rglob("*") if p.is_file())
    assert on_disk, "metadata was written"
    for secret in (master.key, unlock, passphrase.encode()):
        for form in (secret, base64.b64encode(secret), secret.hex().encode()):
            assert form not in on_disk
    assert stat.S_IMODE(metadata_path(home).stat().st_mode) == 0o600


def test_two_homes_get_their_own_keyring_entries(tmp_path: Path, os_keyring: MemoryKeyring) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    made = [init(first, "same passphrase", params=CHEAP), init(second, "same passphrase", params=CHEAP)]
    assert len(os_keyring.entries) == 2
    assert made[0].key != made[1].key
    assert [load_master_key(first).key, load_master_key(second).key] == [made[0].key, made[1].key]


def test_a_wrong_passphrase_is_a_typed_error(home: Path) -> None:
    init(home, "right", params=CHEAP)
    with pytest.raises(NotAuthorized):
        load_master_key(home, passphrase="wrong")
    assert load_master_key(home, passphrase="right").source is KeySource.PASSPHRASE


def test_headless_passphrase_from_the_environment(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    created = init(home, "from env", params=CHEAP)
    assert created.source is KeySource.PASSPHRASE
    assert not keys.key_file_path(home_id(home)).exists(), "a passphrase home writes no key file by default"
    monkeypatch.setenv(keys.ENV_PASSPHRASE, "from env")
    with capture_logs() as logs:
        loaded = load_master_key(home)
    assert (loaded.key, loaded.source) == (created.key, KeySource.ENV_PASSPHRASE)
    events = {(e["event"], e.get("source")) for e in logs if e["log_level"] == "warning"}
    assert ("keys.no_secure_keyring", None) in events
    assert ("keys.fallback", "env:MEMBUS_PASSPHRASE") in events


def test_wrong_environment_passphrase_is_refused(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    init(home, "right", params=CHEAP)
    monkeypatch.setenv(keys.ENV_PASSPHRASE, "wrong")
    with pytest.raises(NotAuthorized, match="MEMBUS_PASSPHRASE"):
        load_master_key(home)


def test_passphrase_file(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    created = init(home, "in a file", params=CHEAP)
    secret = tmp_path / "passphrase"
    secret.write_text("in a file\n")
    secret.chmod(0o600)
    monkeypatch.setenv(keys.ENV_PASSPHRASE_FILE, str(secret))
    loaded = load_master_key(home)
    assert (loaded.key, loaded.source) == (created.key, KeySource.PASSPHRASE_FILE)


def test_a_group_readable_passphrase_file_is_refused(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    init(home, "in a file", params=CHEAP)
    secret = tmp_path / "passphrase"
    secret.write_text("in a file")
    secret.chmod(0o640)
    monkeypatch.setenv(keys.ENV_PASSPHRASE_FILE, str(secret))
    with pytest.raises(ValidationError, match="chmod 600") as err:
        load_master_key(home)
    assert err.value.field == keys.ENV_PASSPHRASE_FILE


def test_headless_home_without_passphrase_uses_a_private_key_file(home: Path, tmp_path: Path) -> None:
    with capture_logs() as logs:
        created = load_master_key(home, create=True)
    path = tmp_path / "user" / ".config" / "membus" / f"{home_id(home)}.key"
    assert created.source is KeySource.KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert any(e["event"] == "keys.fallback" and e["source"] == "key-file" for e in logs)
    loaded = load_master_key(home)
    assert (loaded.key, loaded.key_id, loaded.source) == (created.key, created.key_id, KeySource.KEY_FILE)


def test_key_file_override_and_its_permissions(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    override = tmp_path / "elsewhere" / "membus.key"
    monkeypatch.setenv(keys.ENV_KEY_FILE, str(override))
    created = load_master_key(home, create=True)
    assert override.exists()
    assert load_master_key(home).key == created.key
    override.chmod(0o644)
    with pytest.raises(ValidationError, match="chmod 600"):
        load_master_key(home)


def test_a_key_file_inside_the_home_is_refused(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(keys.ENV_KEY_FILE, str(home / "master.key"))
    with pytest.raises(ValidationError, match="outside"):
        load_master_key(home, create=True)
    assert not (home / "master.key").exists()


def test_create_uses_the_environment_passphrase(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(keys.ENV_PASSPHRASE, "env secret")
    created = load_master_key(home, create=True, params=CHEAP)
    assert json.loads(metadata_path(home).read_text())["kdf"]["name"] == "argon2id"
    assert load_master_key(home, passphrase="env secret").key == created.key


def test_a_damaged_key_file_is_named_as_such(home: Path, tmp_path: Path) -> None:
    """A truncated or overwritten key file was a traceback (a base64 or AES-GCM key-length error)."""
    created = load_master_key(home, create=True)
    path = tmp_path / "user" / ".config" / "membus" / f"{home_id(home)}.key"
    good = path.read_text()
    for damaged in (good[:20], "garbage", ""):
        path.write_text(damaged)
        with pytest.raises(NotAuthorized, match=r"key-file \(damaged: not an unlock key\)"):
            load_master_key(home)
    path.write_text(good)
    assert load_master_key(home).key == created.key


def test_no_source_at_all_is_not_found(home: Path) -> None:
    init(home, "nobody remembers", params=CHEAP)
    with pytest.raises(NotFound, match="MEMBUS_PASSPHRASE"):
        load_master_key(home)
    with pytest.raises(NotFound):
        load_master_key(home / "never-initialised")


def test_a_stale_keyring_entry_falls_back_to_the_passphrase(
    home: Path, os_keyring: MemoryKeyring, monkeypatch: pytest.MonkeyPatch
) -> None:
    created = init(home, "right", params=CHEAP)
    os_keyring.set_password("membus", home_id(home), base64.b64encode(os.urandom(32)).decode())
    monkeypatch.setenv(keys.ENV_PASSPHRASE, "right")
    with capture_logs() as logs:
        loaded = load_master_key(home)
    assert (loaded.key, loaded.source) == (created.key, KeySource.ENV_PASSPHRASE)
    assert any(e["event"] == "keys.source_rejected" and e["source"] == "keyring" for e in logs)


def test_init_twice_is_refused(home: Path) -> None:
    init(home, "once", params=CHEAP)
    with pytest.raises(ValidationError, match="already has keys"):
        init(home, "twice", params=CHEAP)


def test_corrupt_metadata_is_an_integrity_error(home: Path) -> None:
    init(home, "x", params=CHEAP)
    metadata_path(home).write_text("{not json")
    with pytest.raises(IntegrityError):
        load_master_key(home, passphrase="x")


def test_changing_the_passphrase_keeps_the_master_key(home: Path, os_keyring: MemoryKeyring) -> None:
    created = init(home, "old passphrase", params=CHEAP)
    log_key = derive_key(created, "log")
    record = seal(log_key, b"remember this", b"seq=1|topic=a")
    salt_before = json.loads(metadata_path(home).read_text())["kdf"]["salt"]

    changed = change_passphrase(home, "old passphrase", "new passphrase", params=CHEAP)

    assert (changed.key, changed.key_id) == (created.key, created.key_id)
    assert json.loads(metadata_path(home).read_text())["kdf"]["salt"] != salt_before
    with pytest.raises(NotAuthorized):
        load_master_key(home, passphrase="old passphrase")
    by_new = load_master_key(home, passphrase="new passphrase")
    assert open_sealed(by_new.keyring("log"), record, b"seq=1|topic=a") == b"remember this"
    assert load_master_key(home).source is KeySource.KEYRING, "the keyring entry follows the new passphrase"
    assert load_master_key(home).key == created.key


def test_changing_the_passphrase_needs_the_old_one(home: Path) -> None:
    init(home, "old", params=CHEAP)
    before = metadata_path(home).read_bytes()
    with pytest.raises(NotAuthorized):
        change_passphrase(home, "not it", "new", params=CHEAP)
    assert metadata_path(home).read_bytes() == before


def test_changing_the_passphrase_updates_the_key_file(home: Path) -> None:
    created = init(home, "old", params=CHEAP, remember=True)
    assert load_master_key(home).source is KeySource.KEY_FILE
    change_passphrase(home, "old", "new", params=CHEAP)
    assert load_master_key(home).key == created.key


def test_a_home_without_passphrase_can_get_one(home: Path, os_keyring: MemoryKeyring) -> None:
    created = load_master_key(home, create=True)
    assert json.loads(metadata_path(home).read_text())["kdf"] == {"name": "none"}
    with pytest.raises(ValidationError):
        change_passphrase(home, "guess", "new", params=CHEAP)
    change_passphrase(home, None, "now with one", params=CHEAP)
    assert load_master_key(home, passphrase="now with one").key == created.key
    assert load_master_key(home).key == created.key


def test_rotation_adds_a_generation_and_keeps_the_old_one(home: Path, os_keyring: MemoryKeyring) -> None:
    first = init(home, "p", params=CHEAP)
    rotation = rotate(home)
    assert (rotation.old.key, rotation.old.generation) == (first.key, 1)
    assert rotation.new.generation == 2 and rotation.new.key != first.key
    assert rotation.new.key_id != first.key_id
    loaded = load_master_key(home)
    assert (loaded.key, loaded.generation) == (rotation.new.key, 2)
    assert [m.key for m in loaded.retired] == [first.key]
    assert rotate(home, passphrase="p").new.generation == 3


def test_rotation_survives_a_passphrase_change(home: Path) -> None:
    init(home, "p1", params=CHEAP)
    two = rotate(home, passphrase="p1").new
    change_passphrase(home, "p1", "p2", params=CHEAP)
    loaded = load_master_key(home, passphrase="p2")
    assert (loaded.key, loaded.generation, len(loaded.retired)) == (two.key, 2, 1)


def test_derived_keys_are_distinct_per_label_and_generation(home: Path, os_keyring: MemoryKeyring) -> None:
    master = init(home, "p", params=CHEAP)
    labels = ["log", "store:lmdb", "store:libsql", "store:chroma", "store:duckdb", "bus:curve"]
    derived = [derive_key(master, label) for label in labels]
    assert len({d.key for d in derived} | {master.key}) == len(labels) + 1
    assert len({d.key_id for d in derived}) == len(labels)
    assert derive_key(master, "log").key == derived[0].key, "derivation is deterministic"
    newer = rotate(home).new
    assert derive_key(newer, "log").key_id != derived[0].key_id
    assert derive_key(newer, "log").generation == 2


def test_secure_backend_detection(os_keyring: MemoryKeyring) -> None:
    assert secure_backend() is os_keyring
    keyring.set_keyring(fail_backend())
    assert secure_backend() is None
    keyring.set_keyring(PlaintextKeyring())
    assert secure_backend() is None

    class Chain(keyring.backends.chainer.ChainerBackend):
        members: list[keyring.backend.KeyringBackend] = []

        @property
        def backends(self) -> list[keyring.backend.KeyringBackend]:
            return self.members

    chain = Chain()  # type: ignore[no-untyped-call]
    keyring.set_keyring(chain)
    assert secure_backend() is None, "a chain with nothing usable"
    Chain.members = [PlaintextKeyring(), os_keyring]
    assert secure_backend() is os_keyring, "the plaintext member is skipped"


def test_an_insecure_backend_is_never_written(home: Path) -> None:
    plaintext = PlaintextKeyring()
    keyring.set_keyring(plaintext)
    init(home, "p", params=CHEAP)
    assert plaintext.entries == {}


def test_status(home: Path, os_keyring: MemoryKeyring) -> None:
    assert status(home)["initialised"] is False
    master = init(home, "p", params=CHEAP)
    report = status(home)
    assert report["source"] == "keyring" and report["key_id"] == master.key_id
    assert report["params"] == {"memory_kib": 64, "time_cost": 1, "parallelism": 1}
    assert report["keyring_backend"].endswith("MemoryKeyring") and report["keyring_secure"] is True
    os_keyring.entries.clear()
    report = status(home)
    assert report["source"] is None and "MEMBUS_PASSPHRASE" in report["error"]


def test_a_failing_keyring_falls_back(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class LockedKeyring(MemoryKeyring):
        def get_password(self, service: str, username: str) -> str | None:
            raise keyring.errors.KeyringLocked("locked")

    init(home, "p", params=CHEAP)
    keyring.set_keyring(LockedKeyring())
    monkeypatch.setenv(keys.ENV_PASSPHRASE, "p")
    with capture_logs() as logs:
        assert load_master_key(home).source is KeySource.ENV_PASSPHRASE
    assert any(e["event"] == "keys.keyring_read_failed" for e in logs)


def test_a_shared_key_file_is_never_overwritten_by_a_second_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With MEMBUS_KEY_FILE set for both, the second home's init replaced the first home's only unlock key."""
    shared = tmp_path / "elsewhere" / "membus.key"
    monkeypatch.setenv(keys.ENV_KEY_FILE, str(shared))
    first, second = tmp_path / "a", tmp_path / "b"
    created = load_master_key(first, create=True)
    with pytest.raises(ValidationError, match="exists already"):
        load_master_key(second, create=True)
    assert not metadata_path(second).exists()
    assert load_master_key(first).key == created.key


@pytest.mark.parametrize("damage", ["no generations", "empty generations", "bad base64", "short wrapped",
                                    "kdf without parameters", "no home id"])
def test_damaged_key_metadata_is_an_integrity_error_naming_what(home: Path, damage: str) -> None:
    """Each of these was a traceback (KeyError, binascii.Error, ValueError) from `keys status` and `membus up`."""
    init(home, "x", params=CHEAP)
    meta = json.loads(metadata_path(home).read_text())
    entry = meta["generations"][0]
    if damage == "no generations":
        del meta["generations"]
    elif damage == "empty generations":
        meta["generations"] = []
    elif damage == "bad base64":
        entry["wrapped"] = "abc"
    elif damage == "short wrapped":
        entry["wrapped"] = base64.b64encode(b"12345").decode()
    elif damage == "kdf without parameters":
        del meta["kdf"]["memory_kib"]
    else:
        del meta["home_id"]
    metadata_path(home).write_text(json.dumps(meta))
    with pytest.raises(IntegrityError, match="is damaged"):
        load_master_key(home, passphrase="x")
    assert "is damaged" in keys.status(home)["error"]


def test_a_missing_or_empty_passphrase_file_is_named(home: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing file was a FileNotFoundError traceback; an empty one made a home with no passphrase at all."""
    monkeypatch.setenv(keys.ENV_PASSPHRASE_FILE, str(tmp_path / "nope.pp"))
    with pytest.raises(ValidationError, match="cannot be read"):
        load_master_key(home, create=True)
    empty = tmp_path / "empty.pp"
    empty.write_text("\n")
    empty.chmod(0o600)
    monkeypatch.setenv(keys.ENV_PASSPHRASE_FILE, str(empty))
    with pytest.raises(ValidationError, match="is empty"):
        load_master_key(home, create=True)
    assert not metadata_path(home).exists()


def test_the_encryption_setting_must_match_the_home(home: Path) -> None:
    """Off in an encrypted home, the broker logged plaintext and every worker crash-looped; on in a plaintext
    home, the broker crash-looped."""
    keys.check_encryption_setting(home, True)
    keys.check_encryption_setting(home, False)
    init(home, "x", params=CHEAP)
    with pytest.raises(ValidationError, match="is encrypted"):
        keys.check_encryption_setting(home, False)
    plain = home.parent / "plain"
    (plain / "log").mkdir(parents=True)
    (plain / "log" / "data.mdb").write_bytes(b"")
    with pytest.raises(ValidationError, match="made with encryption off"):
        keys.check_encryption_setting(plain, True)
    keys.check_encryption_setting(plain, False)
