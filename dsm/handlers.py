"""Finding tick handlers by dotted path, under an allowlist of modules a worker may import."""

from __future__ import annotations

import difflib
import importlib
import inspect
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .graph import Handler

_IMPORT_LOCK = threading.Lock()
_REFUSED_MODULES = frozenset({"builtins", "__main__", "__builtin__"})


class HandlerImportError(Exception):
    """A handler reference cannot be resolved; the message says why and is shown at the tick line."""


def split_ref(ref: str) -> tuple[str, str]:
    """'pkg.mod:fn' or 'pkg.mod.fn' -> ('pkg.mod', 'fn')."""
    if ":" in ref:
        module, _, function = ref.partition(":")
    else:
        module, _, function = ref.rpartition(".")
    if not module or not function:
        raise HandlerImportError(f"handler {ref!r} must be written module:function or module.function")
    return module, function


@dataclass(frozen=True, slots=True)
class Allowlist:
    """Module prefixes a worker may import handlers from; `None` prefixes admit any public module.

    A prefix admits the functions defined in its modules, never names imported into them (`from
    subprocess import run` must not make `mymodule:run` a handler). `functions` lists references
    admitted one by one, `module:function`, imported names included: what a user allows by name.
    """

    prefixes: tuple[str, ...] | None = None
    functions: tuple[str, ...] = ()

    @classmethod
    def of(cls, entries: Iterable[str]) -> Allowlist:
        """From --allow entries: `pkg.mod` is a prefix, `pkg.mod:function` one reference."""
        entries = tuple(entries)
        return cls(tuple(e for e in entries if ":" not in e), tuple(e for e in entries if ":" in e))

    def admits(self, module: str) -> bool:
        """Whether the module may be imported at all (for some of its functions, at least)."""
        return self.admits_module_wide(module) or any(f.partition(":")[0] == module for f in self.functions)

    def admits_module_wide(self, module: str) -> bool:
        if self.prefixes is None:
            return True
        return any(module == p or module.startswith(p + ".") for p in self.prefixes)

    def admits_function(self, module: str, function: str) -> bool:
        """Whether this exact reference is allowed by name (which also admits imported names)."""
        return f"{module}:{function}" in self.functions

    def describe(self) -> str:
        if self.prefixes is None:
            return "any module" + (f", and {', '.join(self.functions)}" if self.functions else "")
        entries = self.prefixes + self.functions
        return ", ".join(entries) if entries else "no module (give --allow or definition files)"


ANY = Allowlist(None)


def refusal(module: str, function: str, allow: Allowlist) -> str | None:
    """Why a handler may not be imported at all, or None when it may."""
    if module in _REFUSED_MODULES:
        return f"module {module!r} is never allowed as a handler module"
    parts = module.split(".") + [function]
    private = [p for p in parts if p.startswith("_")]
    if private:
        return f"private name {private[0]!r} is not allowed in a handler reference"
    if not allow.admits_module_wide(module) and not allow.admits_function(module, function):
        if allow.admits(module):
            return f"handler {module}:{function} is not in the worker's allowlist ({allow.describe()})"
        return f"module {module!r} is not in the worker's allowlist ({allow.describe()})"
    return None


def add_search_path(folders: Iterable[str | Path]) -> None:
    """Put folders first on sys.path (definition folders, --path), once each."""
    for folder in reversed([str(Path(f).resolve()) for f in folders]):
        if folder in sys.path:
            sys.path.remove(folder)
        sys.path.insert(0, folder)


def resolve(ref: str, *, allow: Allowlist = ANY) -> Handler:
    """Import the module and find the callable; every failure is a HandlerImportError with a reason."""
    module_name, function = split_ref(ref)
    reason = refusal(module_name, function, allow)
    if reason:
        raise HandlerImportError(reason)
    try:
        with _IMPORT_LOCK:
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        raise HandlerImportError(f"cannot import module {module_name!r}: no module named {missing!r}") from None
    except SyntaxError as exc:
        where = f"{Path(exc.filename or module_name).name}:{exc.lineno}"
        raise HandlerImportError(f"cannot import module {module_name!r}: syntax error at {where}: {exc.msg}") from None
    except Exception as exc:  # an import may raise anything; the user needs its name and message
        raise HandlerImportError(f"cannot import module {module_name!r}: {type(exc).__name__}: {exc}") from None
    func = getattr(module, function, None)
    if func is None:
        names = [n for n in dir(module) if not n.startswith("_")]
        hint = difflib.get_close_matches(function, names, n=1)
        suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise HandlerImportError(f"module {module_name!r} has no attribute {function!r}{suggestion}")
    if inspect.isclass(func) or not callable(func):
        raise HandlerImportError(f"{module_name}.{function} is not a function (it is {type(func).__name__})")
    home = getattr(func, "__module__", None)
    if home != module_name and not allow.admits_function(module_name, function):
        where = f"defined in {home!r}" if home else "not defined in any module"
        raise HandlerImportError(f"{module_name}:{function} is {where} and only imported into {module_name!r}; "
                                 f"a handler must be defined in the module it is named by (name it where it is "
                                 f"defined, or allow this one reference with --allow {module_name}:{function})")
    is_async = inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(getattr(func, "__call__", None))
    return Handler(ref=ref, module=module_name, function=function, func=func, is_async=is_async)


def unresolved(ref: str) -> Handler:
    """A handler known by name only (validate --no-import, clients that never run ticks)."""
    module, function = split_ref(ref)
    return Handler(ref=ref, module=module, function=function)
