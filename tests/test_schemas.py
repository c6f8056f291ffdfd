"""The schema registry against real libSQL files: up, status, rollback, drift, independent components."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import libsql
import pytest
from typer.testing import CliRunner

from schemas import registry as reg
from schemas.cli import app
from schemas.libsql_core import CORE
from schemas.registry import MigrationFailed, SchemaDrift, SchemaError, SchemaRegistry, SchemaVersion
from workers.libsql import connect

NOTES_V1 = SchemaVersion(
    1, "notes", ("CREATE TABLE notes (id TEXT PRIMARY KEY, body TEXT NOT NULL)",), ("DROP TABLE notes",)
)
NOTES_V2 = SchemaVersion(
    2,
    "note tags",
    (
        "ALTER TABLE notes ADD COLUMN tags TEXT NOT NULL DEFAULT '[]'",
        "CREATE INDEX idx_notes_tags ON notes(tags)",
    ),
    ("DROP INDEX idx_notes_tags", "ALTER TABLE notes DROP COLUMN tags"),
)


def make_registry(*notes_versions: SchemaVersion) -> SchemaRegistry:
    r = SchemaRegistry()
    r.register("core", CORE.versions.values(), kind="core", priority=1)
    r.register("notes", notes_versions or (NOTES_V1, NOTES_V2), kind="plugin", priority=50)
    return r


@pytest.fixture(params=["default", "explicit"])
def conn(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """libsql's default (implicit transactions) and explicit-transaction connections both work."""
    path = str(tmp_path / "membus.db")
    c = libsql.connect(path) if request.param == "default" else libsql.connect(path, isolation_level=None)
    yield c
    c.close()


def tables(conn: Any) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()}


def columns(conn: Any, table: str) -> set[str]:
    return {r[1] for r in conn.execute(f"PRAGMA table_info({table})").fetchall()}


def by_name(statuses: list[reg.ComponentStatus]) -> dict[str, reg.ComponentStatus]:
    return {s.component: s for s in statuses}


def test_up_applies_every_component_in_priority_order_and_status_reports_it(conn: Any) -> None:
    r = make_registry()
    before = by_name(reg.status(conn, r))
    assert (before["core"].current, before["core"].pending) == (0, [1, 2, 3])
    assert (before["notes"].current, before["notes"].pending) == (0, [1, 2])

    applied = reg.apply_all(conn, r)

    assert applied == {"core": [1, 2, 3], "notes": [1, 2]}
    assert list(applied) == ["core", "notes"]  # priority order
    assert {"users", "messages", "semantic_facts", "messages_fts", "notes"} <= tables(conn)
    assert "tags" in columns(conn, "notes")
    after = by_name(reg.status(conn, r))
    assert (after["core"].current, after["core"].latest, after["core"].pending) == (3, 3, [])
    assert (after["notes"].current, after["notes"].pending, after["notes"].drift) == (2, [], [])
    assert not conn.in_transaction
    assert reg.apply_all(conn, r) == {"core": [], "notes": []}  # nothing left to do


def test_up_to_a_version_of_one_component(conn: Any) -> None:
    r = make_registry()
    assert reg.up(conn, component="notes", to=1, registry=r) == {"notes": [1]}
    st = by_name(reg.status(conn, r))
    assert (st["notes"].current, st["notes"].pending) == (1, [2])
    assert st["core"].current == 0
    assert "notes" in tables(conn) and "tags" not in columns(conn, "notes")
    with pytest.raises(SchemaError, match="--to needs --component"):
        reg.up(conn, to=1, registry=r)


def test_rollback_one_component_leaves_the_other_untouched(conn: Any) -> None:
    r = make_registry()
    reg.apply_all(conn, r)
    conn.execute("INSERT INTO users (id, name, created_at, updated_at) VALUES ('u1', 'Ana', 't', 't')")
    conn.commit()

    assert reg.rollback(conn, "notes", 0, registry=r) == [2, 1]

    assert "notes" not in tables(conn)
    st = by_name(reg.status(conn, r))
    assert (st["notes"].current, st["notes"].pending) == (0, [1, 2])
    assert (st["core"].current, st["core"].pending) == (3, [])
    assert conn.execute("SELECT name FROM users").fetchall() == [("Ana",)]


