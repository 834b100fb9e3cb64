"""The MSG Relay PKI toolkit: issue, store, inspect and validate the organisation's certificates."""

from .errors import KeystoreError, MsgRelayError, PkiError, ValidationError
from .identity import (
    DEFAULT_ORG_UNIT,
    MSG_CA,
    MSG_SERVER,
    Identity,
    is_valid_uid,
    uid_of,
)
from .keystore import Keystore, load_keystore
from .passwords import PasswordSource
from .validation import TrustPolicy, check_profile, validate

__all__ = [
    "DEFAULT_ORG_UNIT", "MSG_CA", "MSG_SERVER", "Identity", "Keystore", "KeystoreError", "MsgRelayError", "PasswordSource",
    "PkiError", "TrustPolicy", "ValidationError", "check_profile", "is_valid_uid", "load_keystore", "uid_of",
    "validate",
]
