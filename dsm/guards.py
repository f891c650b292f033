"""Guards: Jinja2 expressions over the payload, evaluated in a sandbox with bounded cost.

A definition may come from someone who cannot choose the worker's handler modules, so a guard is
the one piece of a definition that runs inside a worker. It sees `payload`, `instance` and
`state` and nothing else of the process: no globals, no underscore attributes (Jinja's sandbox),
no mutation of the payload (the immutable sandbox), and no operation that could build a huge
value from a short expression (repetition, padding, exponentiation and %-formatting are capped).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from jinja2 import StrictUndefined, TemplateSyntaxError, nodes
from jinja2.exceptions import SecurityError, TemplateError, UndefinedError
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

NAMES = frozenset({"payload", "instance", "state"})
MAX_SIZE = 100_000  # items or characters one guard operation may create
_PADDING = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs", "format", "format_map"})
_RISKY_FILTERS = ("format", "center", "indent", "wordwrap", "filesizeformat", "urlize", "xmlattr", "tojson")


class GuardError(Exception):
    """A guard could not be compiled or evaluated; the message says why."""


def _sized(value: Any) -> int:
    try:
        return len(value)
    except TypeError:
        return 1


class _Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
        if op == "**":
            if isinstance(right, (int, float)) and not isinstance(right, bool) and abs(right) > 256:
                raise SecurityError("exponent too large in a guard")
            if isinstance(left, (int, float)) and abs(left) > 2**64 and right > 1:
                raise SecurityError("power of a huge number in a guard")
        elif op == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(count, int) and _sized(seq) * count > MAX_SIZE:
                    raise SecurityError(f"a guard may not build values longer than {MAX_SIZE}")
        elif op == "%" and isinstance(left, str):
            raise SecurityError("%-formatting of strings is not allowed in guards")
        elif op == "+" and isinstance(left, (str, list)) and _sized(left) + _sized(right) > 4 * MAX_SIZE:
            raise SecurityError(f"a guard may not build values longer than {4 * MAX_SIZE}")
        return super().call_binop(context, op, left, right)

    def call(self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        name = getattr(__obj, "__name__", "")
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str) and name in _PADDING:
            raise SecurityError(f"str.{name}() is not allowed in guards")
        return super().call(__context, __obj, *args, **kwargs)


def _environment() -> _Sandbox:
    env = _Sandbox(undefined=StrictUndefined, autoescape=False)
    env.globals.clear()
    for name in _RISKY_FILTERS:
        env.filters.pop(name, None)
    return env


_ENV = _environment()


def _missing_key_hint(source: str, error: UndefinedError) -> str:
    """For a guard that read a key the payload lacks: how to write it so a missing key is false."""
    key = str(error).partition("has no attribute '")[2].rstrip("'")
    try:
        tree = Parser(_ENV, source, state="variable").parse_expression()
    except TemplateSyntaxError:
        return ""
    for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
        if isinstance(node, nodes.Getattr):
            name = node.attr
        elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
            name = node.arg.value
        else:
            continue
        path = _path_text(node) if key and name == key else None
        if path:
            return f"; to allow a missing key, test it first: {path} is defined and ..."
    return ""


def _path_text(node: nodes.Node) -> str | None:
    """`payload.order['total']` back as text, for paths of names, attributes and constant keys."""
    if isinstance(node, nodes.Name):
        return node.name
    if isinstance(node, nodes.Getattr):
        base = _path_text(node.node)
        return f"{base}.{node.attr}" if base else None
    if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
        base = _path_text(node.node)
        return f"{base}[{node.arg.value!r}]" if base else None
    return None


@dataclass(frozen=True, slots=True)
class Guard:
    """A compiled guard expression; evaluating it never reaches outside its three names."""

    source: str
    _fn: Callable[..., Any] = field(repr=False, compare=False)

    def __call__(self, payload: dict, instance: dict, state: str) -> bool:
        try:
            value = self._fn(payload=payload, instance=instance, state=state)
            return bool(value)
        except SecurityError as exc:
            raise GuardError(f"guard {self.source!r} refused: {exc}") from None
        except UndefinedError as exc:
            raise GuardError(f"guard {self.source!r}: {exc}{_missing_key_hint(self.source, exc)}") from None
        except (TemplateError, TypeError, ValueError, ArithmeticError, LookupError, AttributeError) as exc:
            raise GuardError(f"guard {self.source!r}: {type(exc).__name__}: {exc}") from None
        except (MemoryError, RecursionError, OverflowError) as exc:
            raise GuardError(f"guard {self.source!r} exceeded its bounds: {type(exc).__name__}") from None


def compile_guard(source: str) -> Guard:
    """Compile an expression; unknown names and syntax errors raise GuardError at compile time."""
    try:
        parser = Parser(_ENV, source, state="variable")
        tree = parser.parse_expression()
        if not parser.stream.eos:
            parser.fail(f"unexpected {parser.stream.current.value!r} after the expression")
        expression = _ENV.compile_expression(source, undefined_to_none=False)
    except TemplateSyntaxError as exc:
        raise GuardError(f"guard {source!r} does not compile: {exc.message}") from None
    except (MemoryError, RecursionError):
        raise GuardError(f"guard {source!r} is too complex") from None
    unknown = sorted({n.name for n in tree.find_all(nodes.Name)} - NAMES)
    if unknown:
        names = ", ".join(repr(n) for n in unknown)
        raise GuardError(f"guard {source!r} uses unknown name {names}; guards see payload, instance and state")
    return Guard(source, expression)

