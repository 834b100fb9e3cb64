"""Who is watching which queue: live delivery's registry on one relay node.

A session that sent ``subscribe`` is registered under its user's UID. When a message is stored for
that UID (by this node's group commit, or by another node, as PostgreSQL ``NOTIFY`` tells) every
registered session is told the newest queue number. The registry holds no messages and no tasks:
an idle watcher costs a set entry.
"""

from __future__ import annotations

from typing import Protocol


class Watcher(Protocol):
    def queued(self, num: int) -> None:
        """The watcher's queue now holds message ``num``; must not block."""


class Watchers:
    def __init__(self) -> None:
        self._by_uid: dict[str, set[Watcher]] = {}

    def add(self, uid: str, watcher: Watcher) -> None:
        self._by_uid.setdefault(uid, set()).add(watcher)

    def remove(self, uid: str, watcher: Watcher) -> None:
        watching = self._by_uid.get(uid)
        if watching is not None:
            watching.discard(watcher)
            if not watching:
                del self._by_uid[uid]

    def notify(self, uid: str, num: int) -> None:
        for watcher in list(self._by_uid.get(uid, ())):
            watcher.queued(num)

    def uids(self) -> list[str]:
        """The UIDs someone on this node watches (what to re-read after missing notifications)."""
        return list(self._by_uid)

    def __len__(self) -> int:
        return sum(len(w) for w in self._by_uid.values())
