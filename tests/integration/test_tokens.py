"""API tokens through the real CLI (`python -m api.cli token ...` against a fresh PostgreSQL
database) and the API's answer to them: a revoked or expired token gets 401, and `token list`
shows every token's id, tenant, times and state but never the token."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import timedelta

import pytest
from sqlalchemy import update

from api import create_app
from shared.db import session_scope
from shared.models import ApiToken, utcnow
from tests.helpers import wait_for
from tests.stack import Backend

pytestmark = [pytest.mark.integration, pytest.mark.long]

BACKEND = {"pool": "127.115.0.0/16"}


def envclone(backend: Backend, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENVCLONE_")}
    env.update(backend.env)
    return subprocess.run([sys.executable, "-m", "api.cli", *args], env=env, capture_output=True, text=True,
                          timeout=60)


def create(backend: Backend, tenant: str, *extra: str) -> tuple[str, str]:
    """(token, id) from `envclone token create`: the token alone on stdout, its id on stderr."""
    done = envclone(backend, "token", "create", "--tenant", tenant, *extra)
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert token.startswith("ec_") and "\n" not in token
    match = re.search(r"token ([0-9a-f]{32}) for tenant " + tenant, done.stderr)
    assert match, done.stderr
    return token, match.group(1)


def listed(backend: Backend) -> dict[str, dict[str, str]]:
    """`envclone token list` parsed: rows by id, cells by column header."""
    done = envclone(backend, "token", "list")
    assert done.returncode == 0, done.stderr
    header, *lines = done.stdout.splitlines()
    assert re.split(r"\s{2,}", header) == ["ID", "TENANT", "CREATED", "EXPIRES", "LAST USED", "STATE"]
    # Column starts from the header: cells may hold one space (a date and a time).
    starts = [header.index(col) for col in ("ID", "TENANT", "CREATED", "EXPIRES", "LAST USED", "STATE")]
    rows = {}
    for line in lines:
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
        rows[cells[0]] = dict(zip(("id", "tenant", "created", "expires", "last used", "state"), cells, strict=True))
    rows["__text__"] = {"text": done.stdout}
    return rows


@pytest.fixture(scope="module")
def client(backend: Backend):
    return create_app().test_client()


def status(client, token: str) -> tuple[int, str]:
    response = client.get("/v1/environments", headers={"Authorization": f"Bearer {token}"})
    return response.status_code, (response.json or {}).get("error", {}).get("message", "")


def test_list_and_revoke_through_the_cli(backend: Backend, client) -> None:
    acme, acme_id = create(backend, "acme")
    globex, globex_id = create(backend, "globex", "--expires-in", "30d")

    rows = listed(backend)
    assert rows[acme_id]["tenant"] == "acme" and rows[acme_id]["expires"] == "-"
    assert rows[acme_id]["state"] == "active" and rows[acme_id]["last used"] == "-"
    assert rows[globex_id]["tenant"] == "globex" and rows[globex_id]["state"] == "active"
    created = rows[globex_id]["created"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", created)
    assert rows[globex_id]["expires"] > created  # 30 days on, same format: compares as text
    # Never the token (nor its hash) in the listing.
    text = rows["__text__"]["text"]
    assert acme not in text and globex not in text and "ec_" not in text
    with session_scope() as session:
        hashes = [t.token_hash for t in session.query(ApiToken)]
    assert not any(h in text for h in hashes)

    assert status(client, acme) == (200, "")
    assert listed(backend)[acme_id]["last used"] != "-"

    revoked = envclone(backend, "token", "revoke", acme_id)
    assert revoked.returncode == 0 and f"revoked token {acme_id} of tenant acme" in revoked.stdout, revoked.stderr
    assert status(client, acme) == (401, "token revoked")
    assert status(client, globex) == (200, "")  # another token is untouched
    rows = listed(backend)
    assert rows[acme_id]["state"] == "revoked" and rows[globex_id]["state"] == "active"

    again = envclone(backend, "token", "revoke", acme_id)
    assert again.returncode == 1 and "already revoked" in again.stderr
    unknown = envclone(backend, "token", "revoke", "0" * 32)
    assert unknown.returncode == 1 and "no token with id" in unknown.stderr
    assert status(client, acme)[0] == 401


def test_a_token_expires(backend: Backend, client) -> None:
    token, token_id = create(backend, "acme", "--expires-in", "4s")
    assert status(client, token) == (200, "")  # well inside its 4 seconds: the CLI returned after the commit
    wait_for(lambda: status(client, token) == (401, "token expired"), timeout=20, interval=0.2,
             what="the token to expire")
    assert listed(backend)[token_id]["state"] == "expired"


def test_expired_or_revoked_rows_get_401(backend: Backend, client) -> None:
    """The rule on the row itself, whoever set it: an expiry in the past, a revocation."""
    expired, expired_id = create(backend, "acme", "--expires-in", "1h")
    revoked, revoked_id = create(backend, "acme")
    assert status(client, expired) == (200, "") and status(client, revoked) == (200, "")
    with session_scope() as session:
        session.execute(update(ApiToken).where(ApiToken.id == expired_id)
                        .values(expires_at=utcnow() - timedelta(seconds=1)))
        session.execute(update(ApiToken).where(ApiToken.id == revoked_id).values(revoked_at=utcnow()))
    assert status(client, expired) == (401, "token expired")
    assert status(client, revoked) == (401, "token revoked")
    response = client.get("/v1/environments", headers={"Authorization": f"Bearer {expired}"})
    assert response.json["error"] == {"code": "unauthorized", "message": "token expired", "field": "Authorization"}


@pytest.mark.parametrize("value", ["0d", "30", "1.5h"])
def test_bad_expiry_is_refused(backend: Backend, value: str) -> None:
    done = envclone(backend, "token", "create", "--tenant", "acme", "--expires-in", value)
    assert done.returncode == 2 and "--expires-in" in done.stderr and done.stdout == ""
