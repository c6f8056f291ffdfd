"""The wire protocol between clients (DEALER) and the broker (ROUTER), frame by frame.

Every message is a ZeroMQ multipart message whose first frame is a command.
(The ROUTER socket adds the client's routing id in front; it is not listed.)
Bodies are MessagePack. ``ENVS`` is a MessagePack array of envelopes
(contracts/envelope.py); ``ID`` is an 8-byte big-endian request id chosen by
the client and echoed back. Nothing else in the code hard-codes frame positions.

Client -> broker
    HELLO    [HELLO, body]          body {"client": name, "inbox": str, "proto": 2}
    PUB      [PUB, ID, ENVS]        durable publish of a batch; answered by PUBACK
    SUB      [SUB, ID, body]        live subscription ID: {"patterns": [...], "from_seq": int}
    UNSUB    [UNSUB, ID]
    JOIN     [JOIN, group, body]    {"patterns": [...], "credit": int, "ack_timeout": s, "max_attempts": int,
                                     "from_seq": int (a new group's start), "position": int (see JoinBody)}
    ACK      [ACK, group, seqs]     seqs: array of int; each ack also returns one credit
    NACK     [NACK, group, items]   items: array of [seq, reason, delay_s]: redeliver (or dead-letter)
    TOUCH    [TOUCH, group]         every message in flight to this member gets a new ack deadline (it is still
                                    working on them: a worker waiting for its disk); no attempt is counted
    LEAVE    [LEAVE, group]
    REPLAY   [REPLAY, ID, body]     {"from_seq", "to_seq", "since_ns", "until_ns", "patterns",
                                     "correlation_id", "limit"}: one page, answered by REPLAYED
    STATUS   [STATUS, ID]
    PING     [PING]                 heartbeat
    REPLIES  [REPLIES, requests]    array of [request id, correlation id] (at most MAX_REPLIES_ASKED) of
                                    requests still awaiting a reply, asked after a reconnect: the logged replies
                                    to them addressed to this client's inbox come back as INBOX frames
    BYE      [BYE]

Broker -> client
    WELCOME  [WELCOME, body]        {"broker": id, "head": int, "heartbeat": s, "max_message": int, "source": str,
                                     "max_attempts": int (a group's deliveries before a dead letter, by default),
                                     "ordered_ids_from": seq (workers.apply.derived_id)}
    PUBACK   [PUBACK, ID, results]  one result per envelope, in order: seq (int), or [code, message]
    LIVE     [LIVE, ID, body]       [first, last, ENVS]: every message matching subscription ID with
                                    first <= seq <= last is in ENVS (so a gap shows as first > last seen + 1)
    DELIVER  [DELIVER, group, body] array of [attempt, envelope]
    INBOX    [INBOX, ENVS]          replies addressed to this client's inbox (envelope.recipient)
    REPLAYED [REPLAYED, ID, body]   [next_seq, done, ENVS]
    STATUSR  [STATUSR, ID, body]    the broker's status map
    PONG     [PONG, head]           heartbeat; head: 8-byte big-endian log head
    ERROR    [ERROR, ref, body]     {"code", "message", "fields"}; ref: the ID or group it answers, or b""
"""

from __future__ import annotations

import struct
from typing import Annotated, Any

import msgspec

PROTOCOL_VERSION = 2
"""2: the client reads WELCOME's ``ordered_ids_from`` (a worker of 1 derives every id in the hashed form)."""

HELLO = b"HELLO"
PUB = b"PUB"
SUB = b"SUB"
UNSUB = b"UNSUB"
JOIN = b"JOIN"
ACK = b"ACK"
NACK = b"NACK"
TOUCH = b"TOUCH"
LEAVE = b"LEAVE"
REPLAY = b"REPLAY"
STATUS = b"STATUS"
PING = b"PING"
REPLIES = b"REPLIES"
BYE = b"BYE"

WELCOME = b"WELCOME"
PUBACK = b"PUBACK"
LIVE = b"LIVE"
DELIVER = b"DELIVER"
INBOX = b"INBOX"
REPLAYED = b"REPLAYED"
STATUSR = b"STATUSR"
PONG = b"PONG"
ERROR = b"ERROR"

CLIENT_COMMANDS = {
    HELLO: 2, PUB: 3, SUB: 3, UNSUB: 2, JOIN: 3, ACK: 3, NACK: 3, TOUCH: 2, LEAVE: 2, REPLAY: 3, STATUS: 2, PING: 1,
    REPLIES: 2, BYE: 1,
}
"""Command -> the exact number of frames it has."""

DEAD_LETTER_TOPIC = "bus.deadletter"

_u64 = struct.Struct(">Q")
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()


ack_body = msgspec.msgpack.Decoder(list[int])
nack_body = msgspec.msgpack.Decoder(list[tuple[int, str, float]])
replies_body = msgspec.msgpack.Decoder(list[tuple[str, str]])

MAX_REPLIES_ASKED = 256
"""Requests one REPLIES frame may ask about: each costs the broker's loop a look at up to 256 records of its trace
(``EventLog.traced_after``), so one frame is at most ~65k records however long the traces are."""

MAX_CREDIT = 100_000
"""Deliveries one group member may hold unacknowledged: what it asks for is a bound on its queue."""
MAX_NACK_DELAY_S = 86_400.0
"""The longest a NACK may put off a redelivery (a longer or negative delay is brought within 0..this)."""
REASON_MAX = 2_000
"""Characters of a NACK's reason kept for the dead letter."""
GROUP_NAME_MAX = 128
"""Bytes of UTF-8 in a group's name (it keys the group's saved state in the log's LMDB, whose keys stop at 511)."""


class JoinBody(msgspec.Struct, kw_only=True):
    """What JOIN asks; anything outside these bounds is refused before it reaches the group's saved state."""

    patterns: list[str] = []
    credit: Annotated[int, msgspec.Meta(ge=1, le=MAX_CREDIT)] = 100
    ack_timeout: Annotated[float, msgspec.Meta(gt=0, le=7 * 86_400)] | None = None
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)] | None = None
    from_seq: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] | None = None
    """Where a new group starts (an existing group keeps its own position)."""
    position: Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)] | None = None
    """The next seq this member needs, for a member that keeps its own log position (a store worker): the group
    is moved there, and a member of the same module left by an earlier run is replaced."""


join_body = msgspec.msgpack.Decoder(JoinBody)


def max_frame(max_message: int) -> int:
    """The largest PUB frame a broker whose payloads are limited to ``max_message`` bytes takes."""
    return max(4 << 20, 2 * max_message)


def check_group_name(name: str) -> str:
    if not name or len(name.encode()) > GROUP_NAME_MAX or not name.isprintable():
        raise ValueError(f"a group name is 1 to {GROUP_NAME_MAX} bytes of printable text, not {name[:40]!r}"
                         + ("..." if len(name) > 40 else ""))
    return name


def pack_id(n: int) -> bytes:
    return _u64.pack(n)


def unpack_id(b: bytes) -> int:
    if len(b) != 8:
        raise ValueError("an id frame is 8 bytes")
    return int(_u64.unpack(b)[0])


def pack(obj: Any) -> bytes:
    return _encoder.encode(obj)


def unpack(data: bytes | memoryview) -> Any:
    return _decoder.decode(data)


def error_body(code: str, message: str, **fields: Any) -> bytes:
    return pack({"code": code, "message": message, "fields": fields})