def test_rollback_core_to_a_version_then_up_again(conn: Any) -> None:
    r = make_registry()
    reg.apply_all(conn, r)
    assert reg.rollback(conn, "core", 1, registry=r) == [3, 2]
    assert "semantic_facts" not in tables(conn) and "messages_fts" not in tables(conn)
    assert "messages" in tables(conn)
    assert reg.up(conn, component="core", registry=r) == {"core": [2, 3]}
    assert "semantic_facts" in tables(conn)
    with pytest.raises(SchemaError, match="cannot roll back to 7"):
        reg.rollback(conn, "core", 7, registry=r)


def test_history_records_applies_and_rollbacks_with_checksums(conn: Any) -> None:
    r = make_registry()
    reg.apply_all(conn, r)
    reg.rollback(conn, "notes", 1, registry=r)

    rows = reg.history(conn, "notes")

    assert [(h["version"], h["action"]) for h in rows] == [(1, "applied"), (2, "applied"), (2, "rolled_back")]
    assert rows[0]["checksum"] == NOTES_V1.checksum and rows[2]["checksum"] == NOTES_V2.checksum
    assert all(h["at"].endswith("Z") for h in rows)
    assert len(reg.history(conn)) == 3 + 3  # core's three applies are in the same table


def test_changed_statements_of_an_applied_version_are_drift(conn: Any) -> None:
    reg.apply_all(conn, make_registry())
    edited = SchemaVersion(
        2,
        "note tags",
        (
            "ALTER TABLE notes ADD COLUMN tags TEXT NOT NULL DEFAULT '{}'",
            "CREATE INDEX idx_notes_tags ON notes(tags)",
        ),
        NOTES_V2.rollback,
    )
    v3 = SchemaVersion(3, "more", ("CREATE TABLE more_notes (id TEXT)",), ("DROP TABLE more_notes",))
    drifted = make_registry(NOTES_V1, edited, v3)

    st = by_name(reg.status(conn, drifted))
    assert st["notes"].drift == [2] and st["core"].drift == []

    with pytest.raises(SchemaDrift) as caught:
        reg.apply_all(conn, drifted)
    assert caught.value.fields["component"] == "notes" and caught.value.fields["version"] == 2
    assert "'notes' version 2" in caught.value.message
    assert "more_notes" not in tables(conn)  # refused before changing anything
    assert not conn.in_transaction


def test_reformatting_a_statement_is_not_drift(conn: Any) -> None:
    reg.apply_all(conn, make_registry())
    spaced = SchemaVersion(
        1,
        "notes",
        ("CREATE TABLE notes (\n    id TEXT PRIMARY KEY,\n    body TEXT NOT NULL)",),
        NOTES_V1.rollback,
    )
    assert by_name(reg.status(conn, make_registry(spaced, NOTES_V2)))["notes"].drift == []


def test_a_failing_statement_rolls_back_the_whole_version(conn: Any) -> None:
    broken = SchemaVersion(
        2, "broken", ("CREATE TABLE half (id TEXT)", "CREATE TABLE oops ("), ("DROP TABLE half",)
    )
    r = make_registry(NOTES_V1, broken)
    with pytest.raises(MigrationFailed) as caught:
        reg.apply_all(conn, r)
    assert caught.value.fields["component"] == "notes" and caught.value.fields["version"] == 2
    assert caught.value.fields["statement"] == 2
    assert "half" not in tables(conn)
    st = by_name(reg.status(conn, r))
    assert st["notes"].current == 0  # the component's transaction held version 1 too
    assert st["core"].current == 3  # core migrated in its own, earlier transaction
    assert not conn.in_transaction


