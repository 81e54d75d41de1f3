"""No input produces a 500: schemathesis generates requests from the app's own /openapi.json and
sends them to the app (WSGI) backed by a real PostgreSQL state database and Redis broker. No worker
runs here: what is accepted stays queued, which is all the API itself promises."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from api import create_app
from api.auth import create_token
from tests.conftest import create_database, drop_database, make_data_root
from tests.stack import reset_caches

pytestmark = pytest.mark.integration

STATE: dict[str, str] = {}


@pytest.fixture(scope="module")
def fuzz_app(request) -> Iterator[object]:
    import shutil

    import redis

    from tests.stack import claim_redis_db, release_redis_db

    mp = pytest.MonkeyPatch()
    root = make_data_root()
    name, url = create_database()
    db = claim_redis_db()
    broker = f"redis://127.0.0.1:6379/{db}"
    for key, value in {"ENVCLONE_DATA_DIR": str(root), "ENVCLONE_DATABASE_URL": url,
                       "ENVCLONE_BROKER_URL": broker, "ENVCLONE_ADDRESS_POOL": "127.98.0.0/16"}.items():
        mp.setenv(key, value)
    reset_caches()
    from shared.migrate import upgrade

    upgrade(url)
    STATE["token"] = create_token("fuzz")
    app = create_app()
    yield app
    redis.Redis.from_url(broker).flushdb()
    release_redis_db(db)
    reset_caches()
    drop_database(name)
    mp.undo()
    reset_caches()
    shutil.rmtree(root, ignore_errors=True)


def test_no_input_causes_a_server_error(fuzz_app) -> None:
    """Every operation of the document, 40 generated requests each (valid and invalid ones)."""
    schema = schemathesis.openapi.from_wsgi("/openapi.json", fuzz_app)
    headers = {"Authorization": f"Bearer {STATE['token']}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    calls = {"n": 0}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case) -> None:
            if case.path.endswith("/events"):
                case.query = {**(case.query or {}), "last_event_id": "0"}
            calls["n"] += 1
            case.call_and_validate(headers=headers, checks=[not_a_server_error])

        run()
    assert calls["n"] >= 10 * len(operations)
