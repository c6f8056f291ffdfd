"""Every payload contract of the project, loaded together.

A process that decodes messages (every worker, the CLI, the tests) loads the whole catalog first, so a
topic is decoded against the same contract whichever modules happen to be imported.
"""

from __future__ import annotations

import importlib

MODULES = ("contracts.structured", "contracts.working", "contracts.semantic", "contracts.analytics")


def load_all() -> None:
    for name in MODULES:
        importlib.import_module(name)
