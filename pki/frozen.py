"""``@frozen``: a ``@dataclass(frozen=True)`` whose methods are made when its first instance is.

Why: on Python 3.11 ``@dataclass`` compiles every generated method with ``exec`` as the class is
defined, about 0.3 ms a class. ``msg-client`` imports some 40 message and record classes and a command
instantiates a handful, so defining them all eagerly cost about 11 ms of a 100 ms command. From its
first instance on the class is an ordinary frozen dataclass (fields, equality, hashing, repr,
``dataclasses.replace``); before it, no instance exists to tell the difference.

Only for a class without dataclass bases or subclasses (a dataclass subclass needs its base's fields
when it is defined).
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, TypeVar, dataclass_transform

T = TypeVar("T", bound=type)
_making = threading.Lock()  # two threads creating the first instance at once make the class once


@dataclass_transform(frozen_default=True)
def frozen(cls: T) -> T:
    """Decorate ``cls`` as ``@dataclass(frozen=True)`` would, on its first instantiation."""

    def first_init(self: Any, *args: Any, **kwargs: Any) -> None:
        with _making:
            if cls.__dict__.get("__init__") is first_init:
                del cls.__init__  # type: ignore[misc]  # else the dataclass would keep it
                dataclasses.dataclass(frozen=True)(cls)
        cls.__init__(self, *args, **kwargs)  # type: ignore[misc]

    cls.__init__ = first_init  # type: ignore[misc]
    return cls
