"""One typed settings object, read from ``ENVCLONE_*`` environment variables."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.states import FaultKind, FaultPoint


class FaultSpec(BaseModel):
    """Make ``step`` fail ``times`` times for the source node named ``node`` (``*`` = every node)."""

    model_config = {"extra": "forbid"}

    step: FaultPoint
    node: str = "*"
    times: int = Field(default=1, ge=1)
    kind: FaultKind = FaultKind.TRANSIENT
    seconds: float = Field(default=0.0, ge=0, le=600)


# The longest our own transactions sit idle, past a health check: a node's stop, or an account's
# removal with its retries (shared.identity).
IDLE_TX_MARGIN_S = 120.0


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ENVCLONE_", extra="ignore")

    data_dir: Path = Path("./var")
    database_url: str = ""  # empty: SQLite file under data_dir
    # Connections each process keeps open once it needed them: an API process serves many requests
    # at once, and a connection opened past the kept ones is closed after one use (under 50
    # clients, a third of the requests paid for a new PostgreSQL session). Opened only on demand.
    db_pool_size: int = Field(default=16, ge=1)
    db_pool_overflow: int = Field(default=4, ge=0)
    broker_url: str = "redis://127.0.0.1:6379/0"
    result_backend: str = ""  # empty: same as broker_url
    address_pool: str = "127.80.0.0/16"
    host_name: str = "local"  # the host this process's driver acts on
    # Whether this worker is its host's agent (consumes envclone.host.<name>): the only process that
    # touches that host's nodes. General workers of a cluster set it false.
    agent: bool = True
    orchestrate: bool = True  # whether this worker also runs orchestration (the general queue)
    host_down_s: float = 30.0  # an agent silent this long marks its host down
    heartbeat_s: float = 0.0  # 0: a quarter of host_down_s
    # Agents authenticate snapshot transfers between them with it (same value on every host).
    cluster_secret: str = ""
    transfer_bind: str = ""  # host:port where this agent serves its snapshots to other agents ("" = none)
    transfer_url: str = ""  # how other agents reach it (default: http://<transfer_bind>)
    transfer_max_rate: int = Field(default=0, ge=0)  # bytes/s per stream it serves (0: no cap; a shared link)
    # Unprivileged account that runs node processes when envclone itself runs as root.
    node_user: str = "nobody"
    max_nodes: int = 64
    # Refuse to run an environment whose kernel fence cannot be set up (no nftables, not root).
    require_fence: bool = False
    # PostgreSQL online copies: backup_api (pg_backup_start + copy/reflink), basebackup
    # (pg_basebackup -X stream), auto (the one measured better on the data root's filesystem).
    pg_online_method: Literal["backup_api", "basebackup", "auto"] = "auto"
    pg_basebackup_max_rate: str = ""  # pg_basebackup --max-rate (e.g. "100M"); empty: unthrottled
    # Byte copies (snapshots, provisioning) write back every this many MiB and wait for the window
    # before, so a served database's commit fsyncs queue behind at most two windows of a copy's
    # writes, never gigabytes of dirty pages (bench/realclient.py: at 4 GiB under pgbench, 8 MiB gave
    # 41-84 ms client gaps, 2 MiB 23-25 ms, at the same copy throughput). 0: off.
    copy_write_behind_mib: int = Field(default=2, ge=0)
    # A clone's volume is the job's own snapshot moved into place (a rename) when the snapshot is on
    # the clone's host and the job keeps no snapshot (retain_snapshots, keep_on_failure); false:
    # always a copy.
    provision_move: bool = True
    # Valkey online copies: aof (a prefix of the append-only files, no fork), aof_pause (the live
    # append-only file reflinked under a pause of writes of a few ms; needs a reflink data root),
    # bgsave (a fork snapshot), auto (aof_pause where the data root can reflink, else aof, when the
    # node persists to the append-only file; else bgsave).
    valkey_online_method: Literal["aof", "aof_pause", "bgsave", "auto"] = "auto"
    # MariaDB online copies: reflink (every file reflinked under BACKUP STAGE BLOCK_DDL, checked
    # against the engines' checkpoints; needs a reflink data root), backup (mariadb-backup), auto
    # (reflink where the data root can, falling back to backup).
    mariadb_online_method: Literal["reflink", "backup", "auto"] = "auto"

    # Workflow timing.
    task_time_limit_s: int = 900
    visibility_timeout_s: int = 3600
    retry_max: int = 5
    retry_base_s: float = 1.0
    retry_cap_s: float = 30.0
    health_timeout_s: float = 60.0
    max_downtime_s: float = 120.0
    # PostgreSQL ends a session of ours that sits idle inside a transaction this long, and its row
    # locks go with it: a process hung mid-transaction, or a host gone without a reset (power, a
    # cut network: the server would wait hours for TCP to notice), cannot hold rows others wait on
    # for longer. 0: never. Server-side TCP keepalives also drop such a host's idle sessions.
    db_idle_tx_timeout_s: float = Field(default=300.0, ge=0)
    broker_wait_s: float = 180.0  # a step waits this long for the broker before its chain goes on
    db_wait_s: float = 180.0  # a worker waits this long for the state database before a step gives up

    # The API server (gunicorn, api/gunicorn_conf.py) and its event streams.
    api_workers: int = Field(default=2, ge=1)
    api_threads: int = Field(default=128, ge=2)  # per worker process: each open event stream holds one
    max_streams_per_tenant: int = Field(default=20, ge=0)  # open SSE streams, across every API process
    max_stream_s: float = Field(default=300.0, gt=0)  # then the stream ends with `resume` (clients reconnect)

    # Watchdog (celery beat).
    watchdog_interval_s: float = 10.0
    job_stall_s: float = 0.0  # 0: task time limit + retry cap + 2 minutes
    max_resumes: int = 3
    dispatch_grace_s: float = 30.0
    # A watchdog round waits this long for a row another transaction holds, then leaves that job
    # (or rule) to its next round: one stuck holder must not silence supervision of everything.
    watchdog_lock_wait_s: float = Field(default=5.0, gt=0)
    lock_wait_s: float = 1800.0

    # Fault injection: off unless enabled; ``faults`` applies to every job,
    # a job's own ``options.faults`` only when ``fault_injection`` is on.
    fault_injection: bool = False
    faults: list[FaultSpec] = []

    @field_validator("faults", mode="before")
    @classmethod
    def _parse_faults(cls, value: object) -> object:
        if isinstance(value, str):
            return json.loads(value) if value.strip() else []
        return value

    @model_validator(mode="after")
    def _idle_tx_outlasts_our_own_waits(self) -> Settings:
        # Our own transactions stay open across one server restart (stop, start, health check) or
        # one account removal: the server must not end them as hung.
        floor = self.health_timeout_s + IDLE_TX_MARGIN_S
        if 0 < self.db_idle_tx_timeout_s < floor:
            raise ValueError(f"ENVCLONE_DB_IDLE_TX_TIMEOUT_S must be 0 or at least {floor:.0f} "
                             f"(ENVCLONE_HEALTH_TIMEOUT_S + {IDLE_TX_MARGIN_S:.0f})")
        return self

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'envclone.sqlite3').resolve()}"

    @property
    def resolved_job_stall_s(self) -> float:
        return self.job_stall_s or (self.task_time_limit_s + self.retry_cap_s + 120)

    @property
    def resolved_heartbeat_s(self) -> float:
        return self.heartbeat_s or max(self.host_down_s / 4, 0.5)

    @property
    def resolved_transfer_url(self) -> str:
        return self.transfer_url or (f"http://{self.transfer_bind}" if self.transfer_bind else "")

    @property
    def resolved_result_backend(self) -> str:
        return self.result_backend or self.broker_url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
