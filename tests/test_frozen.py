"""dsm.frozen: the faster __init__ and replace of frozen slotted dataclasses make the same values."""

from __future__ import annotations

import dataclasses
import pickle
from dataclasses import dataclass, field

import pytest

from dsm.frozen import evolver, fast_init
from dsm.records import Instance, Token


@fast_init
@dataclass(frozen=True, slots=True)
class Point:
    x: int
    y: int = 0
    tags: tuple[str, ...] = ()
    meta: dict[str, int] = field(default_factory=dict)


def test_same_values_as_dataclasses_makes():
    p = Point(1, y=2, tags=("a",))
    assert (p.x, p.y, p.tags, p.meta) == (1, 2, ("a",), {})
    assert p == Point(1, 2, ("a",), {}) and hash(Token("t1", "a")) == hash(Token("t1", "a"))
    assert repr(p) == "Point(x=1, y=2, tags=('a',), meta={})"
    assert Point(1).meta is not Point(1).meta  # a default factory is called for each value
    assert pickle.loads(pickle.dumps(p)) == p
    assert dataclasses.replace(p, y=5) == Point(1, 5, ("a",), {})


def test_still_frozen_and_checked():
    p = Point(1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.x = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        Point()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Point(1, z=3)  # type: ignore[call-arg]


def test_evolver_copies_with_changes():
    evolve = evolver(Point)
    p = Point(1, 2)
    q = evolve(p, y=3)
    assert q == Point(1, 3) and p == Point(1, 2)
    assert evolve(p) == p and evolve(p) is not p


def test_refuses_what_it_would_not_write_the_same():
    @dataclass(frozen=True)
    class NoSlots:
        x: int

    @dataclass(slots=True)
    class NotFrozen:
        x: int

    @dataclass(frozen=True, slots=True)
    class PostInit:
        x: int

        def __post_init__(self) -> None:
            pass

    @dataclass(frozen=True, slots=True)
    class KwOnly:
        x: int = field(kw_only=True)

    for cls in (NoSlots, NotFrozen, PostInit, KwOnly):
        with pytest.raises(TypeError):
            fast_init(cls)


def test_records_use_it():
    token = Token(id="t1", state="a")
    assert token == Token("t1", "a", (), None, 1, 0.0, 1, (), None, None, None)
    inst = Instance(id="i", machine="m", digest="d")
    assert inst.payload == {} and dict(inst.tokens) == {}
