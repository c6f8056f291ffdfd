"""``membus migrate``: status, up and rollback of the libSQL store's versioned schemas.

The database is ``--db PATH``, or ``ctx.obj["db_path"]`` set by the parent CLI (with
``ctx.obj["encryption_key"]``: bytes or None). Exit codes: 0 done, 1 a schema error
(drift, a failed migration, an impossible target), 2 bad usage, 3 ``status`` found drift, 4 the store's key
could not be unlocked.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from contracts.errors import BusError, NotAuthorized
from schemas import registry

app = typer.Typer(help="Versioned schemas of the libSQL store: status, up, rollback.", no_args_is_help=True)
out = Console()
err = Console(stderr=True)

DbOption = Annotated[
    Path | None, typer.Option("--db", help="The libSQL database file (default: from membus).")
]
HomeOption = Annotated[Path | None, typer.Option("--home", help="The membus home folder (default: from membus).")]


def _target(ctx: typer.Context, home: Path | None = None) -> dict[str, Any]:
    """What the parent CLI says of the store: ``db_path``, ``encryption_key`` (bytes, None, or a callable giving
    them), ``running`` (processes holding it). With ``open_home`` it says so for the home given here (``--home``
    after the command) or before it."""
    obj = ctx.obj if isinstance(ctx.obj, dict) else {}
    opener = obj.get("open_home")
    target: dict[str, Any] = opener(home or obj.get("home")) if callable(opener) else obj
    return target


@contextmanager
def _connection(ctx: typer.Context, db: Path | None, home: Path | None = None, *,
                create: bool = False) -> Iterator[Any]:
    from workers.libsql import connect

    obj = _target(ctx, home) if db is None else {}
    path = db or obj.get("db_path")
    if path is None:
        err.print("no database: pass --db PATH")
        raise typer.Exit(2)
    path = Path(path)
    if not create and not path.exists():
        err.print(f"no database at {path}")
        raise typer.Exit(2)
    key = obj.get("encryption_key")
    try:
        if callable(key):  # unlocking may ask for the passphrase: only once a command really runs
            key = key()
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = connect(path, key)
    except (BusError, ValueError) as exc:
        _refuse(path, exc)
    try:
        conn.execute("PRAGMA busy_timeout = 5000").fetchall()  # a running worker may hold the write lock
        yield conn
    except (BusError, ValueError) as exc:  # libsql raises ValueError for "file is not a database", "locked"
        _refuse(path, exc)
    finally:
        conn.close()


def _known_component(component: str | None) -> None:
    names = [c.component for c in registry.default_registry().components()]
    if component is not None and component not in names:
        raise typer.BadParameter(f"unknown component {component!r}; known: {', '.join(names)}",
                                 param_hint="--component")


def _refuse(path: Path, exc: Exception) -> None:
    message = exc.message if isinstance(exc, BusError) else f"{path}: {exc}"
    err.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(4 if isinstance(exc, NotAuthorized) else 1) from None  # 4: as every membus command


@app.command()
def status(
    ctx: typer.Context,
    db: DbOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    home: HomeOption = None,
) -> None:
    """Per component: current and latest version, pending versions, drift."""
    with _connection(ctx, db, home) as conn:
        rows = registry.status(conn)
    if as_json:
        out.print_json(json.dumps([r.as_dict() for r in rows]))
    else:
        table = Table("component", "kind", "current", "latest", "pending", "drift")
        for r in rows:
            drift = f"[red]{', '.join(map(str, r.drift))}[/red]" if r.drift else ""
            table.add_row(
                r.component, r.kind, str(r.current), str(r.latest), ", ".join(map(str, r.pending)), drift
            )
        out.print(table)
    if any(r.drift or r.unknown for r in rows):
        raise typer.Exit(3)


@app.command()
def up(
    ctx: typer.Context,
    db: DbOption = None,
    component: Annotated[str | None, typer.Option("--component", help="Only this component.")] = None,
    to: Annotated[int | None, typer.Option("--to", help="Stop at this version (needs --component).")] = None,
    home: HomeOption = None,
) -> None:
    """Applies pending versions, one transaction per component, in priority order."""
    if to is not None and component is None:
        raise typer.BadParameter("--to needs --component: every component has its own version line")
    _known_component(component)
    with _connection(ctx, db, home, create=True) as conn:
        applied = registry.up(conn, component=component, to=to)
    for name, versions in applied.items():
        out.print(f"{name}: applied {', '.join(map(str, versions))}" if versions else f"{name}: up to date")


@app.command()
def rollback(
    ctx: typer.Context,
    component: Annotated[str, typer.Option("--component", help="The component to roll back.")],
    to: Annotated[int, typer.Option("--to", help="The version to go back to (0 removes it).")],
    db: DbOption = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    home: HomeOption = None,
) -> None:
    """Runs the rollback statements of every version above --to, newest first, in one transaction.

    What those versions' tables held is dropped with them, and a worker does not apply the log again to
    bring it back: `membus rebuild libsql` does (and brings the schema back up)."""
    _known_component(component)
    running = (_target(ctx, home) if db is None else {}).get("running") or []
    if running:
        err.print(f"[red]error:[/red] stop membus first (a worker holds this store): {', '.join(running)} running")
        raise typer.Exit(1)
    if not yes and not typer.confirm(
            f"roll {component} back to version {to}? The data its later versions' tables hold is dropped, and "
            "only `membus rebuild libsql` brings it back from the log", default=False, err=True):
        raise typer.Exit(1)
    with _connection(ctx, db, home) as conn:
        undone = registry.rollback(conn, component, to)
    out.print(
        f"{component}: rolled back {', '.join(map(str, undone))}" if undone else f"{component}: nothing to do"
    )
