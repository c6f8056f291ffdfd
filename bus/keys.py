"""Key management: the master key of a home, where it is kept between runs, and the keys derived from it.

Hierarchy (docs/security.md tells the whole story)::

    passphrase --Argon2id(salt, params)--> unlock key          (or a random unlock key when no passphrase)
    unlock key --AES-256-GCM unwrap------> master key, gen N   (random; wrapped copies in keys/master.json)
    master key --HKDF-SHA256(label, N)---> per-purpose key     ("log", "store:lmdb", ...)

The unlock key only wraps; changing the passphrase rewraps the same master keys, so no data is re-encrypted.
``rotate`` adds a new random master key generation; older generations stay to open old records.
Between runs the unlock key lives in the OS keyring; without a secure one the fallbacks are, in order,
``MEMBUS_PASSPHRASE``, ``MEMBUS_PASSPHRASE_FILE`` and a 0600 key file outside the home.
"""

from __future__ import annotations

import base64
import contextlib
import enum
import hashlib
import json
import os
import secrets
import stat
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import keyring
import keyring.backend
import keyring.backends.chainer
import keyring.errors
import structlog
from argon2.low_level import ARGON2_VERSION, Type, hash_secret_raw
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from contracts.errors import IntegrityError, NotAuthorized, NotFound, ValidationError

log = structlog.get_logger("membus.keys")

KEY_LEN = 32
SALT_LEN = 16
KEY_ID_LEN = 8  # bytes of a derived key id inside every sealed record
NONCE_LEN = 12
METADATA_FORMAT = 1
KEYRING_SERVICE = "membus"

ENV_PASSPHRASE = "MEMBUS_PASSPHRASE"
ENV_PASSPHRASE_FILE = "MEMBUS_PASSPHRASE_FILE"
ENV_KEY_FILE = "MEMBUS_KEY_FILE"

# Argon2id defaults, measured on the 2-core CI-class machine (AMD EPYC, Python 3.11, argon2-cffi 25.1.0):
# 256 MiB, t=4, p=2 took 0.45-0.55 s (median 0.47 s over 10 runs). Neighbours: 256 MiB t=2 p=2 0.34 s,
# 512 MiB t=1 p=2 0.44 s, 512 MiB t=2 p=2 0.65 s, 128 MiB t=4 p=2 0.25 s. 256 MiB keeps small devices usable.
ARGON2_MEMORY_KIB = 262_144
ARGON2_TIME_COST = 4
ARGON2_PARALLELISM = 2


class KeySource(enum.StrEnum):
    """Where the unlock key of a home came from; the CLI prints it."""

    KEYRING = "keyring"
    ENV_PASSPHRASE = "env:MEMBUS_PASSPHRASE"
    PASSPHRASE_FILE = "file:MEMBUS_PASSPHRASE_FILE"
    KEY_FILE = "key-file"
    PASSPHRASE = "passphrase"  # given to the call directly (CLI prompt)


@dataclass(frozen=True)
class Argon2Params:
    memory_kib: int = ARGON2_MEMORY_KIB
    time_cost: int = ARGON2_TIME_COST
    parallelism: int = ARGON2_PARALLELISM

    def derive(self, passphrase: str, salt: bytes) -> bytes:
        secret = unicodedata.normalize("NFC", passphrase).encode()
        return hash_secret_raw(
            secret, salt, self.time_cost, self.memory_kib, self.parallelism, KEY_LEN, Type.ID, ARGON2_VERSION
        )


DEFAULT_ARGON2 = Argon2Params()


@dataclass(frozen=True)
class DerivedKey:
    """A per-purpose key; holds its AES-GCM object so sealing never rebuilds it."""

    key: bytes = field(repr=False)
    key_id: bytes
    label: str
    generation: int
    aead: AESGCM = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.key) != KEY_LEN or len(self.key_id) != KEY_ID_LEN:
            raise ValidationError("a derived key needs 32 key bytes and an 8-byte id", field="key")
        object.__setattr__(self, "aead", AESGCM(self.key))


