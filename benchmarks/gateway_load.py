"""The gateway's load test at full size: 32 concurrent clients x 2,000 requests each.

The test suite runs the same check at 2,048 requests in all (tests/test_gateway_load.py); this is
the 64,000-request version: `distillscope serve --teacher synthetic` with a DuckDB log (or
``--db postgresql://...``), every 8th request streamed, then the log checked against what clients
were told: zero 5xx, exactly one whole row per 200, nothing else.

    .venv/bin/python benchmarks/gateway_load.py [--clients 32] [--per-client 2000] [--db URL]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from collections import Counter
from pathlib import Path

from distillscope.gateway import KeyStore
from distillscope.gateway.loadtest import GatewayProcess, run_load
from distillscope.gateway.traffic import read_traffic

TIERS = (
    "tiers:\n  load:\n    exposure: top5\n    requests_per_minute: null\n"
    "    tokens_per_minute: null\n    concurrency: null\n"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--per-client", type=int, default=2000)
    parser.add_argument("--db", help="a postgresql:// URL (default: a DuckDB file)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "tiers.yaml").write_text(TIERS)
        key = KeyStore(root / "keys.sqlite").create("loader", "load")[1]
        db = args.db or str(root / "traffic.duckdb")
        server = GatewayProcess(
            "--db", db, "--keys", str(root / "keys.sqlite"), "--tiers", str(root / "tiers.yaml")
        ).start()  # fmt: skip
        try:
            result = asyncio.run(
                run_load(
                    server.url,
                    key,
                    model="distillscope-synthetic",
                    clients=args.clients,
                    requests=args.clients * args.per_client,
                    stream_every=8,
                    deadline=3600,
                )
            )
        finally:
            server.stop()
        rows = read_traffic(db)
    ids = rows["exchange_id"].to_pylist()
    statuses = Counter(rows["status"].to_pylist())
    acknowledged = set(result.acknowledged)
    summary = {
        "load": result.summary(),
        "log_rows": len(ids),
        "log_rows_distinct": len(set(ids)),
        "log_statuses": {str(k): v for k, v in statuses.items()},
        "acknowledged": len(acknowledged),
        "acknowledged_missing_from_log": len(acknowledged - set(ids)),
        "log_rows_not_acknowledged": len(set(ids) - acknowledged),
        "five_xx": result.server_errors,
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
