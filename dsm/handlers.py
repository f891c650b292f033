"""Finding tick handlers by dotted path, under an allowlist of modules a worker may import.

Importing a handler module runs its code: `dsm validate`, `graph`, `submit` and `run` do it for
the modules a definition names (`--no-import` skips it), with the definition's folder first on the
import path, as the contract says. Only while they are imported: a folder left at the front of
`sys.path` would, for the rest of the process, hide any module of the standard library, of the
installed packages or of another definition that has a file of the same name there (a `json.py`
beside a YAML becoming `json` for dsm itself). So the folders go in for the import and out again,
a file that would hide an installed module is refused (and never left in `sys.modules`), and two
definitions with a `handlers.py` each get their own.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.machinery import PathFinder
from pathlib import Path

from .graph import Handler

_IMPORT_LOCK = threading.RLock()
_FROM_FOLDER: dict[str, str] = {}  # top-level module -> the definition folder it was imported from
_REFUSED_MODULES = frozenset({"builtins", "__main__", "__builtin__"})


class HandlerImportError(Exception):
    """A handler reference cannot be resolved; the message says why and is shown at the tick line."""


class ModuleImportError(HandlerImportError):
    """The handler's module itself cannot be imported: every handler of `module` fails the same way."""

    def __init__(self, module: str, message: str):
        self.module = module
        super().__init__(message)


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


@contextmanager
def _import_path(folders: Iterable[str | Path]) -> Iterator[tuple[str, ...]]:
    """The folders first on sys.path for the time of one import, under the import lock."""
    resolved = tuple(dict.fromkeys(str(Path(f).resolve()) for f in folders))
    with _IMPORT_LOCK:
        sys.path[:0] = resolved
        try:
            yield resolved
        finally:
            for folder in resolved:  # the first occurrence is ours; one the process had stays
                if folder in sys.path:
                    sys.path.remove(folder)


def _installed(name: str, folders: tuple[str, ...]) -> str | None:
    """The module called `name` the process finds without the folders (standard library or
    installed), described, or None."""
    if name in sys.builtin_module_names or name in sys.stdlib_module_names:
        return f"the standard library module {name!r}"
    elsewhere = PathFinder.find_spec(name, [p for p in sys.path if p not in folders])
    if elsewhere is not None and elsewhere.origin is not None:
        here = PathFinder.find_spec(name, list(folders))
        if here is None or here.origin != elsewhere.origin:
            return f"the installed module {name!r} ({elsewhere.origin})"
    return None


def _own_module(name: str, folders: tuple[str, ...]) -> None:
    """Forget a module of the same name that an earlier definition's folder provided, so this
    definition imports its own (the earlier handlers keep theirs: they hold their functions)."""
    came_from = _FROM_FOLDER.get(name)
    if came_from is None or came_from in folders or PathFinder.find_spec(name, list(folders)) is None:
        return
    for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[loaded]


def _import(module_name: str, folders: tuple[str, ...]) -> object:
    """Import with the folders first. A module of those folders that has the name of one the
    process would otherwise find is refused, and never left in sys.modules."""
    top = module_name.partition(".")[0]
    here = PathFinder.find_spec(top, list(folders)) if folders else None
    if here is not None and top not in _FROM_FOLDER:
        hidden = _installed(top, folders)
        loaded = sys.modules.get(top)
        if hidden is None and loaded is not None and getattr(loaded, "__file__", None) != here.origin:
            hidden = f"the module {top!r} the process has loaded"
        if hidden:
            raise ModuleImportError(module_name, f"cannot import module {module_name!r}: {here.origin} would hide "
                                    f"{hidden}; rename it")
    _own_module(top, folders)
    before = set(sys.modules)
    module = importlib.import_module(module_name)
    for name in [m for m in sys.modules if m not in before and "." not in m]:
        origin = Path(getattr(sys.modules[name], "__file__", None) or "/")
        folder = next((f for f in folders if origin.is_relative_to(f)), None)
        if folder is None:
            continue
        hidden = _installed(name, folders)
        if hidden:  # a helper the handler module imported from the folder
            del sys.modules[name]
            raise ModuleImportError(module_name, f"cannot import module {module_name!r}: it imports {origin}, which "
                                    f"would hide {hidden}; rename it")
        _FROM_FOLDER[name] = folder
    return module


def import_module(module_name: str, *, search_path: Iterable[str | Path] = ()) -> object:
    """Import a handler module as `resolve` does (the folders first for this import only, nothing
    that would hide another module), for processes that load handlers ahead of their first call."""
    with _import_path(search_path) as folders:
        return _import(module_name, folders)


def resolve(ref: str, *, allow: Allowlist = ANY, search_path: Iterable[str | Path] = ()) -> Handler:
    """Import the module (with `search_path` first on the import path, for this import only) and
    find the callable; every failure is a HandlerImportError with a reason."""
    module_name, function = split_ref(ref)
    reason = refusal(module_name, function, allow)
    if reason:
        raise HandlerImportError(reason)
    try:
        with _import_path(search_path) as folders:
            module = _import(module_name, folders)
    except HandlerImportError:
        raise
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        raise ModuleImportError(module_name, f"cannot import module {module_name!r}: no module named "
                                f"{missing!r}") from None
    except SyntaxError as exc:
        raise ModuleImportError(module_name, f"cannot import module {module_name!r}: syntax error at "
                                f"{_where(exc)}: {exc.msg}") from None
    except Exception as exc:  # an import may raise anything; the user needs its name and message
        raise ModuleImportError(module_name, f"cannot import module {module_name!r}: {type(exc).__name__}: "
                                f"{exc}") from None
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
    is_async = inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(type(func).__call__)
    return Handler(ref=ref, module=module_name, function=function, func=func, is_async=is_async)


def _where(exc: SyntaxError) -> str:
    """file:line:col of a syntax error, in the file that has it (the handler module, or one it imports)."""
    where = f"{exc.filename or '<unknown>'}:{exc.lineno}"
    return f"{where}:{exc.offset}" if exc.offset else where


def unresolved(ref: str) -> Handler:
    """A handler known by name only (validate --no-import, clients that never run ticks)."""
    module, function = split_ref(ref)
    return Handler(ref=ref, module=module, function=function)