class KeyRing(Mapping[bytes, DerivedKey]):
    """Key id -> key for one purpose: opens records of every generation it holds, seals with ``current``."""

    def __init__(self, keys: Sequence[DerivedKey], current: DerivedKey) -> None:
        if any(k.label != current.label for k in keys):
            raise ValidationError("a keyring holds keys of one label", field="label", expected=current.label)
        self._by_id = {k.key_id: k for k in keys}
        self._by_id[current.key_id] = current
        self.current = current
        self.label = current.label

    def __getitem__(self, key_id: bytes) -> DerivedKey:
        return self._by_id[key_id]

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._by_id)

    def __len__(self) -> int:
        return len(self._by_id)

    def __repr__(self) -> str:
        return f"KeyRing(label={self.label!r}, generations={sorted(k.generation for k in self.values())})"


@dataclass(frozen=True)
class MasterKey:
    """One master key generation, the source that unlocked it, and the older generations still kept."""

    key: bytes = field(repr=False)
    key_id: str
    generation: int
    source: KeySource
    retired: tuple[MasterKey, ...] = field(default=(), repr=False)

    def keyring(self, label: str) -> KeyRing:
        """Keys of ``label`` for this generation and every retired one (to open old records)."""
        current = derive_key(self, label)
        return KeyRing([current, *(derive_key(m, label) for m in self.retired)], current)


@dataclass(frozen=True)
class Rotation:
    old: MasterKey
    new: MasterKey

    def keyrings(self, label: str) -> tuple[KeyRing, KeyRing]:
        """(old, new): ``new`` opens records of every generation and seals with the new one."""
        return self.old.keyring(label), self.new.keyring(label)


def derive_key(master: MasterKey, label: str) -> DerivedKey:
    """HKDF-SHA256 of the master key; distinct labels give independent keys."""
    if not label:
        raise ValidationError("a key label must not be empty", field="label")
    info = f"membus/v1/{label}/gen{master.generation}".encode()
    key = HKDF(algorithm=hashes.SHA256(), length=KEY_LEN, salt=None, info=info).derive(master.key)
    return DerivedKey(key, derived_key_id(master.key_id, label, master.generation), label, master.generation)


def derived_key_id(master_key_id: str, label: str, generation: int) -> bytes:
    digest = hashlib.sha256(f"membus/key-id/v1|{master_key_id}|{label}|{generation}".encode()).digest()
    return digest[:KEY_ID_LEN]


def master_key_id(key: bytes) -> str:
    """Non-secret id of a master key, derived from it so a stale copy is recognised."""
    info = b"membus/v1/master-key-id"
    return HKDF(algorithm=hashes.SHA256(), length=8, salt=None, info=info).derive(key).hex()


# ---------------------------------------------------------------- metadata file (<home>/keys/master.json)


def metadata_path(home: Path) -> Path:
    return Path(home) / "keys" / "master.json"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode(), validate=True)


def _read_meta(home: Path) -> dict[str, Any]:
    path = metadata_path(home)
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise NotFound(f"no keys in {home}: run `membus keys init`", path=str(path)) from None
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"key metadata unreadable: {exc}", path=str(path), check="metadata") from None
    if not isinstance(meta, dict) or meta.get("format") != METADATA_FORMAT:
        raise IntegrityError("key metadata has an unknown format", path=str(path), check="metadata")
    damage = _damage(meta)
    if damage:
        raise IntegrityError(f"key metadata {path} is damaged: {damage}", path=str(path), check="metadata")
    return meta


