"""Guards: Jinja2 expressions over the payload, evaluated in a sandbox with a hard budget.

A definition may come from someone who cannot choose the worker's handler modules, so a guard is
the one piece of a definition that runs inside a worker. It sees `payload`, `instance` and
`state` and nothing else of the process: no globals, no underscore attributes (Jinja's sandbox),
no mutation of the payload (the immutable sandbox).

Jinja's sandbox stops escapes, not cost: its own `str.format` wrapper builds a gigabyte from
`"{0:>1000000000}".format(1)`, and `|join`, `.replace` or `.split` multiply sizes freely. So
every operation a guard can perform passes through this module before it runs:

- operators, attribute and item access, slices, `~`, calls, filters and tests check a deadline
  (CPU time of the evaluating thread, `GuardLimits.cpu_seconds`): no guard runs long;
- an operation that can build a value bigger than its operands says how big before building it
  (padding, format widths, repetition, joins, replacements ...); one that cannot is measured
  after. No value may exceed `max_size`, and one evaluation may build at most `budget` in all;
- only the methods listed in `_METHODS` may be called and only the filters in `_filters()`
  exist, each with its cost: anything else is refused, so a Jinja upgrade cannot quietly add a
  way around the budget;
- nothing runs at compile time (Jinja's constant folding is off).

Sizes are counted as the value would print: the characters of a string; for a container the
printed length of its items, a shared item counted every time it appears, so `[[x] * 100] * 100`
costs what printing or comparing it would cost.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import update_wrapper
from types import BuiltinFunctionType, MethodType
from typing import Any

from jinja2 import StrictUndefined, Template, TemplateSyntaxError, Undefined, nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError, TemplateError, UndefinedError
from jinja2.filters import make_attrgetter
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedFormatter
from jinja2.utils import pass_environment

from . import limits
from .durations import format_duration, parse_duration

NAMES = frozenset({"payload", "instance", "state"})
MAX_SIZE = 100_000  # characters (as printed) one guard operation may build
MAX_SOURCE = 10_000  # characters of one guard expression
MAX_INT_BITS = 14_000  # about 4,200 digits: Python will not print longer integers by default
MAX_STRIP_CHARS = 1_000  # s.strip(chars) costs len(s) * len(chars)
DEFAULT_CPU_SECONDS = 0.1
CLOCK_EVERY = 16  # guard steps between looks at the CPU clock


class GuardError(Exception):
    """A guard could not be compiled or evaluated; the message says why."""


@dataclass(frozen=True, slots=True)
class GuardLimits:
    """What one evaluation of a guard may cost; going over fails the attempt with GuardError.

    CPU time of the evaluating thread, not wall time, so that a busy worker (other threads
    holding the interpreter) does not fail guards that did nothing wrong.
    """

    cpu_seconds: float = DEFAULT_CPU_SECONDS
    max_size: int = MAX_SIZE  # one value
    budget: int = 10 * MAX_SIZE  # every value one evaluation builds, together
    clock: Callable[[], float] = field(default=time.thread_time, compare=False)

    @classmethod
    def from_env(cls) -> GuardLimits:
        """DSM_GUARD_TIMEOUT (a duration, default 100ms) and DSM_GUARD_MAX_SIZE (characters)."""
        seconds = DEFAULT_CPU_SECONDS
        raw = os.environ.get("DSM_GUARD_TIMEOUT")
        if raw:
            seconds = parse_duration(raw, what="DSM_GUARD_TIMEOUT")
        size = limits.from_env("DSM_GUARD_MAX_SIZE", MAX_SIZE)
        return cls(cpu_seconds=seconds, max_size=size, budget=10 * size)


class _OutOfTime(SecurityError):
    """The evaluation passed its deadline."""


class _Budget:
    """The cost left to one evaluation: a deadline and a number of characters."""

    __slots__ = ("clock", "deadline", "left", "limits", "steps")

    def __init__(self, limits: GuardLimits):
        self.limits = limits
        self.clock = limits.clock
        self.deadline: float | None = None  # set at the first look at the clock
        self.left = limits.budget
        self.steps = 0

    def tick(self) -> None:
        # The clock is read every CLOCK_EVERY steps, not at each: reading it costs more than most
        # steps, and every step is bounded in size, so a guard overruns its deadline by a few steps
        # at most. A guard of fewer steps than that (most of them) never reads it.
        self.steps += 1
        if self.steps % CLOCK_EVERY:
            return
        now = self.clock()
        if self.deadline is None:
            self.deadline = now + self.limits.cpu_seconds
        elif now > self.deadline:
            raise _OutOfTime(f"exceeded its time budget of {format_duration(self.limits.cpu_seconds)} of CPU")

    def room(self) -> int:
        """The most one operation may still build: measuring stops counting beyond it."""
        return max(0, min(self.limits.max_size, self.left))

    def charge(self, size: int, what: str) -> None:
        if size > self.limits.max_size:
            raise SecurityError(f"{what} would build a value of more than {self.limits.max_size} characters, "
                                f"the most a guard may build")
        self.left -= size
        if self.left < 0:
            raise SecurityError(f"{what}: the guard built more than {self.limits.budget} characters in all, "
                                f"its budget")


_CURRENT: ContextVar[_Budget | None] = ContextVar("dsm_guard_budget", default=None)


def _budget() -> _Budget:
    """The running evaluation's budget, after checking its deadline: every intercepted step calls this."""
    budget = _CURRENT.get()
    if budget is None:
        raise SecurityError("guard operations run only while a guard is evaluated")
    budget.tick()
    return budget


