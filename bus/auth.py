"""ZAP authentication for the broker: CurveZMQ keys on the allow-list map to module identities."""

from __future__ import annotations

import threading
from typing import Any

import structlog
import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from bus.home import Home

log = structlog.get_logger("membus.auth")


class ModuleAuthenticator(ThreadAuthenticator):
    """Allows the keys in ``<home>/keys/modules``; the ZAP User-Id is the module's name.

    A key not on the list is refused and the refusal logged; the client sees the
    handshake fail (bus/client.py turns that into NotAuthorized instead of silence).
    """

    def __init__(self, context: zmq.Context[Any], home: Home) -> None:
        super().__init__(context)
        self.home = home
        self._lock = threading.Lock()
        self._keys: dict[bytes, str] = home.allowed_modules()
        self.rejected = 0

    def start(self) -> None:
        super().start()
        self.configure_curve_callback("*", credentials_provider=self)

    def callback(self, domain: str, key: bytes) -> bool:
        with self._lock:
            # the folder is the allow-list, read at every handshake (one per connection): a module added since
            # is let in, one whose key was deleted is not
            self._keys = self.home.allowed_modules()
            allowed = key in self._keys
            if not allowed:
                self.rejected += 1
        if allowed:
            log.debug("auth.allowed", module=self._keys[key])
        else:
            log.warning("auth.rejected", client_key=key.decode(errors="replace"),
                        reason="key not on the allow-list (keys/modules)")
        return allowed

    def allowed_names(self) -> set[str]:
        """The modules on the allow-list now (read again: the broker asks every second, to cut off a module
        whose key file was deleted, whose connection CurveZMQ would otherwise let live on)."""
        keys = self.home.allowed_modules()
        with self._lock:
            self._keys = keys
        return set(keys.values())

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self._keys.get(z85.encode(client_public_key), "unknown")