def _damage(meta: dict[str, Any]) -> str:
    """What is wrong with the shape of key metadata ("" when nothing): every later read may then index it."""
    if not isinstance(meta.get("home_id"), str) or not meta["home_id"]:
        return "no home_id"
    kdf = meta.get("kdf")
    if not isinstance(kdf, dict) or kdf.get("name") not in ("none", "argon2id"):
        return "no kdf, or an unknown one"
    if kdf["name"] == "argon2id":
        if not all(isinstance(kdf.get(k), int) and kdf[k] > 0 for k in ("memory_kib", "time_cost", "parallelism")):
            return "the kdf's parameters are missing"
        if not _decodes(kdf.get("salt"), SALT_LEN):
            return "the kdf's salt is missing or not base64"
    generations = meta.get("generations")
    if not isinstance(generations, list) or not generations:
        return "no key generations"
    for entry in generations:
        if not (isinstance(entry, dict) and isinstance(entry.get("generation"), int)
                and isinstance(entry.get("key_id"), str) and _decodes(entry.get("wrapped"), NONCE_LEN + KEY_LEN + 16)):
            return "a key generation without generation, key_id or a wrapped key"
    return ""


def _decodes(text: Any, size: int) -> bool:
    try:
        return isinstance(text, str) and len(_unb64(text)) == size
    except ValueError:
        return False


def write_private(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    """Atomic write of a 0600 file (tmp + fsync + rename + fsync of the folder).

    ``exclusive``: FileExistsError if ``path`` exists (a hard link cannot replace a file)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        if exclusive:
            os.link(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _write_meta(home: Path, meta: dict[str, Any], *, exclusive: bool = False) -> None:
    text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    write_private(metadata_path(home), text.encode(), exclusive=exclusive)


def _params_of(meta: dict[str, Any]) -> Argon2Params | None:
    kdf = meta["kdf"]
    if kdf["name"] == "none":
        return None
    return Argon2Params(int(kdf["memory_kib"]), int(kdf["time_cost"]), int(kdf["parallelism"]))


def _wrap_aad(home_id: str, generation: int, key_id: str) -> bytes:
    return f"membus/master/v1|{home_id}|{generation}|{key_id}".encode()


def _wrap(unlock: bytes, home_id: str, generation: int, master: bytes) -> dict[str, Any]:
    key_id = master_key_id(master)
    nonce = os.urandom(NONCE_LEN)
    sealed = AESGCM(unlock).encrypt(nonce, master, _wrap_aad(home_id, generation, key_id))
    return {
        "generation": generation,
        "key_id": key_id,
        "wrapped": _b64(nonce + sealed),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _unwrap(unlock: bytes, home_id: str, entry: dict[str, Any]) -> bytes:
    """The wrapped key is the verifier: a wrong unlock key fails the GCM tag, never yields a wrong key."""
    blob = _unb64(entry["wrapped"])
    aad = _wrap_aad(home_id, int(entry["generation"]), entry["key_id"])
    if len(unlock) != KEY_LEN:
        raise NotAuthorized("damaged: not an unlock key", home_id=home_id)
    try:
        master = AESGCM(unlock).decrypt(blob[:NONCE_LEN], blob[NONCE_LEN:], aad)
    except InvalidTag:
        raise NotAuthorized("wrong passphrase or unlock key", home_id=home_id) from None
    if master_key_id(master) != entry["key_id"]:
        raise IntegrityError("master key does not match its id", check="key_id", key_id=entry["key_id"])
    return master


def _open_all(meta: dict[str, Any], unlock: bytes, source: KeySource) -> MasterKey:
    """Unwraps every generation; the newest becomes the current master key."""
    entries = sorted(meta["generations"], key=lambda e: int(e["generation"]), reverse=True)
    masters = [
        MasterKey(_unwrap(unlock, meta["home_id"], e), e["key_id"], int(e["generation"]), source)
        for e in entries
    ]
    current = masters[0]
    return MasterKey(current.key, current.key_id, current.generation, source, tuple(masters[1:]))


# ---------------------------------------------------------------- where the unlock key is kept


def secure_backend() -> keyring.backend.KeyringBackend | None:
    """The OS keyring backend to keep keys in, or None when only fail/null/plaintext ones exist."""
    chosen = keyring.get_keyring()
    if isinstance(chosen, keyring.backends.chainer.ChainerBackend):
        members = [b for b in chosen.backends if _is_secure(b)]
        return members[0] if members else None
    return chosen if _is_secure(chosen) else None


def _is_secure(backend: keyring.backend.KeyringBackend) -> bool:
    module = type(backend).__module__
    name = type(backend).__name__
    if module in ("keyring.backends.fail", "keyring.backends.null"):
        return False
    if module.startswith("keyrings.alt"):  # plaintext/base64 files, or ones that prompt for a password
        return False
    chained = isinstance(backend, keyring.backends.chainer.ChainerBackend)
    return not chained and "plaintext" not in name.lower()


def backend_name(backend: keyring.backend.KeyringBackend | None = None) -> str:
    chosen = backend or keyring.get_keyring()
    return f"{type(chosen).__module__}.{type(chosen).__name__}"


def key_file_path(home_id: str) -> Path:
    override = os.environ.get(ENV_KEY_FILE)
    if override:
        return Path(override).expanduser()
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "membus" / f"{home_id}.key"


def _checked_key_file(home: Path, home_id: str) -> Path:
    path = key_file_path(home_id)
    if path.resolve().is_relative_to(Path(home).resolve()):
        raise ValidationError(
            f"the key file {path} must live outside the data folder",
            field=ENV_KEY_FILE,
            expected="a path outside the home",
        )
    return path


def _read_private(path: Path, what: str) -> str:
    """Reads a secret file that only its owner may read (like ssh does for its keys)."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ValidationError(f"{what} {path} cannot be read: {exc.strerror}", field=what,
                              expected="a readable 0600 file") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValidationError(
            f"{what} {path} is accessible by group or others (mode {stat.S_IMODE(mode):o}): chmod 600 it",
            field=what,
            expected="mode 0600 or stricter",
        )
    return path.read_text()


