"""Where keystore and CA-key passwords come from: a file, an environment variable, or a prompt.

Never from a command-line argument (it would show in ``ps`` and shell history) and never from code.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from .errors import KeystoreError
from .files import read_bytes

PASSWORD_ENV = "MSG_RELAY_PASSWORD"


@dataclass(frozen=True)
class PasswordSource:
    """How to obtain a password if one turns out to be needed.

    Keeping it lazy matters: unprotected keystores (the original service's convention) must load
    without ever prompting.
    """

    file: str | None = None
    env: str = PASSWORD_ENV
    prompt: bool = True
    before_prompt: Callable[[], None] | None = None  # called before the terminal is read (client.launch)

    def given(self) -> bytes | None:
        """A password supplied up front (file or environment), else None."""
        if self.file:
            data = read_bytes(self.file).rstrip(b"\r\n")
            if not data:
                raise KeystoreError(f"{self.file}: password file is empty")
            return data
        value = os.environ.get(self.env)
        return value.encode() if value else None

    def obtain(self, what: str) -> bytes:
        """The password for ``what``: given, else asked for on a terminal, else an error."""
        given = self.given()
        if given is not None:
            return given
        if self.prompt and sys.stdin is not None and sys.stdin.isatty():
            if self.before_prompt is not None:
                self.before_prompt()
            import getpass  # only when asking: most keystores open without a password

            entered = getpass.getpass(f"Password for {what}: ").encode()
            if entered:
                return entered
        raise KeystoreError(f"{what} is password-protected: use --password-file or set {self.env}")


NO_PASSWORD = PasswordSource(file=None, env="", prompt=False)
