"""Versioned SQL schemas per component (core and plugins), applied to a libSQL/SQLite connection.

Every component keeps its own version line: ``schema_applied`` holds one row per
applied version of each component with the checksum of the statements that were
run, and ``schema_history`` records every apply and rollback. A registered version
whose statements changed after it was applied is drift, reported by ``status`` and
refused by ``apply_all`` / ``up`` with ``SchemaDrift`` naming the component and version.

Each component migrates in its own transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``),
components in priority order. Connections may be opened with ``isolation_level=None``
or in libsql's default mode; either way no transaction may be open when a function
here is called.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import structlog

from contracts.errors import StoreError

log = structlog.get_logger("membus.schemas")


class SchemaError(StoreError):
    """A schema cannot be applied or rolled back as asked."""

    code = "schema"


class SchemaDrift(SchemaError):
    """An applied version's registered statements no longer match what was applied."""

    code = "schema_drift"


class MigrationFailed(SchemaError):
    """A statement of a version failed; the component's transaction was rolled back."""

    code = "migration_failed"


class Connection(Protocol):
    """The part of a libsql (or sqlite3) connection the registry uses."""

    @property
    def in_transaction(self) -> bool: ...

    def execute(self, sql: str, parameters: Any = ..., /) -> Any: ...


_PUNCTUATION_SPACE = re.compile(r"\s*([(),;=])\s*")


@dataclass(frozen=True)
class SchemaVersion:
    version: int
    name: str
    statements: tuple[str, ...]
    rollback: tuple[str, ...] = ()
    description: str = ""

    @property
    def checksum(self) -> str:
        """Hash of the forward statements with whitespace normalised (reformatting is not drift)."""
        normalised = "\n".join(_PUNCTUATION_SPACE.sub(r"\1", " ".join(s.split())) for s in self.statements)
        return hashlib.sha256(normalised.encode()).hexdigest()

    def matches(self, recorded: str) -> bool:
        """Whether ``recorded`` is this version's checksum, as this code or earlier code computed it (before
        2026-11-22 spaces around punctuation counted: the same statements, not drift)."""
        earlier = "\n".join(" ".join(s.split()) for s in self.statements)
        return recorded in (self.checksum, hashlib.sha256(earlier.encode()).hexdigest())


@dataclass(frozen=True)
class ComponentSchema:
    component: str
    kind: str
    """core | plugin"""
    priority: int
    versions: dict[int, SchemaVersion]

    @property
    def latest(self) -> int:
        return max(self.versions, default=0)


@dataclass
class ComponentStatus:
    component: str
    kind: str
    priority: int
    current: int
    latest: int
    pending: list[int] = field(default_factory=list)
    drift: list[int] = field(default_factory=list)
    """Applied versions whose registered statements changed since."""
    unknown: list[int] = field(default_factory=list)
    """Applied versions this code does not know (the database is newer than the code)."""

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


_COMPONENT_RE = re.compile(r"^[a-z][a-z0-9_]*$")


class SchemaRegistry:
    """The components known to one process; ``REGISTRY`` is the default one."""

    def __init__(self) -> None:
        self._components: dict[str, ComponentSchema] = {}

    def register(
        self, component: str, versions: Iterable[SchemaVersion], *, kind: str = "core", priority: int = 100
    ) -> ComponentSchema:
        if not _COMPONENT_RE.match(component):
            raise ValueError(f"invalid schema component name {component!r}")
        if kind not in ("core", "plugin"):
            raise ValueError(f"schema kind must be 'core' or 'plugin', not {kind!r}")
        by_number = {v.version: v for v in versions}
        if sorted(by_number) != list(range(1, len(by_number) + 1)):
            raise ValueError(
                f"versions of {component!r} must be numbered 1..N without gaps: {sorted(by_number)}"
            )
        schema = ComponentSchema(component, kind, priority, by_number)
        self._components[component] = schema
        return schema

    def unregister(self, component: str) -> None:
        self._components.pop(component, None)

    def get(self, component: str) -> ComponentSchema:
        try:
            return self._components[component]
        except KeyError:
            raise SchemaError(
                f"no schema component {component!r} is registered",
                component=component,
                known=sorted(self._components),
            ) from None

    def components(self) -> list[ComponentSchema]:
        """In application order: priority, then name."""
        return sorted(self._components.values(), key=lambda c: (c.priority, c.component))


