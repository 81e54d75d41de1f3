"""Which online method a Valkey node is copied by: the setting, whether the node persists to its
append-only file, and whether the data root can reflink."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.config import get_settings
from shared.stacks import valkey
from shared.stacks.valkey import OnlineMethod, ValkeyStack


class Persistence:
    """What INFO persistence says about the append-only file (the one field the choice reads)."""

    def __init__(self, aof_enabled: bool) -> None:
        self.aof_enabled = aof_enabled

    def info(self, section: str) -> dict[str, int]:
        assert section == "persistence"
        return {"aof_enabled": int(self.aof_enabled)}


@pytest.fixture
def setting(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    def set_to(value: str) -> None:
        monkeypatch.setenv("ENVCLONE_VALKEY_ONLINE_METHOD", value)
        get_settings.cache_clear()

    yield set_to
    get_settings.cache_clear()


@pytest.mark.parametrize(("wanted", "aof", "reflink", "chosen"), [
    ("auto", True, True, OnlineMethod.AOF_PAUSE),
    ("auto", True, False, OnlineMethod.AOF),
    ("auto", False, True, OnlineMethod.BGSAVE),
    ("aof", True, True, OnlineMethod.AOF),
    ("aof_pause", True, True, OnlineMethod.AOF_PAUSE),
    ("bgsave", True, True, OnlineMethod.BGSAVE),
])
def test_method_chosen(setting, monkeypatch: pytest.MonkeyPatch, wanted: str, aof: bool,  # noqa: ANN001
                       reflink: bool, chosen: OnlineMethod) -> None:
    setting(wanted)
    monkeypatch.setattr(valkey, "reflink_at", lambda where: reflink)
    assert ValkeyStack.online_method(Persistence(aof), Path("/data")) is chosen  # type: ignore[arg-type]


@pytest.mark.parametrize(("wanted", "aof", "reflink", "said"), [
    ("aof_pause", True, False, "needs a data root that can reflink"),
    ("aof_pause", False, True, "does not persist to an append-only file"),
    ("aof", False, True, "does not persist to an append-only file"),
])
def test_a_method_that_cannot_be_had_is_refused_saying_why(setting, monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
                                                           wanted: str, aof: bool, reflink: bool, said: str) -> None:
    setting(wanted)
    monkeypatch.setattr(valkey, "reflink_at", lambda where: reflink)
    with pytest.raises(RuntimeError, match=said):
        ValkeyStack.online_method(Persistence(aof), Path("/data"))  # type: ignore[arg-type]
