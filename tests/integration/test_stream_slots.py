"""Stream slots in a real Redis: the per-tenant count, its Retry-After, release, and the slot of a
process that died (never released, never refreshed) freeing itself."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from api import streams
from api.errors import ApiError
from api.streams import StreamLimiter
from tests.helpers import wait_for
from tests.stack import claim_redis_db, release_redis_db

pytestmark = pytest.mark.integration


@pytest.fixture
def redis_url() -> Iterator[str]:
    db = claim_redis_db()
    url = f"redis://127.0.0.1:6379/{db}"
    yield url
    redis.Redis.from_url(url).flushdb()
    release_redis_db(db)


def test_the_cap_counts_open_slots_and_names_when_to_retry(redis_url: str) -> None:
    one, two = (StreamLimiter(redis_url, per_tenant=2, max_stream_s=120, threads=64) for _ in range(2))
    a, b = one.acquire("t"), two.acquire("t")  # two processes, one count
    with pytest.raises(ApiError) as refused:
        one.acquire("t")
    assert (refused.value.status, refused.value.code) == (429, "too_many_streams")
    assert 110 <= int(refused.value.headers["Retry-After"]) <= 120
    assert two.acquire("u").member  # another tenant
    a.release()
    a.release()  # idempotent: frees one slot, not two
    c = one.acquire("t")
    with pytest.raises(ApiError):
        two.acquire("t")
    for slot in (b, c):
        slot.release()
    assert one.in_process == 0 and two.in_process == 1


def test_a_slot_nobody_refreshes_frees_itself(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streams, "SLOT_TTL_S", 1.0)
    monkeypatch.setattr(streams, "REFRESH_S", 0.0)
    limiter = StreamLimiter(redis_url, per_tenant=1, max_stream_s=60, threads=64)
    kept, _lost = limiter.acquire("kept"), limiter.acquire("lost")  # "lost": its process died with it open

    def lost_slot_free() -> bool:
        kept.keep()  # the live stream refreshes its slot as it runs
        return _acquired(limiter, "lost")

    wait_for(lost_slot_free, timeout=10, interval=0.2, what="the dead stream's slot to expire")
    with pytest.raises(ApiError):  # past its TTL too, the refreshed slot still counts
        limiter.acquire("kept")


def _acquired(limiter: StreamLimiter, tenant: str) -> bool:
    try:
        limiter.acquire(tenant)
    except ApiError:
        return False
    return True