REGISTRY = SchemaRegistry()


def default_registry() -> SchemaRegistry:
    """The default registry with the built-in components loaded."""
    import schemas.libsql_core  # noqa: F401 - registers the core component on import

    return REGISTRY


_TRACKING = (
    """CREATE TABLE IF NOT EXISTS schema_applied (
        component TEXT NOT NULL,
        version INTEGER NOT NULL,
        checksum TEXT NOT NULL,
        applied_at TEXT NOT NULL,
        PRIMARY KEY (component, version))""",
    """CREATE TABLE IF NOT EXISTS schema_history (
        id INTEGER PRIMARY KEY,
        component TEXT NOT NULL,
        version INTEGER NOT NULL,
        action TEXT NOT NULL CHECK (action IN ('applied', 'rolled_back')),
        checksum TEXT NOT NULL,
        at TEXT NOT NULL)""",
)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _tracking_exists(conn: Connection) -> bool:
    row = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_applied'"
    ).fetchone()
    return row is not None


def _applied(conn: Connection, component: str) -> dict[int, str]:
    if not _tracking_exists(conn):
        return {}
    rows = conn.execute(
        "SELECT version, checksum FROM schema_applied WHERE component = ?", (component,)
    ).fetchall()
    return {int(v): str(c) for v, c in rows}


def _status_of(schema: ComponentSchema, applied: dict[int, str]) -> ComponentStatus:
    current = max(applied, default=0)
    return ComponentStatus(
        component=schema.component,
        kind=schema.kind,
        priority=schema.priority,
        current=current,
        latest=schema.latest,
        pending=[v for v in sorted(schema.versions) if v not in applied],
        drift=[
            v for v in sorted(applied) if v in schema.versions and not schema.versions[v].matches(applied[v])
        ],
        unknown=[v for v in sorted(applied) if v not in schema.versions],
    )


def status(conn: Connection, registry: SchemaRegistry | None = None) -> list[ComponentStatus]:
    """Per component: current and latest version, pending versions, drift. Reads only."""
    reg = registry or default_registry()
    return [_status_of(c, _applied(conn, c.component)) for c in reg.components()]


def _check(st: ComponentStatus) -> None:
    if st.drift:
        raise SchemaDrift(
            f"schema drift: component {st.component!r} version {st.drift[0]} was applied with other "
            "statements than the ones registered now; restore them or add a new version",
            component=st.component,
            version=st.drift[0],
            versions=st.drift,
        )
    if st.unknown:
        raise SchemaError(
            f"component {st.component!r} is at version {st.current} in the database but this code only "
            f"knows up to {st.latest}",
            component=st.component,
            version=st.current,
            latest=st.latest,
        )


