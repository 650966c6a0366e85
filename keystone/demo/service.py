"""A tiny demo service with a ``/healthz`` endpoint.

``python -m keystone.demo.service --name api --port 18183 --needs http://127.0.0.1:18182/healthz``
serves ``/healthz`` (200 once every ``--needs`` URL answered 200 at start) and ``/`` with a JSON
greeting. It exits with status 1 if its port is taken, printing why.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--needs", action="append", default=[])
    args = parser.parse_args(argv)
    started = time.time()

    for url in args.needs:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status != 200:
                    raise OSError(f"HTTP {resp.status}")
        except OSError as exc:
            print(
                f"{args.name}: dependency {url} is not healthy: {exc}", file=sys.stderr, flush=True
            )
            return 1

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/healthz":
                body = {
                    "status": "ok",
                    "service": args.name,
                    "uptime": round(time.time() - started, 1),
                }
            else:
                body = {
                    "hello": "from " + args.name,
                    "version": os.environ.get("KEYSTONE_VERSION", ""),
                }
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *a: object) -> None:
            return

    try:
        server = HTTPServer(("127.0.0.1", args.port), Handler)
    except OSError as exc:
        print(
            f"{args.name}: cannot listen on 127.0.0.1:{args.port}: {exc.strerror}",
            file=sys.stderr,
            flush=True,
        )
        return 1

    def stop(*_: object) -> None:
        server.server_close()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    print(f"{args.name}: listening on 127.0.0.1:{args.port}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
