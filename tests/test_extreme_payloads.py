"""Every topic the workers handle, fed the extreme values its contract lets through, through the real bus.

The largest and smallest integers, infinities and NaN, the longest strings, NUL, accents and emoji: each
request must be answered with a reply or a typed error naming what is wrong, never with a handler's
unexpected exception (HandlerError: a bug, and it is only given after retries); each change event must be
applied or refused by its store, and no worker may stall on one.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import msgspec.inspect as mi
import pytest

from bus.protocol import DEAD_LETTER_TOPIC
from contracts.errors import BusError, HandlerError
from contracts.registry import all_specs
from tests.workers_util import System, wait_caught_up
from workers.registry import register_contracts

WORKERS = ("lmdb", "libsql", "chroma", "duckdb")
VARIANTS = 4
TEXT = ("x", "é", "\x00", "🙂")


def extreme(t: mi.Type, variant: int) -> Any:
    """An extreme value of type ``t`` that its constraints allow; ``variant`` picks which. None: no such value."""
    if isinstance(t, mi.IntType):
        low = t.ge if t.ge is not None else t.gt + 1 if t.gt is not None else -(2**63)
        high = t.le if t.le is not None else t.lt - 1 if t.lt is not None else 2**64 - 1
        return (high, low, min(high, 2**63), max(low, min(high, 0)))[variant]
    if isinstance(t, mi.FloatType):
        high = t.le if t.le is not None else float("inf") if t.lt is None else None
        low = t.ge if t.ge is not None else float("-inf") if t.gt is None else None
        nan = float("nan") if high == float("inf") and low == float("-inf") else high
        return (high, low, nan, 1e308 if high == float("inf") else high)[variant]
    if isinstance(t, mi.StrType):
        length = t.max_length if t.max_length is not None else (100_000, 600, 1, 300)[variant]
        text = TEXT[variant] * max(length, t.min_length or 0)
        return None if t.pattern and not re.search(t.pattern, text) else text  # an id's pattern refuses most
    if isinstance(t, mi.BoolType):
        return variant % 2 == 1
    if isinstance(t, mi.LiteralType):
        return t.values[variant % len(t.values)]
    if isinstance(t, mi.UnionType):
        options = (extreme(o, variant) for o in t.types if not isinstance(o, mi.NoneType))
        return next((v for v in options if v is not None), None)
    if isinstance(t, mi.ListType | mi.SetType | mi.FrozenSetType | mi.VarTupleType):
        item = extreme(t.item_type, variant)
        return None if item is None else [item] * max(t.min_length or 0, min(t.max_length or 3, 3))
    if isinstance(t, mi.DictType):
        key = extreme(t.key_type, variant)
        if not isinstance(key, str) or (isinstance(t.key_type, mi.StrType) and t.key_type.pattern):
            key = "k" * 300
        return {key[:2000]: extreme(t.value_type, variant)}
    if isinstance(t, mi.StructType):
        return payload(t, variant)
    if isinstance(t, mi.AnyType):
        return ({"big": 2**63, "nan": float("nan"), "text": "é" * 1000}, 2**64 - 1, "\x00", [None])[variant]
    if isinstance(t, mi.DateTimeType):
        return "9999-12-31T23:59:59Z" if variant % 2 else "0001-01-01T00:00:00Z"
    return None


def payload(t: mi.StructType, variant: int) -> dict[str, Any] | None:
    out: dict[str, Any] = {}
    for f in t.fields:
        value = extreme(f.type, variant)
        if value is None and f.required:
            return None
        if value is not None:
            out[f.encode_name] = value
    return out


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Any:
    register_contracts()
    home: Path = tmp_path_factory.mktemp("extreme") / "home"
    with System(home, worker_env={"MEMBUS_EMBEDDING_MODEL": "hash"}) as s:
        for name in WORKERS:
            s.worker(name)
        yield s


def test_every_request_is_answered_with_a_reply_or_a_typed_error(system: System) -> None:
    bus = system.bus
    unexpected = []
    asked = 0
    for spec in all_specs():
        if not (spec.handled_by in WORKERS and spec.topic.endswith(".request")):
            continue
        for variant in range(VARIANTS):
            body = payload(mi.type_info(spec.payload), variant)
            if body is None:
                continue
            asked += 1
            try:
                bus.request(spec.topic, body, timeout=60.0)
            except HandlerError as exc:
                unexpected.append(f"{spec.topic} #{variant}: {exc.message}")
            except BusError as exc:
                assert exc.code != "timeout", f"{spec.topic} #{variant} was not answered"
    assert asked >= 60, "the generator stopped producing payloads"
    assert unexpected == []


def test_every_change_event_is_applied_or_refused_by_its_store_and_no_worker_stalls(system: System) -> None:
    bus = system.bus
    published = 0
    for spec in all_specs():
        if not spec.topic.endswith(".changed"):
            continue
        for variant in range(VARIANTS):
            body = payload(mi.type_info(spec.payload), variant)
            if body is None:
                continue
            try:
                bus.publish(spec.topic, body)
                published += 1
            except BusError:
                pass  # refused before the log (too large, invalid): nothing for a worker to meet
    assert published >= 10
    for name in WORKERS:
        wait_caught_up(bus, name)
        assert system.workers[name].fresh_status()["stalled"] == ""
    reasons = [m.payload["reason"] for m in bus.replay(topic=DEAD_LETTER_TOPIC)]
    assert all("store refused" in r for r in reasons), reasons  # a store's refusal, never a handler's exception
