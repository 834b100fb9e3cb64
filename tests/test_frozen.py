"""``@frozen`` (pki/frozen.py): made on first use, it behaves as ``@dataclass(frozen=True)`` does."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import threading
from typing import ClassVar

import pytest

import pki.frozen
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


class _WatchedLock:
    """``pki.frozen``'s lock, telling when a thread has to wait for it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.contended = threading.Event()

    def __enter__(self) -> None:
        if not self.lock.acquire(blocking=False):
            self.contended.set()
            self.lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


def test_a_thread_that_comes_while_another_makes_the_class_waits_for_the_class_complete(monkeypatch):
    """Thread B asks for an instance while A is making the class: B must wait for A, then get a whole one
    (not an instance of a class half made, nor a second making)."""
    lazy_cls, _ = _pair()
    make = pki.frozen._make
    watched = _WatchedLock()
    monkeypatch.setattr(pki.frozen, "_making", watched)
    other: dict[str, object] = {}

    def second() -> None:
        try:
            other["made"] = lazy_cls(2)
        except Exception as exc:  # noqa: BLE001  (reported by the assertion below)
            other["error"] = exc

    b = threading.Thread(target=second)

    def making(cls: type) -> None:
        b.start()
        other["waited"] = watched.contended.wait(10)  # B is at the lock A holds
        make(cls)

    monkeypatch.setattr(pki.frozen, "_make", making)
    assert lazy_cls(1).num == 1
    b.join(10)
    assert "error" not in other, other
    assert other["waited"] is True and other["made"] == lazy_cls(2)


def test_a_class_that_defines_what_frozen_makes_is_refused():
    with pytest.raises(TypeError, match=r"makes .*Mine\.__repr__ itself"):
        @frozen
        class Mine:
            num: int

            def __repr__(self) -> str:
                return "mine"


def test_every_frozen_class_of_the_project_can_be_made():
    """A definition error (a field without default after one with) shows only when the class is made:
    make every one now rather than at the first user who needs it."""
    for package in ("pki", "protocol", "client", "server"):
        for module in pkgutil.iter_modules(importlib.import_module(package).__path__, f"{package}."):
            importlib.import_module(module.name)
    assert len(pki.frozen.CLASSES) >= 30
    for cls in pki.frozen.CLASSES:
        cls.__new__(cls)  # makes the class (no __init__ is run)
        assert dataclasses.is_dataclass(cls), cls


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