class _Transaction:
    """BEGIN IMMEDIATE .. COMMIT, ROLLBACK on any exception."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def __enter__(self) -> Connection:
        if self.conn.in_transaction:
            raise SchemaError("schema changes need a connection with no open transaction")
        self.conn.execute("BEGIN IMMEDIATE")
        for sql in _TRACKING:
            self.conn.execute(sql)
        return self.conn

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.conn.execute("COMMIT")
        elif self.conn.in_transaction:
            self.conn.execute("ROLLBACK")


def _run(
    conn: Connection,
    schema: ComponentSchema,
    version: SchemaVersion,
    statements: tuple[str, ...],
    action: str,
) -> None:
    for index, sql in enumerate(statements):
        try:
            conn.execute(sql)
        except Exception as exc:
            verb = "applying" if action == "applied" else "rolling back"
            raise MigrationFailed(
                f"{verb} component {schema.component!r} version {version.version} ({version.name}) failed at "
                f"statement {index + 1}: {exc}",
                component=schema.component,
                version=version.version,
                statement=index + 1,
                error=str(exc),
            ) from exc
    now = _now()
    if action == "applied":
        conn.execute(
            "INSERT INTO schema_applied (component, version, checksum, applied_at) VALUES (?, ?, ?, ?)",
            (schema.component, version.version, version.checksum, now),
        )
    else:
        conn.execute(
            "DELETE FROM schema_applied WHERE component = ? AND version = ?",
            (schema.component, version.version),
        )
    conn.execute(
        "INSERT INTO schema_history (component, version, action, checksum, at) VALUES (?, ?, ?, ?, ?)",
        (schema.component, version.version, action, version.checksum, now),
    )
    log.info(f"schema.{action}", component=schema.component, version=version.version, name=version.name)


def _upgrade(conn: Connection, schema: ComponentSchema, to: int | None) -> list[int]:
    target = schema.latest if to is None else to
    if not 0 <= target <= schema.latest:
        raise SchemaError(
            f"component {schema.component!r} has versions 1..{schema.latest}, not {target}",
            component=schema.component,
            version=target,
        )
    with _Transaction(conn):
        st = _status_of(schema, _applied(conn, schema.component))
        _check(st)
        if target < st.current:
            raise SchemaError(
                f"component {schema.component!r} is at version {st.current}; use rollback to go "
                f"down to {target}",
                component=schema.component,
                version=target,
            )
        done = []
        for number in st.pending:
            if number > target:
                break
            _run(conn, schema, schema.versions[number], schema.versions[number].statements, "applied")
            done.append(number)
    return done


def up(
    conn: Connection,
    component: str | None = None,
    to: int | None = None,
    registry: SchemaRegistry | None = None,
) -> dict[str, list[int]]:
    """Applies pending versions (all components, or one up to ``to``); returns what was applied."""
    reg = registry or default_registry()
    if to is not None and component is None:
        raise SchemaError("--to needs --component: every component has its own version line")
    targets = [reg.get(component)] if component else reg.components()
    for schema in targets:  # refuse before changing anything when any component has drifted
        _check(_status_of(schema, _applied(conn, schema.component)))
    return {schema.component: _upgrade(conn, schema, to) for schema in targets}


def apply_all(conn: Connection, registry: SchemaRegistry | None = None) -> dict[str, list[int]]:
    """Brings every registered component to its latest version (what a worker calls at open)."""
    return up(conn, registry=registry)


def rollback(conn: Connection, component: str, to: int, registry: SchemaRegistry | None = None) -> list[int]:
    """Rolls ``component`` back to version ``to`` (0 removes it), newest version first, in one transaction."""
    reg = registry or default_registry()
    schema = reg.get(component)
    with _Transaction(conn):
        st = _status_of(schema, _applied(conn, component))
        if st.unknown:
            _check(st)
        if not 0 <= to <= st.current:
            raise SchemaError(
                f"component {component!r} is at version {st.current}; cannot roll back to {to}",
                component=component,
                version=to,
            )
        undone = []
        for number in sorted((v for v in _applied(conn, component) if v > to), reverse=True):
            version = schema.versions[number]
            if not version.rollback:
                raise SchemaError(
                    f"component {component!r} version {number} has no rollback statements",
                    component=component,
                    version=number,
                )
            _run(conn, schema, version, version.rollback, "rolled_back")
            undone.append(number)
    return undone


def history(conn: Connection, component: str | None = None) -> list[dict[str, Any]]:
    """Every apply and rollback, oldest first."""
    if not _tracking_exists(conn):
        return []
    sql = "SELECT component, version, action, checksum, at FROM schema_history"
    params: tuple[Any, ...] = ()
    if component:
        sql += " WHERE component = ?"
        params = (component,)
    rows = conn.execute(sql + " ORDER BY id", params).fetchall()
    return [dict(zip(("component", "version", "action", "checksum", "at"), r, strict=True)) for r in rows]
