"""Bearer tokens: each belongs to a tenant; only a SHA-256 of it is stored."""

from __future__ import annotations

import hashlib
import secrets

from flask import g, request
from sqlalchemy import select

from api.errors import ApiError
from shared.db import session_scope
from shared.models import ApiToken

PREFIX = "ec_"


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(tenant: str) -> str:
    """Make a token for ``tenant``; the plain token is returned once and never stored."""
    token = PREFIX + secrets.token_urlsafe(32)
    with session_scope() as session:
        session.add(ApiToken(tenant=tenant, token_hash=_hash(token)))
    return token


def authenticate() -> None:
    """before_request for /v1: sets g.tenant or answers 401."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "unauthorized", "missing bearer token", "Authorization")
    with session_scope() as session:
        tenant = session.scalar(select(ApiToken.tenant).where(ApiToken.token_hash == _hash(token.strip())))
    if tenant is None:
        raise ApiError(401, "unauthorized", "invalid token", "Authorization")
    g.tenant = tenant


def tenant() -> str:
    return str(g.tenant)