# -- sizes ------------------------------------------------------------------------------------

def _leaf(value: Any) -> int | None:
    """Printed size of a scalar inside a container (None for containers)."""
    if isinstance(value, str):
        return len(value) + 2 if value.isascii() and value.isprintable() else 10 * len(value) + 2
    if value is None or isinstance(value, bool):
        return 5
    if isinstance(value, int):
        return value.bit_length() // 3 + 2
    if isinstance(value, float):
        return 24
    if isinstance(value, (list, tuple, dict, set, frozenset)) or type(value) in _VIEWS:
        return None
    return 64  # iterators, undefined values, methods: printed as a short name


_VIEWS: tuple[type, ...] = (type({}.keys()), type({}.values()), type({}.items()))
_DICT_ATTRIBUTES = frozenset(name for cls in dict.__mro__ for name in vars(cls))  # what getattr finds on a dict


def _children(value: Any) -> Iterator[Any]:
    if type(value) in _VIEWS:  # a view prints (roughly) as its dict would
        mapping = value.mapping
        for key in mapping:
            yield key
            yield mapping[key]
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield item
    else:
        yield from value


def _size_all(values: Any, limit: int) -> int:
    """Printed size of the values side by side (strings without quotes), at most limit + 1.

    Shared items count every time they appear, but each distinct container is walked once, and
    the walk stops as soon as the count passes `limit`: its cost is bounded by the limit, not by
    what the value would expand to.
    """
    memo: dict[int, int] = {}
    total = 0
    for value in values:
        if isinstance(value, str):
            total += len(value)
        else:
            total += _measure(value, limit - total, memo) if _leaf(value) is None else _leaf(value) or 0
        if total > limit:
            return limit + 1
    return total


def _size(value: Any, limit: int) -> int:
    return _size_all((value,), limit)


def _measure(root: Any, limit: int, memo: dict[int, int]) -> int:
    work = 0
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        key = id(node)
        if expanded:
            total = 2
            for child in _children(node):
                total += memo[id(child)] + 2
                if total > limit:
                    return limit + 1
            memo[key] = total
            continue
        if key in memo:
            continue
        leaf = _leaf(node)
        if leaf is not None:
            memo[key] = leaf
            continue
        stack.append((node, True))
        for child in _children(node):
            work += 1
            if work > limit:  # every item prints at least one character: the total is past the limit
                return limit + 1
            if id(child) not in memo:
                stack.append((child, False))
    return memo[id(root)]


def _shallow(value: Any) -> int:
    """What an operation that copies references or characters has made: one per item or character."""
    if isinstance(value, (str, list, tuple, dict, set, frozenset)):
        return len(value)
    return 0


