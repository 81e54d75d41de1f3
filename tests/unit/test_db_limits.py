"""The limits every PostgreSQL session of ours carries (shared.db) and what settings allow."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared.config import Settings
from shared.db import _server_side_limits, session_options


def test_the_server_ends_hung_transactions_and_drops_vanished_clients() -> None:
    assert _server_side_limits(300).split(" -c ") == [
        "-c tcp_keepalives_idle=60", "tcp_keepalives_interval=10", "tcp_keepalives_count=6",
        "idle_in_transaction_session_timeout=300000"]
    assert "idle_in_transaction" not in _server_side_limits(0)  # 0: never


def test_the_deployments_own_session_options_are_kept_before_ours(monkeypatch: pytest.MonkeyPatch) -> None:
    ours = _server_side_limits(300)
    monkeypatch.delenv("PGOPTIONS", raising=False)
    assert session_options("postgresql+psycopg://h/db", 300) == ours
    url = "postgresql+psycopg://h/db?options=-c%20search_path%3Dapp"
    assert session_options(url, 300) == f"-c search_path=app {ours}"
    monkeypatch.setenv("PGOPTIONS", "-c statement_timeout=7000")
    assert session_options("postgresql+psycopg://h/db", 300) == f"-c statement_timeout=7000 {ours}"
    assert session_options(url, 300) == f"-c search_path=app {ours}"  # the URL's, as libpq would


@pytest.mark.parametrize("seconds", [0, 180, 300])
def test_an_idle_transaction_limit_of_0_or_past_our_own_longest_wait_is_taken(seconds: float) -> None:
    assert Settings(db_idle_tx_timeout_s=seconds, health_timeout_s=60).db_idle_tx_timeout_s == seconds


def test_an_idle_transaction_limit_that_would_end_our_own_restarts_is_refused() -> None:
    with pytest.raises(ValidationError, match="ENVCLONE_DB_IDLE_TX_TIMEOUT_S must be 0 or at least 180"):
        Settings(db_idle_tx_timeout_s=100, health_timeout_s=60)
