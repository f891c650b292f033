"""Frozen slotted dataclasses, made and copied in about half the time dataclasses takes.

A frozen dataclass's `__init__` sets each field through `object.__setattr__` (its own
`__setattr__` refuses), a generic lookup of the field's slot for every field. A worker makes a
dozen such values for every transition (the record, its token, the history entry, the outcome,
the plan, the transaction's operations), so `fast_init` writes an `__init__` that sets each field
through its slot's own setter, and `evolver` a `dataclasses.replace` that does the same. The
values are the same as before: still frozen (assigning to a field raises), with the same
equality, hash, repr and pickling. The same technique dataclasses uses to write `__init__`.

Only for what dataclasses would write plainly: slotted, frozen, every field in `__init__`,
positional or keyword, no `__post_init__`. Anything else is refused when the class is defined.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_NO_DEFAULT = object()


def slot_setters(cls: Any) -> tuple[Callable[[Any, Any], None], ...]:
    """Setters of the fields of a frozen slotted dataclass through its slots, in the order of its
    fields (for an `__init__` written by hand)."""
    return tuple(cls.__dict__[f.name].__set__ for f in dataclasses.fields(cls))


def _setters(cls: Any) -> dict[str, Any]:
    """Each field's slot setter, by the names the generated code uses."""
    return {f"_set_{f.name}": setter for f, setter in zip(dataclasses.fields(cls), slot_setters(cls))}


def _check(cls: Any) -> None:
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen or "__slots__" not in cls.__dict__:
        raise TypeError(f"{cls.__name__}: fast_init and evolver are for frozen dataclasses with slots")
    if hasattr(cls, "__post_init__"):
        raise TypeError(f"{cls.__name__}: a __post_init__ is not run by fast_init")
    for f in dataclasses.fields(cls):
        if not f.init or f.kw_only:
            raise TypeError(f"{cls.__name__}.{f.name}: fast_init writes positional-or-keyword fields only")


def fast_init(cls: type[T]) -> type[T]:
    """Give a frozen slotted dataclass a faster `__init__`, with the same parameters and defaults
    (apply it above `@dataclass`)."""
    klass: Any = cls
    _check(klass)
    namespace: dict[str, Any] = {**_setters(klass), "_NO_DEFAULT": _NO_DEFAULT}
    params, body = [], []
    for f in dataclasses.fields(klass):
        name = f.name
        if f.default is not dataclasses.MISSING:
            namespace[f"_default_{name}"] = f.default
            params.append(f"{name}=_default_{name}")
        elif f.default_factory is not dataclasses.MISSING:
            namespace[f"_factory_{name}"] = f.default_factory
            params.append(f"{name}=_NO_DEFAULT")
            body.append(f"    if {name} is _NO_DEFAULT:\n        {name} = _factory_{name}()\n")
        else:
            params.append(name)
        body.append(f"    _set_{name}(self, {name})\n")
    source = f"def __init__(self, {', '.join(params)}):\n{''.join(body)}"
    exec(source, namespace)
    init = namespace["__init__"]
    init.__qualname__ = f"{klass.__qualname__}.__init__"
    init.__doc__ = klass.__init__.__doc__
    klass.__init__ = init
    return cls


def evolver(cls: type[T]) -> Callable[..., T]:
    """`dataclasses.replace` for one frozen slotted dataclass, several times faster: it sets the
    fields of a new object directly instead of calling `__init__` through a dict of every field,
    each from the changes or the old object as the code generated for that set of changed names
    says (one function a set, made the first time it is asked for). An unknown name is a
    TypeError, as `replace` makes it."""
    klass: Any = cls
    _check(klass)
    names = [f.name for f in dataclasses.fields(klass)]
    known = frozenset(names)
    namespace: dict[str, Any] = {**_setters(klass), "_new": object.__new__, "_cls": klass}
    made: dict[tuple[str, ...], Callable[[Any, dict[str, Any]], T]] = {}

    def specialised(changed: tuple[str, ...]) -> Callable[[Any, dict[str, Any]], T]:
        unknown = set(changed) - known
        if unknown:
            raise TypeError(f"{klass.__name__} has no field {sorted(unknown)[0]!r}")
        body = "".join(f"    _set_{n}(new, changes[{n!r}])\n" if n in changed else f"    _set_{n}(new, self.{n})\n"
                       for n in names)
        scope = dict(namespace)
        exec(f"def evolve(self, changes):\n    new = _new(_cls)\n{body}    return new\n", scope)
        return made.setdefault(changed, scope["evolve"])

    def evolve(self: T, **changes: Any) -> T:
        key = tuple(changes)
        return (made.get(key) or specialised(key))(self, changes)

    return evolve
