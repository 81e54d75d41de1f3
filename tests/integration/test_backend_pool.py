"""Two test back ends over one address pool at once (one module's tests spread over two xdist
workers, each building the module's back end) each lease the pool's lowest address to their first
node, from their own state database: one server then fails "address already in use", at random.
The harness refuses the second back end at once, by name."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.stack import Backend, PoolInUse, claim_pool

pytestmark = pytest.mark.integration

POOL = "127.89.0.0/16"  # a pool no other module uses
ROOT = Path(__file__).resolve().parents[2]
HOLDER = """
import sys
from tests.stack import Backend
with Backend(pool=sys.argv[1]):
    print("up", flush=True)
    sys.stdin.read()  # until the test closes our stdin
"""


def test_a_second_backend_over_a_pool_in_use_is_refused_by_name() -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, POOL], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline() == "up\n", "the holding back end did not come up"
        try:
            second = Backend(pool=POOL)
        except PoolInUse as exc:
            assert f"pid {holder.pid}" in str(exc) and "--dist loadfile" in str(exc)
        else:
            with second:  # made, as before the claim: clean it up, then fail
                pass
            pytest.fail(f"a second back end was made over {POOL} while another process's used it")
    finally:
        holder.stdin.close()
        assert holder.wait(timeout=120) == 0
    os.close(claim_pool(POOL))  # the holder's exit released it: the next back end may take it
