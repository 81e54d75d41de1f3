"""Request signing with the per-cluster secret: ``Authorization: Envclone <expires>:<hmac>``,
the HMAC-SHA256 of ``"<METHOD> <path> <expires>"``. Short-lived, bound to one method and path."""

from __future__ import annotations

import hashlib
import hmac
import time

SCHEME = "Envclone"
TTL_S = 300
# A signature valid further ahead than this is refused: it would be a long-lived token.
MAX_AHEAD_S = 3600


def _mac(secret: str, method: str, path: str, expires: int) -> str:
    return hmac.new(secret.encode(), f"{method} {path} {expires}".encode(), hashlib.sha256).hexdigest()


def sign(secret: str, method: str, path: str, ttl_s: int = TTL_S, now: float | None = None) -> str:
    expires = int((time.time() if now is None else now) + ttl_s)
    return f"{SCHEME} {expires}:{_mac(secret, method, path, expires)}"


def verify(secret: str, method: str, path: str, header: str | None) -> str | None:
    """None when the header is valid for this request, else why not (for the 401 message)."""
    if not header:
        return "missing Authorization header"
    scheme, _, value = header.partition(" ")
    expires_s, _, mac = value.partition(":")
    if scheme != SCHEME or not expires_s.isdigit() or not mac:
        return f"malformed Authorization header (expected '{SCHEME} <expires>:<hmac>')"
    expires, now = int(expires_s), time.time()
    if expires < now:
        return "signature expired"
    if expires > now + MAX_AHEAD_S:
        return "signature expires too far ahead"
    if not hmac.compare_digest(mac, _mac(secret, method, path, expires)):
        return "bad signature"
    return None
