"""Contracts: envelopes and payloads round-trip; bad bytes and bad payloads get typed errors."""

from __future__ import annotations

import time

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts.catalog import load_all
from contracts.envelope import (
    DECODE_ERRORS,
    decode_batch,
    decode_envelope,
    encode_batch,
    encode_envelope,
    make_envelope,
)
from contracts.errors import UnknownTopic, ValidationError, error_from_wire
from contracts.ids import id_time_ms, new_id, new_ids
from contracts.registry import all_specs, decode_payload, encode_payload, register
from contracts.topics import check_pattern, check_topic, matches, reply_topics


class Sample(msgspec.Struct, forbid_unknown_fields=True):
    """A sample contract for these tests."""

    user_id: str
    count: int
    tags: list[str] = []


class SampleReply(msgspec.Struct):
    ok: bool


register("test.sample.request", Sample, reply=SampleReply, handled_by="tests")

topic_segment = st.from_regex(r"[a-z0-9_-]{1,12}", fullmatch=True)
topics = st.lists(topic_segment, min_size=2, max_size=5).map(".".join)
headers = st.dictionaries(st.text(max_size=20), st.text(max_size=40), max_size=4)
plain_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=30) | st.binary(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@given(topic=topics, payload=plain_values, hdrs=headers, corr=st.text(max_size=30))
@settings(max_examples=200, deadline=None)
def test_envelope_round_trips(topic: str, payload: object, hdrs: dict[str, str], corr: str) -> None:
    env = make_envelope(topic, encode_payload(topic, payload), correlation_id=corr, headers=hdrs)
    env.seq = 42
    back = decode_envelope(encode_envelope(env))
    assert back == env
    assert decode_payload(back.topic, back.payload) == payload


@given(payloads=st.lists(plain_values, min_size=1, max_size=20))
@settings(max_examples=50, deadline=None)
def test_batch_round_trips(payloads: list[object]) -> None:
    envs = [make_envelope("a.b.c", encode_payload("a.b.c", p)) for p in payloads]
    assert decode_batch(encode_batch(envs)) == envs


@given(user=st.text(max_size=20), count=st.integers(-(2**63), 2**63 - 1), tags=st.lists(st.text(max_size=10)))
@settings(max_examples=100, deadline=None)
def test_typed_contract_round_trips(user: str, count: int, tags: list[str]) -> None:
    data = encode_payload("test.sample.request", {"user_id": user, "count": count, "tags": tags})
    assert decode_payload("test.sample.request", data) == Sample(user, count, tags)


@given(junk=st.binary(max_size=200))
@settings(max_examples=300, deadline=None)
def test_arbitrary_bytes_are_rejected_with_a_typed_error(junk: bytes) -> None:
    try:
        decode_payload("test.sample.request", junk)
    except ValidationError as exc:
        assert exc.topic == "test.sample.request"
    else:  # only a valid encoding of the contract may pass
        assert isinstance(decode_payload("test.sample.request", junk), Sample)


@given(junk=st.binary(max_size=200))
@settings(max_examples=300, deadline=None)
def test_arbitrary_bytes_never_decode_as_an_envelope_by_accident(junk: bytes) -> None:
    try:
        env = decode_envelope(junk)
    except DECODE_ERRORS:
        return
    assert isinstance(env.topic, str) and isinstance(env.id, str)


def test_validation_error_names_topic_field_and_expectation() -> None:
    with pytest.raises(ValidationError) as info:
        encode_payload("test.sample.request", {"user_id": "u1", "count": "many"})
    assert info.value.topic == "test.sample.request"
    assert info.value.field == "count"
    assert "int" in info.value.expected
    with pytest.raises(ValidationError) as missing:
        decode_payload("test.sample.request", msgspec.msgpack.encode({"count": 1}))
    assert missing.value.field == "user_id"
    with pytest.raises(ValidationError) as nested:
        decode_payload("test.sample.request", msgspec.msgpack.encode({"user_id": "u", "count": 1, "tags": [1]}))
    assert nested.value.field == "tags[0]"


def test_a_bad_key_or_value_in_a_map_is_named_by_its_field() -> None:
    import contracts.semantic  # noqa: F401  (registers the semantic topics)

    for key in ("#document", "$and", ""):  # Chroma's own keys and operators, and no name at all
        with pytest.raises(ValidationError) as info:
            decode_payload("semantic.index.request", msgspec.msgpack.encode(
                {"id": "a", "text": "t", "metadata": {key: 1}}))
        assert info.value.field == "metadata" and "field 'metadata' (a key)" in info.value.message
    with pytest.raises(ValidationError) as where:
        encode_payload("memory.search.semantic.request", {"query": "q", "where": {"$or": 1}})
    assert where.value.field == "where"
    with pytest.raises(ValidationError) as value:
        encode_payload("semantic.index.request", {"id": "a", "text": "t", "metadata": {"tags": [1]}})
    assert value.value.field == "metadata[...]"
    assert decode_payload("semantic.index.request", msgspec.msgpack.encode(
        {"id": "a", "text": "t", "metadata": {"source#1": 1}})).metadata == {"source#1": 1}


def test_unknown_topic_is_typed_when_strict() -> None:
    with pytest.raises(UnknownTopic):
        decode_payload("nobody.knows.this", b"\x01", strict=True)


def test_errors_survive_the_wire() -> None:
    err = ValidationError("bad", topic="t.a.b", field="x", expected="int")
    back = error_from_wire(err.to_wire())
    assert isinstance(back, ValidationError) and back.field == "x" and back.topic == "t.a.b"
    from contracts.errors import TimeoutError as BusTimeout

    t = error_from_wire(BusTimeout("slow").to_wire())
    assert isinstance(t, TimeoutError)  # the builtin catches it too


@pytest.mark.parametrize(("pattern", "topic", "hit"), [
    ("memory.*.request", "memory.store.request", True),
    ("memory.*.request", "memory.store.complete", False),
    ("memory.*", "memory.store.request", False),
    ("memory.>", "memory.store.request", True),
    ("memory.>", "memory", False),
    (">", "a.b", True),
    ("conversation.*", "conversation.message", True),
    ("a.b.c", "a.b.c", True),
    ("a.b.c", "a.b.c.d", False),
])
def test_pattern_matching_is_by_segment_not_prefix(pattern: str, topic: str, hit: bool) -> None:
    assert matches(pattern, topic) is hit


def test_bad_topics_and_patterns_are_rejected() -> None:
    for bad in ("", "nodots", "Upper.case", "a..b", "a.b.", "a b.c"):
        with pytest.raises(ValidationError):
            check_topic(bad)
    for bad in ("a.>.b", "a.b*", ""):
        with pytest.raises(ValidationError):
            check_pattern(bad)
    assert reply_topics("memory.store.request") == ("memory.store.complete", "memory.store.failed")


def test_ids_sort_by_creation() -> None:
    ids = [new_id() for _ in range(2000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert abs(id_time_ms(ids[0]) - id_time_ms(ids[-1])) < 5000


def test_a_block_of_ids_is_what_as_many_single_ids_would_be(monkeypatch: pytest.MonkeyPatch) -> None:
    import contracts.ids as ids_module

    ms = time.time_ns() // 1_000_000 + 60_000  # a millisecond in the future: both runs stay within it

    def start_at(rand: int) -> None:  # just below a 2**20 boundary of the random part
        for name, value in (("_last_ms", ms), ("_last_rand", rand), ("_prefix", ids_module._encode_time(ms)),
                            ("_high", -1), ("_high_text", "")):
            monkeypatch.setattr(ids_module, name, value)

    start_at((5 << 20) - 4)
    block = new_ids(10) + new_ids(3)
    start_at((5 << 20) - 4)
    singles = [new_id() for _ in range(13)]
    assert block == singles and block == sorted(block) and len(set(block)) == 13
    assert new_ids(0) == []


def test_encode_many_makes_the_envelopes_of_a_pub_frame() -> None:
    from contracts.envelope import array_header, encode_many

    for n in (1, 15, 16, 70_000):
        payloads = [msgspec.msgpack.encode({"i": i}) for i in range(n)]
        envs = decode_batch(array_header(n) + encode_many("test.bulk.changed", payloads))
        assert [msgspec.msgpack.decode(e.payload) for e in envs] == [{"i": i} for i in range(n)]
        assert all(e.topic == "test.bulk.changed" and e.correlation_id == e.id and e.seq == 0 for e in envs)
        assert len({e.id for e in envs}) == n
    ids = ["01JFIXED000000000000000001", "01JFIXED000000000000000002"]
    envs = decode_batch(array_header(2) + encode_many("test.bulk.changed", [b"\x01", b"\x02"], ids))
    assert [e.id for e in envs] == ids


def test_every_topic_in_the_catalog_says_what_it_is() -> None:
    """`membus topics` is what a module author reads first: no topic may show an empty or cut description."""
    load_all()
    for spec in (s for s in all_specs() if s.payload.__module__.startswith("contracts.")):  # not tests' own
        text = spec.description.strip()
        assert len(text) > 10 and not text.endswith((":", ": .")), f"{spec.topic}: {text!r}"


@pytest.mark.parametrize(("topic", "payload", "field"), [
    ("conversation.message.append.request",
     {"conversation_id": "c1", "user_id": "u1", "role": "user", "text": "cut\x00here"}, "text"),
    ("user.create.request", {"name": "Ann", "user_type": "per\x00son"}, "user_type"),
    ("conversation.message.append.request",
     {"conversation_id": "c1\n", "user_id": "u1", "role": "user", "text": "hi"}, "conversation_id"),
    ("working.recent.request", {"conversation_id": "c1\n"}, "conversation_id"),
    ("conversation.history.request", {"conversation_id": "c1", "offset": 2**63 - 1}, "offset"),
    ("user.create.request", {"name": "Ann", "metadata": {"score": float("nan")}}, "metadata"),
    ("conversation.message.append.request", {"conversation_id": "c1", "user_id": "u1", "role": "user",
                                             "text": "hi", "metadata": {"w": [1.0, float("inf")]}}, "metadata"),
    ("user.create.request", {"name": "Ann", "metadata": {"scores": {1: 0.5}}}, "metadata"),
    ("memory.store.request", {"user_id": "u1", "text": "t", "metadata": {"raw": [b"\x01"]}}, "metadata"),
    ("analytics.sentiment.request", {"since": float("nan")}, "since"),
])
def test_what_the_structured_store_cannot_keep_is_refused_by_name(topic: str, payload: dict[str, object],
                                                                  field: str) -> None:
    """A NUL cut a text short in SQLite (every read of its conversation then failed its sealed-copy check), an id
    ending in a newline passed the control-character check, a huge offset failed inside SQLite, and NaN in
    metadata was answered as given but read back as null (an int key as a string, bytes as base64)."""
    import contracts.analytics
    import contracts.structured
    import contracts.working  # noqa: F401

    with pytest.raises(ValidationError) as info:
        encode_payload(topic, payload)
    assert (info.value.topic, info.value.field) == (topic, field), info.value.message


@pytest.mark.parametrize(("topic", "payload", "field"), [
    ("semantic.index.request", {"id": "d1", "text": "  \n"}, "text"),
    ("memory.search.semantic.request", {"query": " "}, "query"),
    ("memory.search.hybrid.request", {"query": "\t"}, "query"),
    ("memory.search.semantic.request", {"query": "x", "where": {"n": float("inf")}}, "where"),
    ("memory.search.hybrid.request", {"query": "x", "where": {"n": 2**63}}, "where"),
    ("semantic.index.request", {"id": "d1", "text": "x", "metadata": {"n": float("nan")}}, "metadata"),
])
def test_what_semantic_memory_cannot_search_is_refused_by_name(topic: str, payload: dict[str, object],
                                                               field: str) -> None:
    """A blank text was embedded and then found by every search (an empty one ranked first for "🎉"), and a
    ``where`` of inf or 2**63 failed inside Chroma ("Invalid where clause", naming no field) and was
    dead-lettered."""
    import contracts.semantic  # noqa: F401

    with pytest.raises(ValidationError) as info:
        encode_payload(topic, payload)
    assert (info.value.topic, info.value.field.split("[")[0]) == (topic, field), info.value.message