def test_a_database_newer_than_the_code_is_refused(conn: Any) -> None:
    reg.apply_all(conn, make_registry())
    older_code = make_registry(NOTES_V1)
    assert by_name(reg.status(conn, older_code))["notes"].unknown == [2]
    with pytest.raises(SchemaError, match="only knows up to 1"):
        reg.apply_all(conn, older_code)


def test_register_rejects_gaps_in_version_numbers() -> None:
    with pytest.raises(ValueError, match="without gaps"):
        SchemaRegistry().register("notes", [NOTES_V2])


def test_cli_status_up_rollback(tmp_path: Path) -> None:
    db = tmp_path / "data" / "membus.db"
    runner = CliRunner()

    result = runner.invoke(app, ["up", "--db", str(db), "--component", "core", "--to", "2"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["status", "--db", str(db), "--json"])
    assert result.exit_code == 0, result.output
    core = next(s for s in json.loads(result.stdout) if s["component"] == "core")
    assert (core["current"], core["pending"]) == (2, [3])

    result = runner.invoke(app, ["rollback", "--component", "core", "--to", "1"], obj={"db_path": db}, input="n\n")
    assert result.exit_code == 1 and "rebuild libsql" in result.output  # asked first: nothing done
    result = runner.invoke(app, ["rollback", "--component", "core", "--to", "1"], obj={"db_path": db}, input="y\n")
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["rollback", "--component", "core", "--to", "9", "--yes"], obj={"db_path": db})
    assert result.exit_code == 1
    result = runner.invoke(app, ["status", "--json"], obj={"db_path": db, "encryption_key": None})
    assert next(s for s in json.loads(result.stdout) if s["component"] == "core")["current"] == 1
    assert runner.invoke(app, ["status", "--db", str(tmp_path / "missing.db")]).exit_code == 2


def test_cli_rollback_refuses_while_a_worker_holds_the_store_and_driver_errors_are_named(tmp_path: Path) -> None:
    """A rollback under a running worker crashed it and dropped its data for good; a store that is not a
    database, or one locked too long, was a traceback."""
    db = tmp_path / "membus.db"
    runner = CliRunner()
    assert runner.invoke(app, ["up", "--db", str(db)]).exit_code == 0
    result = runner.invoke(app, ["rollback", "--component", "core", "--to", "1", "--yes"],
                           obj={"db_path": db, "running": ["worker libsql (pid 1)"]})
    assert result.exit_code == 1 and "stop membus first" in result.output
    assert next(s for s in reg.status(connect(db)) if s.component == "core").current == 3
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database at all" * 100)
    result = runner.invoke(app, ["status", "--db", str(garbage)])
    assert result.exit_code == 1 and "not a database" in result.output and result.exception is not None
    assert isinstance(result.exception, SystemExit)


def test_a_checksum_recorded_by_the_first_code_is_not_drift(conn: Any) -> None:
    """Stores made before spaces around punctuation stopped counting showed every version as drift."""
    r = SchemaRegistry()
    r.register("notes", [NOTES_V1])
    reg.apply_all(conn, r)
    earlier = hashlib.sha256("\n".join(" ".join(s.split()) for s in NOTES_V1.statements).encode()).hexdigest()
    conn.execute("UPDATE schema_applied SET checksum = ? WHERE component = 'notes'", (earlier,))
    assert by_name(reg.status(conn, r))["notes"].drift == []
    conn.execute("UPDATE schema_applied SET checksum = 'tampered' WHERE component = 'notes'")
    assert by_name(reg.status(conn, r))["notes"].drift == [1]


def test_cli_an_unknown_component_or_to_without_component_is_a_usage_error(tmp_path: Path) -> None:
    db = tmp_path / "membus.db"
    runner = CliRunner()
    for args in (["up", "--db", str(db), "--component", "nope"], ["up", "--db", str(db), "--to", "2"],
                 ["rollback", "--db", str(db), "--component", "nope", "--to", "0", "--yes"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
    assert not db.exists()
