"""What can go wrong talking to the relay: one exception hierarchy, each error one line a user can act on.

Shared by both connections (:mod:`client.connection` on asyncio, :mod:`client.blocking` for one-shot
commands), so a refusal reads the same whichever carried it.
"""

from __future__ import annotations

import ssl

from pki.errors import MsgRelayError

# The certificate alerts of RFC 8446 section 6.2, by the name OpenSSL gives a received one
# ("SSLV3_ALERT_CERTIFICATE_REVOKED", "TLSV1_ALERT_UNKNOWN_CA" ...), and the words the user sees.
# OpenSSL also sends certificate_expired for a certificate not yet valid, or a CRL out of date.
_REJECTION_ALERTS = {
    "CERTIFICATE_REVOKED": "revoked",
    "CERTIFICATE_EXPIRED": "expired",
    "UNKNOWN_CA": "unknown CA",
    "CERTIFICATE_REQUIRED": "no certificate",
    "BAD_CERTIFICATE": "bad certificate",
    "UNSUPPORTED_CERTIFICATE": "not usable for this purpose",
    "CERTIFICATE_UNKNOWN": "not accepted",
    "ACCESS_DENIED": "access denied",
    "DECRYPT_ERROR": "signature check failed",
}
_ALERT_PREFIXES = ("SSLV3_ALERT_", "TLSV1_ALERT_", "TLSV13_ALERT_")


class ClientError(MsgRelayError):
    """A failure to show the user as one line."""


class ConnectionLost(ClientError):
    """The relay could not be reached, or the connection broke after it had answered: another node of
    a cluster may do (a retried send keeps its msg_id, so it is never stored twice)."""


class ServerRejected(ClientError):
    """The relay refused our certificate (surfaces on the first read under TLS 1.3)."""


def rejection(exc: ssl.SSLError) -> ServerRejected | None:
    """The one line for a certificate alert from the relay; None for any other TLS failure.

    Only a received alert counts (our own verification errors have other reasons), and only one
    about certificates: a protocol_version or internal_error alert is not a verdict on ours.
    """
    reason = (exc.reason or "").upper()
    for prefix in _ALERT_PREFIXES:
        if reason.startswith(prefix):
            text = _REJECTION_ALERTS.get(reason[len(prefix):])
            return ServerRejected(f"the relay refused our certificate: {text}") if text else None
    return None


def handshake_failure(exc: OSError, host: str, port: int) -> ClientError:
    """The one line for a connection attempt that failed before the relay could answer anything."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return ClientError(f"server certificate rejected: {exc.verify_message}")
    if isinstance(exc, ssl.SSLError):
        return rejection(exc) or ClientError(f"TLS handshake with {host}:{port} failed ({exc.reason or exc})")
    if isinstance(exc, TimeoutError):
        return ConnectionLost(f"relay at {host}:{port} did not answer in time")
    return ConnectionLost(f"cannot reach the relay at {host}:{port} ({exc.strerror or exc})")
