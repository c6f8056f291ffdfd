"""The inventory read every store worker answers: one page of the ids it holds, for `membus check`.

Each worker registers its own topic (``structured.``, ``working.``, ``semantic.``, ``analytics.inventory.request``)
with the kinds it holds. A request is applied in log order like any other, so a page shows the store as it was
after every earlier message of the log it follows.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

PageSize = Annotated[int, msgspec.Meta(ge=1, le=10_000)]


class InventoryQuery(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One page of the ids the store holds of one kind, in a stable order."""

    kind: str
    cursor: str = ""
    """Where the previous page ended ("" for the first page)."""
    limit: PageSize = 5000


class InventoryItem(msgspec.Struct, array_like=True, frozen=True):
    id: str
    group: str = ""
    """The fact's user, or the message's conversation."""
    ts: float = 0.0
    """When it was written, unix seconds (0 when the store does not know)."""
    current: bool = True
    """False for a fact another one superseded."""
    has_text: bool = True
    """False when its text is blank (indexes leave such items out)."""


class InventoryPage(msgspec.Struct, kw_only=True):
    kind: str
    items: list[InventoryItem]
    cursor: str = ""
    """Pass it back for the next page; "" when this was the last one."""
    info: dict[str, float] = {}
    """Store settings a reader needs to judge the items (working memory: ttl_seconds, max_messages)."""