def _pieces(value: Any) -> int:
    """A list of new strings (split and friends): the items and their characters."""
    if isinstance(value, (list, tuple)):
        return len(value) + sum(len(p) for p in value if isinstance(p, str))
    return _shallow(value)


def _free(value: Any) -> int:
    return 0


# -- methods a guard may call -------------------------------------------------------------------

Pre = Callable[[Any, tuple, dict], int]  # (owner, args, kwargs) -> size of what the call will build


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _padding(owner: Any, args: tuple, kwargs: dict) -> int:
    width = _arg(args, kwargs, 0, "width", 0)
    return max(len(owner), width) if isinstance(width, int) else 0


def _expandtabs(owner: Any, args: tuple, kwargs: dict) -> int:
    size = _arg(args, kwargs, 0, "tabsize", 8)
    return len(owner) + owner.count("\t") * max(size, 0) if isinstance(size, int) else 0


def _replacement(s: str, old: Any, new: Any, count: Any) -> int:
    if not (isinstance(old, str) and isinstance(new, str)):
        return len(s)
    times = len(s) + 1 if old == "" else s.count(old)
    if isinstance(count, int) and count >= 0:
        times = min(times, count)
    return len(s) + times * max(0, len(new) - len(old))


def _replace(owner: Any, args: tuple, kwargs: dict) -> int:
    return _replacement(owner, _arg(args, kwargs, 0, "old", None), _arg(args, kwargs, 1, "new", None),
                        _arg(args, kwargs, 2, "count", -1))


def _join(owner: Any, args: tuple, kwargs: dict) -> int:
    items = _arg(args, kwargs, 0, "iterable", ())
    if not isinstance(items, (list, tuple)):
        return 0  # str.join of anything else fails or iterates characters of an existing string
    return sum(len(i) for i in items if isinstance(i, str)) + len(owner) * max(len(items) - 1, 0)


def _translate(owner: Any, args: tuple, kwargs: dict) -> int:
    table = _arg(args, kwargs, 0, "table", None)
    values = table.values() if isinstance(table, dict) else table if isinstance(table, (list, tuple)) else ()
    longest = max((len(v) for v in values if isinstance(v, str)), default=1)
    return len(owner) * max(longest, 1)


def _strip(owner: Any, args: tuple, kwargs: dict) -> int:
    chars = _arg(args, kwargs, 0, "chars", None)
    if isinstance(chars, str) and len(chars) > MAX_STRIP_CHARS:
        raise SecurityError(f"strip() with more than {MAX_STRIP_CHARS} characters to strip is not allowed in guards")
    return 0


@dataclass(frozen=True, slots=True)
class _Rule:
    """The cost of a call: `pre` before it runs (what it will build), `post` of its result."""

    pre: Pre | None = None
    post: Callable[[Any], int] = _free


_FREE = _Rule()
_COPY = _Rule(post=_shallow)
_SPLIT = _Rule(post=_pieces)


def _rules(rule: _Rule, *names: str) -> dict[str, _Rule]:
    return dict.fromkeys(names, rule)


_METHODS: dict[type, dict[str, _Rule]] = {
    str: {
        **_rules(_FREE, "count", "endswith", "find", "index", "isalnum", "isalpha", "isascii", "isdecimal",
                 "isdigit", "isidentifier", "islower", "isnumeric", "isprintable", "isspace", "istitle", "isupper",
                 "rfind", "rindex", "startswith"),
        **_rules(_COPY, "capitalize", "casefold", "lower", "maketrans", "removeprefix", "removesuffix", "swapcase",
                 "title", "upper"),
        **_rules(_Rule(pre=_strip, post=_shallow), "strip", "lstrip", "rstrip"),
        **_rules(_SPLIT, "partition", "rpartition", "rsplit", "split", "splitlines"),
        **_rules(_Rule(pre=_padding), "center", "ljust", "rjust", "zfill"),
        "expandtabs": _Rule(pre=_expandtabs),
        "join": _Rule(pre=_join),
        "replace": _Rule(pre=_replace),
        "translate": _Rule(pre=_translate),
    },
    list: {**_rules(_FREE, "count", "index"), "copy": _COPY},
    tuple: _rules(_FREE, "count", "index"),
    dict: {**_rules(_FREE, "get", "items", "keys", "values"), "copy": _COPY},
    _VIEWS[0]: _rules(_FREE, "isdisjoint"),
    _VIEWS[2]: _rules(_FREE, "isdisjoint"),
    int: _rules(_FREE, "as_integer_ratio", "bit_count", "bit_length", "conjugate", "is_integer"),
    float: _rules(_FREE, "as_integer_ratio", "conjugate", "fromhex", "hex", "is_integer"),
}