def _candidates(meta: dict[str, Any], home: Path) -> Iterator[tuple[KeySource, bytes]]:
    """Unlock keys in the order they are tried; each fallback is announced loudly."""
    home_id = meta["home_id"]
    params = _params_of(meta)
    backend = secure_backend()
    if backend is None:
        log.warning("keys.no_secure_keyring", backend=backend_name(), home_id=home_id)
    else:
        stored = _keyring_get(backend, home_id)
        if stored is not None:
            yield KeySource.KEYRING, _stored_key(stored)
    if params is not None:
        passphrase = os.environ.get(ENV_PASSPHRASE)
        if passphrase:
            log.warning("keys.fallback", source=str(KeySource.ENV_PASSPHRASE), home_id=home_id)
            yield KeySource.ENV_PASSPHRASE, params.derive(passphrase, _unb64(meta["kdf"]["salt"]))
        passphrase_file = os.environ.get(ENV_PASSPHRASE_FILE)
        if passphrase_file:
            log.warning("keys.fallback", source=str(KeySource.PASSPHRASE_FILE), path=passphrase_file)
            text = _read_private(Path(passphrase_file).expanduser(), ENV_PASSPHRASE_FILE)
            yield KeySource.PASSPHRASE_FILE, params.derive(_strip_newline(text), _unb64(meta["kdf"]["salt"]))
    path = _checked_key_file(home, home_id)
    if path.exists():
        log.warning("keys.fallback", source=str(KeySource.KEY_FILE), path=str(path))
        yield KeySource.KEY_FILE, _stored_key(_read_private(path, ENV_KEY_FILE).strip())


def _stored_key(text: str) -> bytes:
    """A stored unlock key; b"" for text that is not one (damaged), which ``_unwrap`` then refuses."""
    try:
        return _unb64(text)
    except ValueError:
        return b""


def _keyring_get(backend: keyring.backend.KeyringBackend, home_id: str) -> str | None:
    """The stored unlock key; a keyring that fails (locked, no D-Bus session) counts as empty."""
    try:
        return backend.get_password(KEYRING_SERVICE, home_id)
    except keyring.errors.KeyringError as exc:
        log.warning("keys.keyring_read_failed", backend=backend_name(backend), error=str(exc))
        return None


