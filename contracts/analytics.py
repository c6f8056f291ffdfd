"""Contracts of the analytics worker (DuckDB): questions about conversations, feedback and the bus itself.

Windows are unix seconds, ``since`` inclusive and ``until`` exclusive; a missing bound is open.
Days and minutes are UTC.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from contracts.inventory import InventoryPage, InventoryQuery
from contracts.registry import register


class Window(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    since: float | None = None
    until: float | None = None

    def __post_init__(self) -> None:
        """NaN compares false with every time: the window was silently empty."""
        for name in ("since", "until"):
            if (bound := getattr(self, name)) is not None and bound != bound:
                raise ValueError(f"Object field `{name}` is NaN, not unix seconds (an infinity is an open bound)")


class MessagesPerDay(Window, kw_only=True, forbid_unknown_fields=True):
    """How many conversation messages were written each day."""

    user_id: str | None = None
    conversation_id: str | None = None
    role: str | None = None


class DayCount(msgspec.Struct, kw_only=True):
    day: str
    """ISO date, UTC."""
    messages: int


class MessagesPerDayResult(msgspec.Struct, kw_only=True):
    days: list[DayCount]


class SentimentQuery(Window, kw_only=True, forbid_unknown_fields=True):
    """The average sentiment of the messages that carry one."""

    user_id: str | None = None
    conversation_id: str | None = None


class SentimentResult(msgspec.Struct, kw_only=True):
    average: float | None
    messages: int


class LatencyQuery(Window, kw_only=True, forbid_unknown_fields=True):
    """Response times of requests, from request to ``.complete`` / ``.failed``, per topic and worker."""

    topic: str | None = None
    """A request topic (``memory.store.request``); all topics when missing."""
    percentile: Annotated[float, msgspec.Meta(gt=0.0, lt=1.0)] = 0.95


class LatencyRow(msgspec.Struct, kw_only=True):
    topic: str
    worker: str
    replies: int
    failed: int
    p50_ms: float
    percentile_ms: float
    max_ms: float


class LatencyResult(msgspec.Struct, kw_only=True):
    percentile: float
    rows: list[LatencyRow]


class ThroughputQuery(Window, kw_only=True, forbid_unknown_fields=True):
    """Messages the analytics worker saw, per topic per minute."""

    topic: str | None = None


class MinuteCount(msgspec.Struct, kw_only=True):
    topic: str
    minute: str
    """ISO timestamp of the minute's start, UTC."""
    messages: int


class ThroughputResult(msgspec.Struct, kw_only=True):
    rows: list[MinuteCount]


Table = Literal["messages", "feedback", "facts", "events"]


class ExportQuery(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Writes a table to a Parquet file in the worker's export folder, `<home>/data/duckdb/exports`."""

    table: Table
    path: Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
    """Relative to the export folder, which it may not leave; Parquet whatever its extension. A file already
    there is replaced (whole: a reader never sees half a file)."""


class ExportResult(msgspec.Struct, kw_only=True):
    path: str
    rows: int


register("analytics.messages_per_day.request", MessagesPerDay, reply=MessagesPerDayResult,
         handled_by="duckdb")
register("analytics.sentiment.request", SentimentQuery, reply=SentimentResult, handled_by="duckdb")
register("analytics.latency.request", LatencyQuery, reply=LatencyResult, handled_by="duckdb")
register("analytics.throughput.request", ThroughputQuery, reply=ThroughputResult, handled_by="duckdb")
register("analytics.export.request", ExportQuery, reply=ExportResult, handled_by="duckdb")


class AnalyticsInventory(InventoryQuery, kw_only=True, forbid_unknown_fields=True):
    """One page of the ids an analytics table holds (`membus check`)."""

    kind: Literal["messages", "feedback", "facts"]


register("analytics.inventory.request", AnalyticsInventory, reply=InventoryPage, handled_by="duckdb")
