"""Exceptions of the PKI toolkit.

Every failure a user can cause (a bad file, a wrong password, a rejected certificate) is a
:class:`PkiError` whose message is one readable line, so the CLIs can print it as is.
"""

from __future__ import annotations


class MsgRelayError(Exception):
    """The root of every error the MSG Relay library raises on purpose.

    Each one carries a message that is one readable line, so a CLI that catches this one class
    can print any failure without a traceback (httpx-style: one hierarchy, errors a user can act on).
    """


class PkiError(MsgRelayError):
    """A PKI operation failed for a reason the user can act on."""


class KeystoreError(PkiError):
    """A keystore could not be read or written (corrupt, wrong password, no key ...)."""


class WrongPassword(KeystoreError):
    """The keystore is well-formed PKCS#12 but this password does not open it."""


class ValidationError(PkiError):
    """A certificate was rejected.

    ``reason`` is a short stable token (``expired``, ``revoked``, ``unknown_issuer`` ...) for code and
    tests; the message is the sentence shown to people.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
