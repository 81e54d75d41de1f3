"""Bearer tokens: each belongs to a tenant; only a SHA-256 of it is stored. A token may expire
(``expires_at``) and may be revoked (``revoked_at``); either way it answers 401 from then on."""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta

from flask import g, request
from sqlalchemy import Row, bindparam, select, update

from api.errors import ApiError
from shared.db import autocommit, session_scope
from shared.models import ApiToken, utcnow

PREFIX = "ec_"
# last_used_at is written when it is older than this: a write per token per minute, not per request.
LAST_USED_RESOLUTION = timedelta(minutes=1)


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(tenant: str, expires_in: timedelta | None = None) -> str:
    """Make a token for ``tenant``; the plain token is returned once and never stored."""
    return create_token_row(tenant, expires_in)[1]


def create_token_row(tenant: str, expires_in: timedelta | None = None) -> tuple[ApiToken, str]:
    """(the stored row, detached, and the plain token) for ``tenant``."""
    token = PREFIX + secrets.token_urlsafe(32)
    now = utcnow()
    row = ApiToken(tenant=tenant, token_hash=_hash(token), created_at=now,
                   expires_at=now + expires_in if expires_in is not None else None)
    with session_scope() as session:
        session.add(row)
        session.flush()
        session.expunge(row)
    return row, token


def refusal(row: ApiToken | Row | None, now: datetime | None = None) -> str | None:
    """Why ``row`` authenticates nobody (a message for the 401), or None when it is good."""
    now = now or utcnow()
    if row is None:
        return "invalid token"
    if row.revoked_at is not None:
        return "token revoked"
    if row.expires_at is not None and row.expires_at <= now:
        return "token expired"
    return None


def lookup(token: str) -> ApiToken | None:
    """The stored row of a plain token (detached), whatever its state."""
    with session_scope() as session:
        row = session.scalar(select(ApiToken).where(ApiToken.token_hash == _hash(token.strip())))
        if row is not None:
            session.expunge(row)
        return row


# Table columns, not an entity's, and built once: every request pays for this read, and a Core
# statement skips the ORM's execution path.
_TOKENS = ApiToken.__table__.c
_TOKEN_ROW = select(_TOKENS.id, _TOKENS.tenant, _TOKENS.revoked_at, _TOKENS.expires_at,
                    _TOKENS.last_used_at).where(_TOKENS.token_hash == bindparam("hash"))
_TOUCH = update(ApiToken.__table__).where(_TOKENS.id == bindparam("token_id"))


def authenticate() -> None:
    """before_request for /v1: sets g.tenant or answers 401."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "unauthorized", "missing bearer token", "Authorization")
    now = utcnow()
    with autocommit() as conn:  # a lone read (and at most once a minute a lone write)
        row = conn.execute(_TOKEN_ROW, {"hash": _hash(token.strip())}).first()
        reason = refusal(row, now)
        if reason is not None or row is None:
            raise ApiError(401, "unauthorized", reason or "invalid token", "Authorization")
        if row.last_used_at is None or now - row.last_used_at >= LAST_USED_RESOLUTION:
            conn.execute(_TOUCH, {"token_id": row.id, "last_used_at": now})
        g.tenant = row.tenant


def tenant() -> str:
    return str(g.tenant)
