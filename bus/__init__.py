"""membus: the broker, the durable log, the client library (sync and asyncio), the CLI."""

from bus.client import Bus, Consumer, Subscription
from bus.message import Delivery, Message
from contracts.errors import (
    BusError,
    ConnectionError,
    NotAuthorized,
    TimeoutError,
    ValidationError,
)

__all__ = [
    "Bus",
    "BusError",
    "ConnectionError",
    "Consumer",
    "Delivery",
    "Message",
    "NotAuthorized",
    "Subscription",
    "TimeoutError",
    "ValidationError",
]