def _rule_for(obj: Any) -> _Rule:
    """The rule of a builtin method a guard may call; SecurityError naming anything else."""
    owner = getattr(obj, "__self__", None)
    name = getattr(obj, "__name__", "?")
    kind = owner if isinstance(owner, type) else type(owner)
    if isinstance(obj, BuiltinFunctionType) and owner is not None:
        for base in kind.__mro__:
            rule = _METHODS.get(base, {}).get(name)
            if rule is not None:
                return rule
    what = f"{kind.__name__}.{name}()" if owner is not None else f"{name}()"
    raise SecurityError(f"calling {what} is not allowed in guards")


# -- the sandbox --------------------------------------------------------------------------------

class _CodeGenerator(CodeGenerator):
    """Routes the two operations Jinja's sandbox leaves to plain Python through the environment:
    slices (`x[a:b]`) and `~`, which turns its operands into strings."""

    def visit_Getitem(self, node: nodes.Getitem, frame: Frame) -> None:
        if not isinstance(node.arg, nodes.Slice):
            super().visit_Getitem(node, frame)
            return
        self.write("environment.getitem(")
        self.visit(node.node, frame)
        self.write(", slice(")
        for i, part in enumerate((node.arg.start, node.arg.stop, node.arg.step)):
            self.write(", " if i else "")
            if part is None:
                self.write("None")
            else:
                self.visit(part, frame)
        self.write("))")

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.guard_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _Formatter(SandboxedFormatter):
    """str.format for guards: each field is sized (from its value and the widths and precisions
    in its spec) before it is formatted, and the whole result may not pass the size limit."""

    def __init__(self, env: _Sandbox, budget: _Budget, literal: int):
        super().__init__(env)
        self.budget = budget
        self.total = literal

    def _account(self, size: int) -> None:
        self.total += size
        if self.total > self.budget.limits.max_size:
            raise SecurityError(f"str.format() would build a value of more than {self.budget.limits.max_size} "
                                "characters, the most a guard may build")
        self.budget.charge(size, "str.format()")

    def convert_field(self, value: Any, conversion: str | None) -> Any:
        if conversion is not None:
            self.budget.tick()
            self._account(_size(value, self.budget.room()) * (10 if conversion == "a" else 1) + 2)
        return super().convert_field(value, conversion)

    def format_field(self, value: Any, format_spec: str) -> Any:
        self.budget.tick()
        numbers = re.findall(r"\d+", format_spec)
        if any(len(n) > 9 for n in numbers):
            raise SecurityError("str.format() with a width or precision that large is not allowed in guards")
        size = _size(value, self.budget.room())
        if isinstance(value, int) and not isinstance(value, bool):
            size = max(size, value.bit_length() + 4)  # binary is the longest way to write it
        elif isinstance(value, float):
            size = max(size, 330)  # "{:f}" of 1e308
        self._account(2 * size + sum(int(n) for n in numbers))
        return super().format_field(value, format_spec)


class _Ticking(Iterator):
    """A lazy filter result (map, select, batch ...): each item taken checks the deadline."""

    __slots__ = ("_items",)

    def __init__(self, items: Iterator[Any]):
        self._items = items

    def __next__(self) -> Any:
        _budget()
        return next(self._items)


def _call_budgeted(fn: Any) -> Any:
    fn._dsm_budgeted = True
    return fn


