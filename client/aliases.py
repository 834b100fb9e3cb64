"""Aliases: a name for a group of recipients, kept in the client's state directory (``aliases.json``).

``msg-client alias set TEAM alice,bob`` then ``msg-client send TEAM "subject"``. An alias is usable
wherever a UID is; it names UIDs only (no alias of aliases), so what a name stands for is one lookup.
The members are resolved on this device only: the relay never sees an alias.
"""

from __future__ import annotations

from pki.identity import is_valid_uid
from protocol.envelope import MAX_RECIPIENTS

from .errors import ClientError
from .state import ClientState

_FILE = "aliases.json"


class AliasError(ClientError):
    """An alias or recipient list that cannot be used."""


def split_recipients(text: str) -> list[str]:
    """``UID1,UID2,…`` as typed: each part a UID (or an alias name, which has a UID's form)."""
    parts = [p.strip() for p in text.split(",")]
    for part in parts:
        if not is_valid_uid(part):
            raise AliasError(f"not a UID (1-64 of A-Z a-z 0-9 _ . @ -): {part!r}")
    return parts


class Aliases:
    def __init__(self, state: ClientState) -> None:
        self.state = state

    def all(self) -> dict[str, list[str]]:
        raw = self.state.load_doc(_FILE, {})
        if not isinstance(raw, dict) or not all(
                isinstance(k, str) and isinstance(v, list) and all(is_valid_uid(u) for u in v) for k, v in raw.items()):
            raise AliasError(f"{self.state.dir / _FILE}: corrupt alias file (move it away to start afresh)")
        return raw

    def set(self, name: str, members: list[str]) -> list[str]:
        if not is_valid_uid(name):
            raise AliasError(f"an alias name has a UID's form (1-64 of A-Z a-z 0-9 _ . @ -), not {name!r}")
        unique = list(dict.fromkeys(members))
        if not 1 <= len(unique) <= MAX_RECIPIENTS:
            raise AliasError(f"an alias names 1 to {MAX_RECIPIENTS} UIDs, not {len(unique)}")
        aliases = self.all()
        nested = [m for m in unique if m in aliases]
        if nested:
            raise AliasError(f"{nested[0]} is an alias: an alias names UIDs only")
        aliases[name] = unique
        self.state.save_doc(_FILE, aliases)
        return unique

    def remove(self, name: str) -> None:
        aliases = self.all()
        if name not in aliases:
            raise AliasError(f"no alias {name!r}")
        del aliases[name]
        self.state.save_doc(_FILE, aliases)

    def expand(self, names: list[str]) -> list[str]:
        """The recipients ``names`` stand for, each once, in order; an alias name wins over a UID of the
        same name (the command prints every recipient it sent to, so a surprise shows)."""
        aliases = self.all()
        out: list[str] = []
        for name in names:
            out.extend(aliases.get(name, [name]))
        unique = list(dict.fromkeys(out))
        if len(unique) > MAX_RECIPIENTS:
            raise AliasError(f"{len(unique)} recipients: a message goes to at most {MAX_RECIPIENTS}")
        return unique
