#!/usr/bin/env python
"""A local web page for a run or a bundle: upload an image, see each task's answer and the experts
each patch was routed to; a JSON API underneath (docs/serve.md).

    python tools/serve.py runs/synthetic                    # http://127.0.0.1:8000
    python tools/serve.py experts/det --port 8080
    python tools/serve.py runs/synthetic --host 0.0.0.0     # reachable from other machines (careful)

Needs the serve extra: pip install -e '.[serve]'.
"""
from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

from moe_vision.cli import user_errors
from moe_vision.data.readers import DEFAULT_MAX_PIXELS
from moe_vision.errors import MissingExtra


def check_port(host: str, port: int) -> None:
    """One line instead of a server traceback when the address is taken."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise ValueError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port") from None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path, help="a run directory (model.safetensors) or a bundle folder (bundle.json)")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--max-upload-mb", type=float, default=10.0, help="larger uploads are refused")
    ap.add_argument("--max-megapixels", type=float, default=DEFAULT_MAX_PIXELS / 1e6,
                    help="larger images are refused before decoding (default %(default)g, as tools/predict.py)")
    ap.add_argument("--max-queue", type=int, default=4, help="requests that may wait while one runs")
    args = ap.parse_args()
    with user_errors():
        try:
            import uvicorn
            from moe_vision.serve import create_app
            import fastapi  # noqa: F401
        except ImportError as e:
            raise MissingExtra(f"tools/serve.py needs the serve extra ({e.name} is missing): "
                               "pip install -e '.[serve]'") from None
        if not 0 < args.port < 65536:
            raise ValueError(f"--port must be in 1..65535, got {args.port}")
        check_port(args.host, args.port)
        app = create_app(args.source.resolve() if args.source.exists() else args.source, args.max_upload_mb,
                         int(args.max_megapixels * 1e6), args.max_queue, args.device)
        print(f"serving {args.source} at http://{args.host}:{args.port}  (API: /docs; Ctrl-C stops)", flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