class _Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})
    intercepted_unops = frozenset({"+", "-"})
    code_generator_class = _CodeGenerator

    def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
        budget = _budget()
        budget.charge(_binop_size(op, left, right, budget), f"{op!r}")
        result = self.binop_table[op](left, right)
        if op in ("-", "/", "//"):  # only set differences of dict views build anything here
            budget.charge(_shallow(result), f"{op!r}")
        return result

    def call_unop(self, context: Any, op: str, arg: Any) -> Any:
        _budget()
        return self.unop_table[op](arg)

    def getattr(self, obj: Any, attribute: str) -> Any:
        _budget()
        if type(obj) is dict and attribute not in _DICT_ATTRIBUTES:
            # what Jinja's getattr does for a plain dict's key, without its failed attribute lookup
            # (an exception each time): a name no dict has as an attribute can only be a key
            try:
                return obj[attribute]
            except KeyError:
                return self.undefined(obj=obj, name=attribute)
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        budget = _budget()
        value = super().getitem(obj, argument)
        if isinstance(argument, slice):
            budget.charge(_shallow(value), "a slice")
        return value

    def guard_concat(self, values: tuple[Any, ...]) -> str:
        budget = _budget()
        budget.charge(_size_all(values, budget.room()), "'~'")
        return "".join(map(str, values))

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        if not isinstance(value, (MethodType, BuiltinFunctionType)) or value.__name__ not in ("format", "format_map"):
            return None
        template = getattr(value, "__self__", None)
        if not isinstance(template, str):
            return None
        is_map = value.__name__ == "format_map"

        def wrapper(*args: Any, **kwargs: Any) -> str:
            budget = _budget()
            if is_map:
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one argument")
                kwargs = args[0]
                args = ()
            return str(_Formatter(self, budget, len(template)).vformat(str(template), args, kwargs))

        return _call_budgeted(update_wrapper(wrapper, value))

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        if isinstance(obj, Undefined) or getattr(obj, "_dsm_budgeted", False):
            return context.call(obj, *args, **kwargs)
        formatted = self.wrap_str_format(obj)  # str.format reached through |attr
        if formatted is not None:
            return formatted(*args, **kwargs)
        rule = _rule_for(obj)
        args = tuple(list(a) if isinstance(a, Iterator) else a for a in args)
        if rule.pre is not None:
            budget.charge(rule.pre(obj.__self__, args, kwargs), f"{obj.__name__}()")
        result = context.call(obj, *args, **kwargs)
        budget.charge(rule.post(result), f"{obj.__name__}()")
        return result