def _strip_newline(text: str) -> str:
    return text.removesuffix("\n").removesuffix("\r")


def _unlock(home: Path, meta: dict[str, Any]) -> tuple[bytes, MasterKey]:
    tried: list[str] = []
    for source, unlock in _candidates(meta, home):
        try:
            return unlock, _open_all(meta, unlock, source)
        except NotAuthorized as exc:
            reason = exc.message if exc.message.startswith("damaged") else "wrong key"
            log.warning("keys.source_rejected", source=str(source), home_id=meta["home_id"], reason=reason)
            tried.append(f"{source} ({reason})")
    if tried:
        raise NotAuthorized(f"no key source unlocked {home}: tried {', '.join(tried)}", tried=tried)
    hint = f"set {ENV_PASSPHRASE} or {ENV_PASSPHRASE_FILE}" if _params_of(meta) else "restore the key file"
    raise NotFound(f"no key source for {home}: no keyring entry, no passphrase, no key file; {hint}")


def _remember(home: Path, home_id: str, unlock: bytes, *, key_file: bool, fallback: bool) -> KeySource | None:
    """Keeps the unlock key in the secure keyring; in a 0600 key file outside home when ``key_file``, or
    when ``fallback`` and no keyring took it."""
    kept = None
    backend = secure_backend()
    if backend is not None:
        try:
            backend.set_password(KEYRING_SERVICE, home_id, _b64(unlock))
            kept = KeySource.KEYRING
        except keyring.errors.KeyringError as exc:
            log.warning("keys.keyring_write_failed", backend=backend_name(backend), error=str(exc))
    if key_file or (fallback and kept is None):
        path = _checked_key_file(home, home_id)
        try:
            write_private(path, (_b64(unlock) + "\n").encode(), exclusive=True)
        except FileExistsError:  # MEMBUS_KEY_FILE shared by two homes: the first one's only key
            raise ValidationError(
                f"the key file {path} exists already, perhaps holding another home's unlock key: give each home "
                f"its own {ENV_KEY_FILE} (or unset it: each home then gets its own file)",
                field=ENV_KEY_FILE, expected="a path where no file is") from None
        log.warning("keys.fallback", source=str(KeySource.KEY_FILE), path=str(path), keyring=kept is not None)
        kept = kept or KeySource.KEY_FILE
    return kept


def _re_remember(home: Path, home_id: str, unlock: bytes) -> None:
    """After a passphrase change, updates every place that kept the old unlock key."""
    backend = secure_backend()
    if backend is not None and _keyring_get(backend, home_id) is not None:
        try:
            backend.set_password(KEYRING_SERVICE, home_id, _b64(unlock))
        except keyring.errors.KeyringError as exc:  # the new passphrase still unlocks the home
            log.warning("keys.keyring_write_failed", backend=backend_name(backend), error=str(exc))
    path = _checked_key_file(home, home_id)
    if path.exists():
        write_private(path, (_b64(unlock) + "\n").encode())


def check_encryption_setting(home: Path, enabled: bool) -> None:
    """Refuses a process whose ``encryption`` setting contradicts the home: off in a home that has keys (it
    would log plaintext beside sealed records, and no worker could read either), or on in a home whose log
    was written without encryption (the broker cannot read it sealed)."""
    home = Path(home)
    if not enabled and metadata_path(home).exists():
        raise ValidationError(
            f"{home} is encrypted (it has {metadata_path(home)}), but encryption is off for this process "
            "(`encryption = false` in membus.toml, or MEMBUS_ENCRYPTION=0): remove that setting",
            field="encryption", expected="on, as the home was made")
    if enabled and not metadata_path(home).exists() and (home / "log" / "data.mdb").exists():
        raise ValidationError(
            f"{home} was made with encryption off (its log has no keys): keep `encryption = false` for it, or "
            "start a new home",
            field="encryption", expected="off, as the home was made")


