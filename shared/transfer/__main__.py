"""Run a transfer server, or pull a snapshot, as a process. The secret comes from the environment
(ENVCLONE_CLUSTER_SECRET), never from the command line where `ps` would show it.

    python -m shared.transfer serve --snaps-dir D --bind HOST:PORT [--max-rate BYTES_PER_S]
    python -m shared.transfer pull --url http://HOST:PORT --snapshot ID --dest D
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from shared.transfer import TransferError, TransferServer, pull

SECRET_ENV = "ENVCLONE_CLUSTER_SECRET"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.transfer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("--snaps-dir", type=Path, required=True)
    serve.add_argument("--bind", required=True, help="HOST:PORT")
    serve.add_argument("--max-rate", type=int, default=None, help="bytes/s per file stream")
    get = sub.add_parser("pull")
    get.add_argument("--url", required=True)
    get.add_argument("--snapshot", required=True)
    get.add_argument("--dest", type=Path, required=True)
    args = parser.parse_args(argv)
    secret = os.environ.get(SECRET_ENV, "")
    if not secret:
        parser.error(f"{SECRET_ENV} is not set")
    if args.cmd == "serve":
        host, _, port = args.bind.rpartition(":")
        server = TransferServer(args.snaps_dir, secret, host, int(port), max_rate=args.max_rate)
        print(json.dumps({"event": "listening", "url": server.url}), flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        return 0
    started = time.perf_counter()
    try:
        result = pull(args.url, secret, args.snapshot, args.dest)
    except TransferError as exc:
        print(json.dumps({"event": "failed", "error": str(exc), "retryable": exc.retryable}), flush=True)
        return 75 if exc.retryable else 1  # EX_TEMPFAIL: worth another try
    print(json.dumps({"event": "pulled", **asdict(result), "seconds": time.perf_counter() - started}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
