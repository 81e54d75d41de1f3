"""The embedded default: SQLite as the state database, shared by a real prefork worker."""

from __future__ import annotations

import pytest

from tests.integration.test_clone_workflow import check_three_node_clone
from tests.stack import Backend
from tests.workflow_client import delete_environment, lease_count

pytestmark = pytest.mark.integration


def test_three_node_clone_on_sqlite() -> None:
    with Backend(database="sqlite", pool="127.94.0.0/16") as backend:
        assert backend.db_url.startswith("sqlite")
        check_three_node_clone(backend)
        delete_environment("shop-stage")
        delete_environment("shop")
        assert backend.volumes() == set() and lease_count() == 0
