"""Text from elsewhere (a certificate, a relay, another user) made safe to print on a terminal.

One rule for every place that prints what someone else wrote: control, format and escape characters
are shown as ``\\x1b`` / ``\\u202e`` instead of being sent to the terminal, which would obey them.
"""

from __future__ import annotations


def visible(text: str, keep: str = "") -> str:
    """``text`` with every non-printable character made visible, except those in ``keep``."""
    return "".join(c if c in keep or c.isprintable() else
                   f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}" for c in text)