def _binop_size(op: str, left: Any, right: Any, budget: _Budget) -> int:
    """What a binary operation will build, checked before it runs."""
    ints = all(isinstance(v, int) for v in (left, right))
    if op == "%" and isinstance(left, str):
        raise SecurityError("%-formatting of strings is not allowed in guards")
    if op == "**" and ints and abs(left) > 1 and right > 0:
        if left.bit_length() * right > MAX_INT_BITS:
            raise SecurityError(f"a power of more than {MAX_INT_BITS} bits is not allowed in guards")
    elif op == "*" and ints:
        if left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise SecurityError(f"a product of more than {MAX_INT_BITS} bits is not allowed in guards")
    elif op == "*":
        for seq, count in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(count, int):
                if count <= 0:
                    return 0
                return _size(seq, budget.room() // count + 1) * count
    elif op == "+" and isinstance(left, (str, list, tuple)):
        return _shallow(left) + _shallow(right)
    return 0


# -- filters and tests --------------------------------------------------------------------------

_STRINGIFY = "stringify"  # the filter turns its value into a string first


def _wrap(name: str, fn: Any, *, pre: Callable[..., int] | str | None = None,
          post: Callable[[Any], int] = _free) -> Callable[..., Any]:
    """A filter or test that checks the deadline, sizes its work and keeps lazy results ticking."""
    offset = 1 if getattr(fn, "jinja_pass_arg", None) is not None else 0
    what = f"|{name}"

    def checked(*args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        if pre == _STRINGIFY:
            budget.charge(_size(args[offset], budget.room()), what)
        elif callable(pre):
            budget.charge(pre(budget, *args[offset:], **kwargs), what)
        result = fn(*args, **kwargs)
        budget.charge(post(result), what)
        if isinstance(result, Iterator) and not isinstance(result, _Ticking):
            return _Ticking(result)
        return result

    return update_wrapper(checked, fn)


def _fill_size(budget: _Budget, count: Any, fill: Any) -> int:
    if not isinstance(count, int) or count <= 0:
        return 0
    each = 2 if fill is None else _size(fill, budget.room() // count + 1) + 4
    return count * each


def _batch_size(budget: _Budget, value: Any, linecount: Any = 0, fill_with: Any = None) -> int:
    return _fill_size(budget, linecount, fill_with) if fill_with is not None else 0


def _slice_size(budget: _Budget, value: Any, slices: Any = 0, fill_with: Any = None) -> int:
    return _fill_size(budget, slices, fill_with)


def _int_size(budget: _Budget, value: Any, *args: Any, **kwargs: Any) -> int:
    if isinstance(value, str) and len(value) > 4300:  # str -> int is quadratic where Python does not limit it
        raise SecurityError("|int of a string of more than 4300 characters is not allowed in guards")
    return 0


def _trim_size(budget: _Budget, value: Any, chars: Any = None) -> int:
    if isinstance(chars, str) and len(chars) > MAX_STRIP_CHARS:
        raise SecurityError(f"|trim with more than {MAX_STRIP_CHARS} characters is not allowed in guards")
    return _size(value, budget.room())


@pass_environment
def _join_filter(environment: Any, value: Any, d: Any = "", attribute: Any = None) -> str:
    """|join, sized before it joins (Jinja's own turns every item into a string unchecked)."""
    items = list(value)
    if attribute is not None:
        get = make_attrgetter(environment, attribute)
        items = [get(item) for item in items]
    budget = _budget()
    budget.charge(_size_all(items, budget.room()) + _size(d, budget.room()) * max(len(items) - 1, 0), "|join")
    return str(d).join(map(str, items))


def _replace_filter(s: Any, old: Any, new: Any, count: Any = None) -> str:
    """|replace, sized before it replaces."""
    budget = _budget()
    budget.charge(_size_all((s, old, new), budget.room()), "|replace")
    text, old, new = str(s), str(old), str(new)
    budget.charge(_replacement(text, old, new, count), "|replace")
    return text.replace(old, new, -1 if count is None else count)


@pass_environment
def _sum_filter(environment: Any, iterable: Any, attribute: Any = None, start: Any = 0) -> Any:
    """|sum of numbers only: summing lists copies the growing total at every step."""
    if isinstance(start, bool) or not isinstance(start, (int, float)):
        raise SecurityError("|sum adds numbers only in guards")
    if attribute is not None:
        iterable = map(make_attrgetter(environment, attribute), iterable)
    total = start
    for item in iterable:
        _budget()
        if not isinstance(item, (int, float)):
            raise TypeError(f"|sum adds numbers, got {type(item).__name__}")
        total = total + item
    return total


# Filters a guard may use. Left out on purpose: output helpers that build large strings from
# small arguments or that guards have no use for (center, indent, wordwrap, format, filesizeformat,
# urlize, urlencode, xmlattr, tojson, pprint, escape/e/forceescape, safe, striptags), and random,
# which would make routing depend on chance.
_FREE_FILTERS = ("abs", "attr", "count", "d", "default", "first", "float", "last", "length", "max", "min", "round")
_COPYING_FILTERS = ("dictsort", "groupby", "items", "list", "map", "reject", "rejectattr", "reverse", "select",
                    "selectattr", "sort", "truncate", "unique")
_STRING_FILTERS = ("capitalize", "lower", "string", "title", "upper", "wordcount")


def _filters(jinja: dict[str, Callable[..., Any]]) -> dict[str, Callable[..., Any]]:
    out = {name: _wrap(name, jinja[name]) for name in _FREE_FILTERS}
    out.update({name: _wrap(name, jinja[name], post=_shallow) for name in _COPYING_FILTERS})
    out.update({name: _wrap(name, jinja[name], pre=_STRINGIFY) for name in _STRING_FILTERS})
    out.update(
        batch=_wrap("batch", jinja["batch"], pre=_batch_size),
        slice=_wrap("slice", jinja["slice"], pre=_slice_size),
        int=_wrap("int", jinja["int"], pre=_int_size),
        trim=_wrap("trim", jinja["trim"], pre=_trim_size),
        join=_wrap("join", _join_filter),
        replace=_wrap("replace", _replace_filter),
        sum=_wrap("sum", _sum_filter),
    )
    return out


def _environment() -> _Sandbox:
    env = _Sandbox(undefined=StrictUndefined, autoescape=False, optimized=False)
    env.globals.clear()
    env.filters = _filters(env.filters)
    env.tests = {name: _wrap(name, fn) for name, fn in env.tests.items()}
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
    """A compiled guard expression; evaluating it never reaches outside its three names and never
    costs more than its limits."""

    source: str
    _template: Template = field(repr=False, compare=False)  # `{% set result = <source> %}`
    limits: GuardLimits = field(default_factory=GuardLimits, repr=False, compare=False)

    def __call__(self, payload: dict, instance: dict, state: str) -> bool:
        return bool(self._evaluate(payload, instance, state, bool))

    def value(self, payload: dict, instance: dict, state: str) -> Any:
        """The expression's value (a `wait: {until: ...}` time, a map's items), not only its truth."""
        return self._evaluate(payload, instance, state, _plain)

    def _evaluate(self, payload: dict, instance: dict, state: str, result: Callable[[Any], Any]) -> Any:
        token = _CURRENT.set(_Budget(self.limits))
        try:
            # what Jinja's TemplateExpression does, with the three names as the context's own
            # variables (`shared`: the environment has no globals to merge them into)
            template = self._template
            context = template.new_context({"payload": payload, "instance": instance, "state": state}, shared=True)
            for _ in template.root_render_func(context):
                pass
            return result(context.vars["result"])
        except _OutOfTime as exc:
            raise GuardError(f"guard {self.source!r} {exc}") from None
        except SecurityError as exc:
            raise GuardError(f"guard {self.source!r} refused: {exc}") from None
        except UndefinedError as exc:
            raise GuardError(f"guard {self.source!r}: {exc}{_missing_key_hint(self.source, exc)}") from None
        except (TemplateError, TypeError, ValueError, ArithmeticError, LookupError, AttributeError) as exc:
            raise GuardError(f"guard {self.source!r}: {type(exc).__name__}: {exc}") from None
        except (MemoryError, RecursionError, OverflowError) as exc:
            raise GuardError(f"guard {self.source!r} exceeded its bounds: {type(exc).__name__}") from None
        finally:
            _CURRENT.reset(token)


def _plain(value: Any) -> Any:
    """A value the sandbox produced, as plain JSON-like Python (tuples and other sequences become
    lists; undefined values raise as they would in a guard)."""
    if isinstance(value, (str, bytes, dict)) or value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    str(value)  # an Undefined raises here, inside the guard's error handling
    return value


def compile_guard(source: str, limits: GuardLimits | None = None) -> Guard:
    """Compile an expression; unknown names and syntax errors raise GuardError at compile time."""
    if len(source) > MAX_SOURCE:
        raise GuardError(f"guard of {len(source)} characters is too long; the limit is {MAX_SOURCE}")
    try:
        parser = Parser(_ENV, source, state="variable")
        tree = parser.parse_expression()
        if not parser.stream.eos:
            parser.fail(f"unexpected {parser.stream.current.value!r} after the expression")
        # as Environment.compile_expression builds it, from the tree parsed above
        body = nodes.Template([nodes.Assign(nodes.Name("result", "store"), tree, lineno=1)], lineno=1)
        body.set_environment(_ENV)
        template = _ENV.from_string(body)
        template.globals = {}  # the environment has none: each evaluation's context need not list a chain of them
    except TemplateSyntaxError as exc:
        raise GuardError(f"guard {source!r} does not compile: {exc.message}") from None
    except (ValueError, OverflowError) as exc:  # a number literal Python will not read
        raise GuardError(f"guard {source!r} does not compile: {exc}") from None
    except (MemoryError, RecursionError):
        raise GuardError(f"guard {source!r} is too complex") from None
    unknown = sorted({n.name for n in tree.find_all(nodes.Name)} - NAMES)
    if unknown:
        names = ", ".join(repr(n) for n in unknown)
        raise GuardError(f"guard {source!r} uses unknown name {names}; guards see payload, instance and state")
    return Guard(source, template, limits or GuardLimits.from_env())
