#!/usr/bin/env python
"""A bounded load test of tools/serve.py on 127.0.0.1.

    python tools/serve_load.py runs/synthetic
    python tools/serve_load.py experts/det --clients 8 --requests 200 --json serve_load.json

Starts the server in its own process with small limits (--upload-limit-mb, --max-megapixels,
--max-queue), sends --requests requests from --clients concurrent clients, mixing good PNG images
with bytes that are no image, uploads over the size limit and images over the pixel limit, and
reports the status codes per kind (200, 400, 413, 503 when the queue is full), the latency
percentiles, the server's resident memory before and after, and whether it still answers.
Exits with status 1 if a request got no answer or the server stopped answering.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moe_vision.bench.serve_load import format_report, load_test
from moe_vision.cli import user_errors


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path, help="a run directory or a bundle folder (as for tools/serve.py)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--upload-limit-mb", type=float, default=1.0)
    ap.add_argument("--max-megapixels", type=float, default=1.0)
    ap.add_argument("--max-queue", type=int, default=4)
    ap.add_argument("--json", type=Path, default=None, help="also write the report as JSON")
    args = ap.parse_args()
    with user_errors():
        if args.clients < 1 or args.requests < 1:
            raise ValueError("--clients and --requests must be at least 1")
        if not args.source.exists():
            raise FileNotFoundError(f"{args.source} does not exist (a run directory or a bundle folder)")
        report = load_test(args.source, args.clients, args.requests, args.upload_limit_mb,
                           int(args.max_megapixels * 1e6), args.max_queue)
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if report["unanswered"] == 0 and report["alive_after"] else 1


if __name__ == "__main__":
    sys.exit(main())
