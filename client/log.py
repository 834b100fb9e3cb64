"""The client's log (``msg_relay.client``), with ``logging`` imported only once a line is due.

``import logging`` costs about 4 ms, a twentieth of a whole ``msg-client`` command, and a command run
without ``--verbose`` logs nothing below a warning. So the command line tells this log its level
(:meth:`ClientLog.for_command_line`): lines below it are dropped without importing anything, and the
first line that is due configures logging once (one format, on stderr). A program that embeds the
client never calls it, and every line goes to ``logging`` as usual, configured as that program wants.
"""

from __future__ import annotations

from typing import Any

from pki.terminal import visible

DEBUG, INFO, WARNING = 10, 20, 30  # logging's own values
NAME = "msg_relay.client"
FORMAT = "%(levelname)s %(name)s: %(message)s"


class ClientLog:
    def __init__(self) -> None:
        self._unconfigured_level: int | None = None  # the command line's level, until logging is set up

    def for_command_line(self, verbose: bool) -> None:
        """``msg-client`` owns the process: debug lines with ``--verbose``, else warnings and worse."""
        self._unconfigured_level = DEBUG if verbose else WARNING
        if verbose:
            self._configure()

    def for_library(self) -> None:
        """Back to passing every line to ``logging`` (after an in-process command ends)."""
        self._unconfigured_level = None

    def _configure(self) -> None:
        import logging

        assert self._unconfigured_level is not None
        logging.basicConfig(level=self._unconfigured_level, format=FORMAT)
        self._unconfigured_level = None

    def log(self, level: int, msg: str, *args: Any) -> None:
        if self._unconfigured_level is not None:
            if level < self._unconfigured_level:
                return
            self._configure()
        import logging

        # Lines carry text a relay chose (its refusals): escaped, so it cannot drive the terminal.
        logging.getLogger(NAME).log(level, "%s", visible(msg % args if args else msg))

    def debug(self, msg: str, *args: Any) -> None:
        self.log(DEBUG, msg, *args)

    def info(self, msg: str, *args: Any) -> None:
        self.log(INFO, msg, *args)

    def warning(self, msg: str, *args: Any) -> None:
        self.log(WARNING, msg, *args)


log = ClientLog()
