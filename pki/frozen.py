"""``@frozen``: a ``@dataclass(frozen=True)`` whose methods are made when its first instance is.

Why: on Python 3.11 ``@dataclass`` compiles every generated method with ``exec`` as the class is
defined, about 0.3 ms a class. ``msg-client`` imports some 40 message and record classes and a command
instantiates about 20, so defining them all eagerly cost about 11 ms of a 100 ms command. From its first
instance on the class is a frozen dataclass (fields, ``dataclasses.replace``, immutability); before it,
no instance exists to tell the difference (``dataclasses.fields`` of the class itself, and pickling, are
not for these classes). Of the generated methods only those that must be fast per
instance are compiled (``__init__`` and the frozen ``__setattr__``/``__delattr__``); equality, hashing
and ``repr`` are the shared functions below, which behave as the generated ones do.

Only for a class without dataclass bases or subclasses (a dataclass subclass needs its base's fields
when it is defined).
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, TypeVar, dataclass_transform

T = TypeVar("T", bound=type)
_making = threading.Lock()  # two threads creating the first instances at once make the class once


def _compared(obj: Any) -> tuple[Any, ...]:
    return tuple(getattr(obj, name) for name in type(obj).__frozen_compare__)


def _eq(self: Any, other: object) -> bool:
    if other.__class__ is not self.__class__:
        return NotImplemented
    return _compared(self) == _compared(other)


def _hash(self: Any) -> int:
    return hash(_compared(self))


def _repr(self: Any) -> str:
    shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in type(self).__frozen_repr__)
    return f"{type(self).__qualname__}({shown})"


def _make(cls: type) -> None:
    dataclasses.dataclass(frozen=True, eq=False, repr=False)(cls)
    fields = dataclasses.fields(cls)
    cls.__frozen_compare__ = tuple(f.name for f in fields if f.compare)  # type: ignore[attr-defined]
    cls.__frozen_repr__ = tuple(f.name for f in fields if f.repr)  # type: ignore[attr-defined]
    cls.__eq__ = _eq  # type: ignore[assignment]
    cls.__hash__ = _hash  # type: ignore[assignment]
    cls.__repr__ = _repr  # type: ignore[assignment]


# Every class decorated, in definition order: a test makes each one (a definition error shows at the
# first instance, so it must not wait for the first user who needs that class).
CLASSES: list[type] = []


@dataclass_transform(frozen_default=True)
def frozen(cls: T) -> T:
    """Decorate ``cls`` as ``@dataclass(frozen=True)`` would, on its first instantiation."""
    for name in ("__init__", "__new__", "__eq__", "__hash__", "__repr__"):
        if name in cls.__dict__:
            raise TypeError(f"@frozen makes {cls.__qualname__}.{name} itself: the class must not define it")
    made = False

    def __new__(klass: type, *args: Any, **kwargs: Any) -> Any:
        # Here, before any __init__ is looked up: a thread that comes while another makes the class
        # waits for it, and then finds the class complete.
        nonlocal made
        if not made:
            with _making:
                if not made:
                    _make(cls)
                    made = True
        return object.__new__(klass)

    cls.__new__ = staticmethod(__new__)  # type: ignore[assignment]
    CLASSES.append(cls)
    return cls


def make_all() -> None:
    """Make every class decorated so far now, as its first instance would (the resident starter does
    this once, so that no command it forks pays for it)."""
    for cls in list(CLASSES):
        cls.__new__(cls)  # type: ignore[call-overload]
