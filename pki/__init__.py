"""The MSG Relay PKI toolkit: issue, store, inspect and validate the organisation's certificates.

The names below are loaded on first use, not when ``pki`` is imported: every module of the project
imports ``pki.errors``, and a ``msg-client`` command must not pay for keystores, path validation and
pyOpenSSL (about 60 ms together) just for that.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import KeystoreError, MsgRelayError, PkiError, ValidationError

if TYPE_CHECKING:
    from .identity import DEFAULT_ORG_UNIT, MSG_CA, MSG_SERVER, Identity, is_valid_uid, uid_of
    from .keystore import Keystore, load_keystore
    from .passwords import PasswordSource
    from .validation import TrustPolicy, check_profile, validate

_LAZY = {
    "DEFAULT_ORG_UNIT": "identity", "MSG_CA": "identity", "MSG_SERVER": "identity", "Identity": "identity",
    "is_valid_uid": "identity", "uid_of": "identity", "Keystore": "keystore", "load_keystore": "keystore",
    "PasswordSource": "passwords", "TrustPolicy": "validation", "check_profile": "validation", "validate": "validation",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "DEFAULT_ORG_UNIT", "MSG_CA", "MSG_SERVER", "Identity", "Keystore", "KeystoreError", "MsgRelayError", "PasswordSource",
    "PkiError", "TrustPolicy", "ValidationError", "check_profile", "is_valid_uid", "load_keystore", "uid_of",
    "validate",
]
