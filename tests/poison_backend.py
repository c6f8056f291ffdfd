"""A test worker whose handler raises an unexpected error for payloads marked poison, never returns for
payloads marked hang (a store call wedged in native code), and kills its own process for payloads marked crash
(a crash in native code, an out-of-memory kill).

Run in a real worker process with ``MEMBUS_EXTRA_BACKENDS=poison=tests.poison_backend:PoisonBackend``.
It keeps its data in a real LMDB store (it is an LmdbBackend answering one extra topic), so position,
outbox and the exactly-once machinery are the production ones.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any, ClassVar

from contracts.working import ContextSet
from workers.base import Context, handles
from workers.lmdb import LmdbBackend

TOPIC = "test.poison.request"


class PoisonBackend(LmdbBackend):
    name: ClassVar[str] = "poison"
    patterns: ClassVar[tuple[str, ...]] = (TOPIC,)

    @handles(TOPIC)
    def handle(self, txn: Any, payload: Any, ctx: Context) -> dict[str, Any]:
        if payload.get("crash"):
            os.kill(os.getpid(), signal.SIGKILL)
        if payload.get("hang"):
            time.sleep(3600)
        if payload.get("poison"):
            raise RuntimeError(f"poisoned message {payload.get('n')}")
        reply = self.context_set(txn, ContextSet(session_id="poison", key=f"n{payload['n']}", value=payload["n"]),
                                 ctx)
        return {"n": payload["n"], "expires_at": reply.expires_at}