# ---------------------------------------------------------------- operations (membus keys ...)


def init(
    home: Path, passphrase: str | None, *, params: Argon2Params = DEFAULT_ARGON2, remember: bool | None = None
) -> MasterKey:
    """Creates generation 1 of the master key of ``home``.

    ``passphrase=None`` makes a random unlock key that must be kept (keyring, else key file).
    ``remember``: None keeps the unlock key in a secure keyring when there is one (and in a key file when
    there is no passphrase to fall back on); True also writes the key file; False keeps nothing.
    """
    home = Path(home)
    if metadata_path(home).exists():
        raise ValidationError(f"{home} already has keys", field="home", expected="a home without keys")
    home_id = secrets.token_hex(8)
    salt = os.urandom(SALT_LEN)
    if passphrase is None:
        unlock = os.urandom(KEY_LEN)
        kdf: dict[str, Any] = {"name": "none"}
        if remember is False:
            raise ValidationError("a home without passphrase must remember its key", field="remember")
    else:
        if not passphrase:
            raise ValidationError("the passphrase must not be empty", field="passphrase")
        unlock = params.derive(passphrase, salt)
        kdf = {"name": "argon2id", "version": ARGON2_VERSION, "salt": _b64(salt), **_params_json(params)}
    master = os.urandom(KEY_LEN)
    entry = _wrap(unlock, home_id, 1, master)
    meta = {"format": METADATA_FORMAT, "home_id": home_id, "kdf": kdf, "generations": [entry]}
    kept = None
    if remember is not False:
        kept = _remember(home, home_id, unlock, key_file=remember is True, fallback=passphrase is None)
    if passphrase is None and kept is None:
        raise ValidationError("nowhere to keep the key: no secure keyring and no key file", field="remember")
    try:
        _write_meta(home, meta, exclusive=True)  # two processes initialising one home: the first one wins
    except FileExistsError:
        raise ValidationError(f"{home} already has keys", field="home", expected="a home without keys") from None
    log.info("keys.init", home_id=home_id, key_id=entry["key_id"], kept=str(kept), kdf=kdf["name"])
    return MasterKey(master, entry["key_id"], 1, kept or KeySource.PASSPHRASE)


def _params_json(params: Argon2Params) -> dict[str, int]:
    return {"memory_kib": params.memory_kib, "time_cost": params.time_cost, "parallelism": params.parallelism}


def load_master_key(
    home: Path, *, create: bool = False, params: Argon2Params = DEFAULT_ARGON2, passphrase: str | None = None
) -> MasterKey:
    """The current master key of ``home`` (with its retired generations) and the source that unlocked it.

    Sources in order: OS keyring, ``MEMBUS_PASSPHRASE``, ``MEMBUS_PASSPHRASE_FILE``, the key file.
    ``passphrase`` (a CLI prompt) skips them. ``create`` initialises a home without keys, with the
    passphrase from the environment when one is set, else with a random key kept in the keyring/key file.
    """
    home = Path(home)
    if create and not metadata_path(home).exists():
        try:
            return init(home, passphrase or env_passphrase(), params=params)
        except ValidationError:
            if not metadata_path(home).exists():
                raise  # another process did not win the race: a real refusal
    meta = _read_meta(home)
    if passphrase is not None:
        return _open_with_passphrase(meta, passphrase)
    return _unlock(home, meta)[1]


def env_passphrase() -> str | None:
    """The passphrase the environment gives (MEMBUS_PASSPHRASE, else MEMBUS_PASSPHRASE_FILE), or None."""
    if os.environ.get(ENV_PASSPHRASE):
        return os.environ[ENV_PASSPHRASE]
    if os.environ.get(ENV_PASSPHRASE_FILE):
        path = Path(os.environ[ENV_PASSPHRASE_FILE]).expanduser()
        passphrase = _strip_newline(_read_private(path, ENV_PASSPHRASE_FILE))
        if not passphrase:  # a new home would silently get no passphrase at all
            raise ValidationError(f"the passphrase file {path} is empty", field=ENV_PASSPHRASE_FILE,
                                  expected="a passphrase")
        return passphrase
    return None


