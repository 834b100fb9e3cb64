"""``@frozen`` (pki/frozen.py): made on first use, it behaves as ``@dataclass(frozen=True)`` does."""

from __future__ import annotations

import dataclasses
import threading
from typing import ClassVar

import pytest

from pki.frozen import frozen


def _pair() -> tuple[type, type]:
    """The same record as a lazy frozen class and as a plain frozen dataclass (fresh classes per test)."""

    @frozen
    class Lazy:
        op: ClassVar[str] = "x"
        num: int
        name: str = "a"
        cache: list[int] | None = dataclasses.field(default=None, compare=False, repr=False)

    @dataclasses.dataclass(frozen=True)
    class Eager:
        op: ClassVar[str] = "x"
        num: int
        name: str = "a"
        cache: list[int] | None = dataclasses.field(default=None, compare=False, repr=False)

    return Lazy, Eager


def test_it_behaves_as_a_frozen_dataclass():
    lazy_cls, eager_cls = _pair()
    lazy, eager = lazy_cls(1, "b", [1]), eager_cls(1, "b", [1])
    assert repr(lazy).replace("Lazy", "Eager") == repr(eager) == "_pair.<locals>.Eager(num=1, name='b')"
    assert lazy == lazy_cls(1, "b", [2]) and hash(lazy) == hash(lazy_cls(1, "b"))  # cache is not compared
    assert lazy != lazy_cls(2, "b") and lazy != eager  # another class is never equal
    assert dataclasses.replace(lazy, num=5) == lazy_cls(5, "b")
    assert [f.name for f in dataclasses.fields(lazy_cls)] == ["num", "name", "cache"]
    assert lazy_cls.op == "x" and "op" not in {f.name for f in dataclasses.fields(lazy_cls)}


def test_its_instances_cannot_change():
    lazy_cls, _ = _pair()
    lazy = lazy_cls(1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        lazy.num = 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        del lazy.name
    assert lazy.num == 1


def test_wrong_arguments_are_refused_on_the_first_instance_too():
    lazy_cls, _ = _pair()
    with pytest.raises(TypeError, match="missing 1 required positional argument: 'num'"):
        lazy_cls()
    with pytest.raises(TypeError, match="unexpected keyword argument 'colour'"):
        lazy_cls(1, colour="red")
    assert lazy_cls(3).num == 3


def test_a_first_instance_begun_before_the_class_was_made_does_not_make_it_again():
    """What a thread sees when another made the class while it waited for the lock: it had looked up the
    first-instance ``__init__`` already, and must now just initialise its instance."""
    lazy_cls, _ = _pair()
    late = lazy_cls.__init__  # looked up before the class is made
    lazy_cls(1)  # another thread makes it
    obj = object.__new__(lazy_cls)
    late(obj, 2)
    assert obj.num == 2 and lazy_cls(3) == lazy_cls(3) and repr(lazy_cls(4)).endswith("(num=4, name='a')")


def test_threads_making_the_first_instances_at_once_all_get_theirs():
    lazy_cls, _ = _pair()
    start = threading.Barrier(8)
    made: list[object] = []

    def make(n: int) -> None:
        start.wait()
        made.append(lazy_cls(n))

    threads = [threading.Thread(target=make, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(m.num for m in made) == list(range(8))  # type: ignore[attr-defined]
