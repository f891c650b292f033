"""dsm: declarative state machines in YAML, run embedded or by workers coordinated through etcd v3.

The names below are imported on first use, so that importing one submodule (a handler process
imports `dsm.worker.isolation` and little else) does not load the compiler, its schema and Jinja.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client import AsyncClient, Client
    from .compiler import compile_text, load
    from .context import Context
    from .embedded import run
    from .errors import (
        AccessDenied,
        AttemptAbandoned,
        DefinitionError,
        DsmError,
        HandlerError,
        InputError,
        InstanceExists,
        InvalidSignal,
        NotFound,
        ScheduleExists,
        StoreError,
        StoreUnavailable,
        Timeout,
    )
    from .graph import Graph

from .version import __version__

_ERRORS = ("AccessDenied", "AttemptAbandoned", "DefinitionError", "DsmError", "HandlerError", "InputError",
           "InstanceExists", "InvalidSignal", "NotFound", "ScheduleExists", "StoreError", "StoreUnavailable", "Timeout")
_WHERE = {"AsyncClient": "client", "Client": "client", "compile_text": "compiler", "load": "compiler",
          "Context": "context", "run": "embedded", "Graph": "graph", **{name: "errors" for name in _ERRORS}}

__all__ = [
    "AccessDenied", "AsyncClient", "AttemptAbandoned", "Client", "Context", "DefinitionError", "DsmError", "Graph",
    "HandlerError", "InputError", "InstanceExists", "InvalidSignal", "NotFound", "ScheduleExists", "StoreError",
    "StoreUnavailable", "Timeout", "compile_text", "load", "run", "__version__",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'dsm' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