def _open_with_passphrase(meta: dict[str, Any], passphrase: str) -> MasterKey:
    params = _params_of(meta)
    if params is None:
        raise ValidationError("this home has no passphrase", field="passphrase", expected="no passphrase")
    return _open_all(meta, params.derive(passphrase, _unb64(meta["kdf"]["salt"])), KeySource.PASSPHRASE)


def change_passphrase(
    home: Path, old: str | None, new: str, *, params: Argon2Params = DEFAULT_ARGON2
) -> MasterKey:
    """Rewraps the same master keys under ``new``: key ids stay, no data is re-encrypted.

    ``old`` must be the current passphrase; for a home created without one, pass None (the keyring or
    key file unlocks it).
    """
    home = Path(home)
    meta = _read_meta(home)
    if not new:
        raise ValidationError("the passphrase must not be empty", field="passphrase")
    if _params_of(meta) is None:
        if old is not None:
            raise ValidationError("this home has no passphrase yet", field="old", expected="None")
        master = _unlock(home, meta)[1]
    else:
        if old is None:
            raise ValidationError("the current passphrase is required", field="old")
        master = _open_with_passphrase(meta, old)
    salt = os.urandom(SALT_LEN)
    unlock = params.derive(new, salt)
    meta["kdf"] = {"name": "argon2id", "version": ARGON2_VERSION, "salt": _b64(salt), **_params_json(params)}
    meta["generations"] = [_wrap(unlock, meta["home_id"], m.generation, m.key) for m in _all(master)]
    _write_meta(home, meta)  # first: if what follows fails, the new passphrase still unlocks the home
    _re_remember(home, meta["home_id"], unlock)
    log.info("keys.passphrase_changed", home_id=meta["home_id"], key_id=master.key_id)
    return MasterKey(master.key, master.key_id, master.generation, KeySource.PASSPHRASE, master.retired)


def _all(master: MasterKey) -> list[MasterKey]:
    return [master, *master.retired]


def rotate(home: Path, *, passphrase: str | None = None) -> Rotation:
    """Adds master key generation N+1 and makes it current; callers re-encrypt with ``Rotation.keyrings``."""
    home = Path(home)
    meta = _read_meta(home)
    if passphrase is not None:
        params = _params_of(meta)
        if params is None:
            raise ValidationError("this home has no passphrase", field="passphrase", expected="None")
        unlock = params.derive(passphrase, _unb64(meta["kdf"]["salt"]))
        old = _open_all(meta, unlock, KeySource.PASSPHRASE)
    else:
        unlock, old = _unlock(home, meta)
    generation = old.generation + 1
    fresh = os.urandom(KEY_LEN)
    entry = _wrap(unlock, meta["home_id"], generation, fresh)
    meta["generations"].append(entry)
    _write_meta(home, meta)
    log.info("keys.rotated", home_id=meta["home_id"], generation=generation, key_id=entry["key_id"])
    new = MasterKey(fresh, entry["key_id"], generation, old.source, (old, *old.retired))
    return Rotation(old, new)


def status(home: Path) -> dict[str, Any]:
    """What the CLI prints: source, key id, generations, Argon2 params, keyring backend."""
    home = Path(home)
    backend = secure_backend()
    report: dict[str, Any] = {
        "home": str(home),
        "initialised": metadata_path(home).exists(),
        "keyring_backend": backend_name(),
        "keyring_secure": backend is not None,
    }
    if not report["initialised"]:
        return report
    try:
        meta = _read_meta(home)
    except IntegrityError as exc:
        return {**report, "source": None, "error": exc.message}
    current = max(meta["generations"], key=lambda e: int(e["generation"]))
    params = _params_of(meta)
    report.update(
        home_id=meta["home_id"],
        key_id=current["key_id"],
        generation=int(current["generation"]),
        generations=[int(e["generation"]) for e in meta["generations"]],
        kdf=meta["kdf"]["name"],
        params=None if params is None else _params_json(params),
        key_file=str(key_file_path(meta["home_id"])),
    )
    try:
        report["source"] = str(_unlock(home, meta)[1].source)
    except (NotFound, NotAuthorized, ValidationError) as exc:
        report["source"] = None
        report["error"] = exc.message
    return report


