"""``membus migrate``: status, up and rollback of the libSQL store's versioned schemas.

The database is ``--db PATH``, or ``ctx.obj["db_path"]`` set by the parent CLI (with
``ctx.obj["encryption_key"]``: bytes or None). Exit codes: 0 done, 1 a schema error
(drift, a failed migration, an impossible target), 2 bad usage, 3 ``status`` found drift.
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

from contracts.errors import BusError
from schemas import registry

app = typer.Typer(help="Versioned schemas of the libSQL store: status, up, rollback.", no_args_is_help=True)
out = Console()
err = Console(stderr=True)

DbOption = Annotated[
    Path | None, typer.Option("--db", help="The libSQL database file (default: from membus).")
]


@contextmanager
def _connection(ctx: typer.Context, db: Path | None, *, create: bool = False) -> Iterator[Any]:
    from workers.libsql import connect

    obj = ctx.obj if isinstance(ctx.obj, dict) else {}
    path = db or obj.get("db_path")
    if path is None:
        err.print("no database: pass --db PATH")
        raise typer.Exit(2)
    path = Path(path)
    if not create and not path.exists():
        err.print(f"no database at {path}")
        raise typer.Exit(2)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = connect(path, obj.get("encryption_key"))
    try:
        conn.execute("PRAGMA busy_timeout = 5000").fetchall()  # a running worker may hold the write lock
        yield conn
    except BusError as exc:
        err.print(f"[red]error:[/red] {exc.message}")
        raise typer.Exit(1) from None
    finally:
        conn.close()


@app.command()
def status(
    ctx: typer.Context,
    db: DbOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Per component: current and latest version, pending versions, drift."""
    with _connection(ctx, db) as conn:
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
) -> None:
    """Applies pending versions, one transaction per component, in priority order."""
    with _connection(ctx, db, create=True) as conn:
        applied = registry.up(conn, component=component, to=to)
    for name, versions in applied.items():
        out.print(f"{name}: applied {', '.join(map(str, versions))}" if versions else f"{name}: up to date")


@app.command()
def rollback(
    ctx: typer.Context,
    component: Annotated[str, typer.Option("--component", help="The component to roll back.")],
    to: Annotated[int, typer.Option("--to", help="The version to go back to (0 removes it).")],
    db: DbOption = None,
) -> None:
    """Runs the rollback statements of every version above --to, newest first, in one transaction."""
    with _connection(ctx, db) as conn:
        undone = registry.rollback(conn, component, to)
    out.print(
        f"{component}: rolled back {', '.join(map(str, undone))}" if undone else f"{component}: nothing to do"
    )
