"""dsm: declarative state machines in YAML, run embedded or by workers coordinated through etcd v3."""

from __future__ import annotations

from .compiler import compile_text, load
from .context import Context
from .embedded import run
from .errors import (
    AttemptAbandoned,
    DefinitionError,
    DsmError,
    HandlerError,
    InputError,
    NotFound,
    StoreError,
    StoreUnavailable,
)
from .graph import Graph

__version__ = "0.1.0"

__all__ = [
    "AttemptAbandoned", "Context", "DefinitionError", "DsmError", "Graph", "HandlerError", "InputError",
    "NotFound", "StoreError", "StoreUnavailable", "compile_text", "load", "run", "__version__",
]