# ---------------------------------------------------------------- handing derived keys to child processes

ENV_KEY_FD = "MEMBUS_KEY_FD"
"""File descriptor of an inherited pipe holding this process's keyrings (set by the supervisor)."""
_MAX_KEY_MESSAGE = 16 * 1024  # below every OS's pipe buffer: the parent writes it all before the child starts
_inherited: dict[str, KeyRing] | None = None


def export_keyrings(rings: Sequence[KeyRing]) -> bytes:
    """The derived keys of ``rings`` (never the master key), current generation first, as JSON."""
    data = {
        ring.label: [
            {"generation": k.generation, "key_id": k.key_id.hex(), "key": k.key.hex()}
            for k in [ring.current, *(k for k in ring.values() if k is not ring.current)]
        ]
        for ring in rings
    }
    return json.dumps(data).encode()


def import_keyrings(data: bytes) -> dict[str, KeyRing]:
    try:
        parsed = json.loads(data)
        out = {}
        for label, entries in parsed.items():
            keys = [DerivedKey(bytes.fromhex(e["key"]), bytes.fromhex(e["key_id"]), label, int(e["generation"]))
                    for e in entries]
            out[label] = KeyRing(keys, keys[0])
        return out
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise IntegrityError(f"inherited keys unreadable: {exc}", check="inherited") from None


def keyring_pipe(rings: Sequence[KeyRing]) -> int:
    """A pipe already holding ``rings``; returns its read end for the child (``pass_fds``, ENV_KEY_FD).

    The parent closes the read end after starting the child. Keys in a pipe are not in the child's
    environment (``/proc/<pid>/environ``), are not inherited by the child's own children, and are read once.
    """
    message = export_keyrings(rings)
    if len(message) > _MAX_KEY_MESSAGE:
        raise ValidationError("too many key generations to hand to a child process", field="generations")
    read_fd, write_fd = os.pipe()
    try:
        os.write(write_fd, message)
    finally:
        os.close(write_fd)
    return read_fd


def inherited_keyrings() -> dict[str, KeyRing] | None:
    """The keyrings a supervisor handed this process (read once, then the pipe is closed), or None."""
    global _inherited
    if _inherited is not None:
        return _inherited
    fd_text = os.environ.pop(ENV_KEY_FD, None)
    if not fd_text:
        return None
    fd = int(fd_text)
    chunks = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    _inherited = import_keyrings(b"".join(chunks))
    log.info("keys.inherited", labels=sorted(_inherited))
    return _inherited


def keyring_for(home: Path, label: str) -> KeyRing:
    """This process's keyring for ``label``: inherited from the supervisor, else from the master key
    (``load_master_key(home, create=True)``: a process started alone unlocks the home itself)."""
    inherited = inherited_keyrings()
    if inherited is not None:
        ring = inherited.get(label)
        if ring is None:
            raise NotAuthorized(f"this process was not given the {label!r} key", label=label)
        return ring
    master = load_master_key(home, create=True)
    log.info("keys.loaded", source=str(master.source), key_id=master.key_id, generation=master.generation)
    return master.keyring(label)


def subkey(key: DerivedKey, purpose: str) -> bytes:
    """A 32-byte key for a secondary purpose of one store (an HMAC of ids, a file cipher key)."""
    info = f"membus/v1/{key.label}/gen{key.generation}/{purpose}".encode()
    return HKDF(algorithm=hashes.SHA256(), length=KEY_LEN, salt=None, info=info).derive(key.key)


LOG_LABEL = "log"


def store_label(worker: str) -> str:
    return f"store:{worker}"
