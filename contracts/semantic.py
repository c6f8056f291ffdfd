"""Contracts of the semantic-memory worker (ChromaDB): search and direct indexing.

The worker also follows ``memory.fact.changed`` and ``conversation.message.changed``
(contracts in contracts/structured.py) to index what the structured store holds.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from contracts.inventory import InventoryPage, InventoryQuery
from contracts.registry import register

Collection = Literal["memory", "conversation", "all"]
"""``memory``: facts and memories; ``conversation``: conversation messages and segments."""
MetaValue = str | int | float | bool
FilterValue = (str | Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
               | Annotated[float, msgspec.Meta(ge=-1.7976931348623157e308, le=1.7976931348623157e308)] | bool)
"""A metadata value Chroma can filter on: a 64-bit integer, a finite number (its ``where`` refuses others)."""
Searchable = Annotated[str, msgspec.Meta(min_length=1, pattern=r"\S", description="more than whitespace")]
MetaKey = Annotated[str, msgspec.Meta(pattern=r"^[^#$]", max_length=256,
                                      description="not empty, and not starting with # or $ (Chroma's own keys)")]
"""A metadata field's name as Chroma can store and filter it."""
K = Annotated[int, msgspec.Meta(ge=1, le=200)]
Relevance = Annotated[float, msgspec.Meta(ge=-1.0, le=1.0)]


class SemanticSearch(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Finds the texts closest in meaning to ``query``."""

    query: Searchable
    user_id: str | None = None
    collection: Collection = "memory"
    k: K = 5
    min_relevance: Relevance = 0.0
    """Cosine similarity below which a hit is left out."""
    where: dict[MetaKey, FilterValue] = {}
    """Metadata fields that must be equal, e.g. ``{"conversation_id": "c1"}``. A fact has ``kind`` ("fact"),
    ``user_id``, ``fact_type``, ``category``, ``confidence``, ``version`` and its own metadata as ``meta_<key>``; a
    conversation message ``kind`` ("message"), ``user_id``, ``conversation_id``, ``role``, ``sentiment``; a text
    indexed by ``semantic.index.request`` its metadata as given."""


class HybridSearch(SemanticSearch, kw_only=True, forbid_unknown_fields=True):
    """Semantic and BM25 keyword search, fused with reciprocal rank fusion."""

    candidates: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 50
    """How many hits each of the two rankings contributes before fusion."""


class SearchHit(msgspec.Struct, kw_only=True):
    id: str
    collection: str
    text: str
    score: float
    """Cosine similarity (semantic) or fused RRF score (hybrid); higher is better."""
    semantic: float | None = None
    bm25: float | None = None
    metadata: dict[str, MetaValue] = {}


class SearchResult(msgspec.Struct, kw_only=True):
    hits: list[SearchHit]


class IndexText(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Indexes (or re-indexes) an arbitrary text under a caller-chosen id."""

    id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    text: Searchable
    """A blank text would be embedded all the same, and found by every search (facts and messages without
    text are left out of the index)."""
    collection: Literal["memory", "conversation"] = "memory"
    user_id: str | None = None
    metadata: dict[MetaKey, FilterValue] = {}


class RemoveText(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Removes an indexed text (no error when it is not there)."""

    id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    collection: Literal["memory", "conversation"] = "memory"


class Indexed(msgspec.Struct, kw_only=True):
    id: str
    collection: str


register("memory.search.semantic.request", SemanticSearch, reply=SearchResult, handled_by="chroma")
register("memory.search.hybrid.request", HybridSearch, reply=SearchResult, handled_by="chroma")
register("semantic.index.request", IndexText, reply=Indexed, handled_by="chroma")
register("semantic.remove.request", RemoveText, reply=Indexed, handled_by="chroma")


class SemanticInventory(InventoryQuery, kw_only=True, forbid_unknown_fields=True):
    """One page of the ids a collection holds (`membus check`)."""

    kind: Literal["memory", "conversation"]


register("semantic.inventory.request", SemanticInventory, reply=InventoryPage, handled_by="chroma")
