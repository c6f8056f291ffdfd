"""The home folder: settings, CurveZMQ keys, the log and the stores' data, in one place.

    <home>/membus.toml          optional settings (see Settings); env MEMBUS_<NAME> overrides
    <home>/keys/broker.key      the broker's public key; broker.key_secret (0600) its secret
    <home>/keys/modules/NAME.key, NAME.key_secret
                                one key pair per module; a module key in this folder is the ZAP allow-list
    <home>/log/                 the event log (LMDB)
    <home>/data/<worker>/       one folder per store worker
    <home>/run/broker.json      where the running broker listens (endpoint, pid)
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any

import msgspec
import zmq

from contracts.errors import BusError, ValidationError

Positive = Annotated[float, msgspec.Meta(gt=0)]
Count = Annotated[int, msgspec.Meta(ge=1)]

_MODULE_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_RESERVED_NAMES = frozenset({"broker", "unknown"})
"""The broker's own source (its messages skip every permission) and the one of a key it cannot name."""


def default_home() -> Path:
    env = os.environ.get("MEMBUS_HOME")
    if env:
        return Path(env).expanduser()
    if os.name == "nt":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif os.uname().sysname == "Darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share"))
    return base / "membus"


@dataclass
class Settings:
    endpoint: str = "tcp://127.0.0.1:0"
    """Where the broker binds; port 0 picks a free port, published in run/broker.json. Loopback by default."""
    max_message_bytes: Annotated[int, msgspec.Meta(ge=1024, le=1 << 30)] = 1 << 20
    heartbeat_s: Positive = 1.0
    client_timeout_s: Positive = 5.0
    """A client silent this long is dropped; its unacked group deliveries are redelivered."""
    ack_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=7 * 86_400)] = 30.0
    max_attempts: Count = 5
    live_hwm: Count = 1000
    """Frames queued per live subscriber before the broker drops (the client fills the gap from the log)."""
    log_map_size: Annotated[int, msgspec.Meta(ge=64 << 10)] = 1 << 30
    """The event log's LMDB map to start with; it doubles as the log grows."""
    log_max_size: Annotated[int, msgspec.Meta(ge=64 << 10)] = 1 << 40
    """The most the log may grow to; past it publishes are refused with ``store_full``."""
    tail_cache_bytes: Annotated[int, msgspec.Meta(ge=0)] = 8 << 20
    """Newest records kept in memory for groups and subscribers that keep up (bounded in bytes)."""
    workers: list[str] = field(default_factory=lambda: ["lmdb", "libsql", "chroma", "duckdb"])
    encryption: bool = True
    """Seal the log and every store at rest (docs/security.md); false only to measure its cost."""
    stores: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Each store's own settings, ``[stores.lmdb]`` in membus.toml (``ttl_seconds``, ``max_map_size``, ...),
    or ``MEMBUS_LMDB_TTL_SECONDS``: see ``store_settings``."""

    def store_settings(self, store: str) -> dict[str, Any]:
        """``[stores.<store>]`` of membus.toml, then ``MEMBUS_<STORE>_<NAME>`` variables (strings: the store
        converts and checks them)."""
        out = dict(self.stores.get(store, {}))
        prefix = f"MEMBUS_{store.upper()}_"
        out.update({k.removeprefix(prefix).lower(): v for k, v in os.environ.items() if k.startswith(prefix)})
        return out

    @classmethod
    def load(cls, home: Path) -> Settings:
        """``<home>/membus.toml``, then ``MEMBUS_<NAME>`` variables, checked: a wrong type or a value out of
        bounds is a ValidationError naming the setting, not a broker that starts with it."""
        values: dict[str, Any] = {}
        path = home / "membus.toml"
        if path.exists():
            try:
                values.update(tomllib.loads(path.read_text()))
            except tomllib.TOMLDecodeError as exc:
                raise ValidationError(f"{path} is not valid TOML: {exc}", field=str(path)) from None
        for f in fields(cls):
            env = os.environ.get(f"MEMBUS_{f.name.upper()}")
            if env is None:
                continue
            if f.name == "workers":
                values[f.name] = [w for w in env.split(",") if w]
            elif f.name == "encryption":
                values[f.name] = env.strip().lower() in ("1", "true", "yes", "on")
            else:
                values[f.name] = env
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise BusError(f"unknown settings in {path}: {sorted(unknown)}", path=str(path))
        try:
            return msgspec.convert(values, cls, strict=False)  # strict=False: "2.5" from a variable is a float
        except msgspec.ValidationError as exc:
            name = str(exc).rpartition("$.")[2].rstrip("`")
            raise ValidationError(f"setting {name!r} (in {path} or MEMBUS_{name.upper()}): {exc}", field=name,
                                  expected=str(exc).split(" - at ")[0]) from None


class Home:
    def __init__(self, path: Path | str | None = None) -> None:
        self.path = Path(path).expanduser() if path else default_home()

    @property
    def keys(self) -> Path:
        return self.path / "keys"

    @property
    def modules(self) -> Path:
        return self.keys / "modules"

    @property
    def log_dir(self) -> Path:
        return self.path / "log"

    def data_dir(self, worker: str) -> Path:
        return self.path / "data" / worker

    @property
    def run_file(self) -> Path:
        return self.path / "run" / "broker.json"

    def settings(self) -> Settings:
        return Settings.load(self.path)

    def ensure(self) -> None:
        for d in (self.path, self.keys, self.modules, self.path / "run"):
            try:
                d.mkdir(parents=True, exist_ok=True)
                if os.name != "nt":
                    os.chmod(d, 0o700)
            except OSError as exc:  # a read-only or full disk, another user's folder: one line, not a traceback
                raise BusError(f"cannot set up the home folder {d}: {exc.strerror or exc}", path=str(d)) from None

    # -- CurveZMQ keys ---------------------------------------------------------------------------

    def broker_keys(self, *, create: bool = False) -> tuple[bytes, bytes]:
        return self._keypair(self.keys / "broker", create)

    def broker_public_key(self) -> bytes:
        path = self.keys / "broker.key"
        if not path.exists():
            raise BusError(f"no broker key in {self.keys}: start the broker once (`membus up`)",
                           home=str(self.path))
        return path.read_bytes().strip()

    def module_keys(self, module: str, *, create: bool = True) -> tuple[bytes, bytes]:
        if not _MODULE_NAME.match(module):
            raise BusError(f"invalid module name {module!r}: lower-case letters, digits, - and _", module=module)
        if module in _RESERVED_NAMES:
            raise BusError(f"module name {module!r} is reserved for the broker: choose another", module=module)
        return self._keypair(self.modules / module, create)

    def revoke_module(self, module: str) -> bool:
        """Takes ``module`` off the allow-list (its key pair deleted); False if it was not on it."""
        found = False
        for suffix in (".key", ".key_secret"):
            path = self.modules / f"{module}{suffix}"
            if path.exists() and _MODULE_NAME.match(module):
                path.unlink()
                found = True
        return found

    def allowed_modules(self) -> dict[bytes, str]:
        """Public key (z85) -> module name, read from keys/modules/*.key (a file named for no module, or for a
        reserved name, allows nothing)."""
        out: dict[bytes, str] = {}
        if self.modules.exists():
            for p in self.modules.glob("*.key"):
                if _MODULE_NAME.match(p.stem) and p.stem not in _RESERVED_NAMES:
                    out[p.read_bytes().strip()] = p.stem
        return out

    def _keypair(self, stem: Path, create: bool) -> tuple[bytes, bytes]:
        public, secret = stem.with_suffix(".key"), stem.with_suffix(".key_secret")
        if public.exists() and secret.exists():
            return public.read_bytes().strip(), secret.read_bytes().strip()
        if not create:
            raise BusError(f"no key pair at {stem}", path=str(stem))
        self.ensure()
        pub, sec = zmq.curve_keypair()
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(sec)
        public.write_bytes(pub)
        return pub, sec

    # -- where the broker is ---------------------------------------------------------------------

    @property
    def supervisor_file(self) -> Path:
        return self.path / "run" / "up.json"

    def write_supervisor_file(self, children: dict[str, Any] | None = None) -> None:
        """That ``membus up`` runs on this home (its children may be between restarts): offline work waits.
        ``children``: per child, how often it was restarted and when it will be next (``membus status``)."""
        self.supervisor_file.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.supervisor_file, {"pid": os.getpid(), "children": children or {}})

    def supervisor_state(self) -> dict[str, Any]:
        """What ``write_supervisor_file`` wrote last ({} when no ``membus up`` runs)."""
        try:
            state = json.loads(self.supervisor_file.read_text())
        except (OSError, ValueError):
            return {}
        return state if isinstance(state, dict) else {}

    def remove_supervisor_file(self) -> None:
        self.supervisor_file.unlink(missing_ok=True)

    def supervisor_pid(self) -> int | None:
        try:
            pid = json.loads(self.supervisor_file.read_text()).get("pid")
        except (OSError, ValueError, AttributeError):
            return None
        return pid if isinstance(pid, int) else None

    def write_run_file(self, endpoint: str) -> None:
        self.run_file.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.run_file, {"endpoint": endpoint, "pid": os.getpid()})

    def read_run_file(self) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads(self.run_file.read_text())
            return data
        except (FileNotFoundError, json.JSONDecodeError):
            return None


def write_json(path: Path, data: Any) -> None:
    """Replaces ``path`` with ``data`` as JSON in one step (a reader never sees half a file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, default=str))
    tmp.replace(path)
