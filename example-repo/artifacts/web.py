"""A small web service for the example fleet: GET / says hello, GET /healthz answers 200."""

import argparse
import json
import os
import signal
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

parser = argparse.ArgumentParser()
parser.add_argument("--name", default="web")
parser.add_argument("--port", type=int, required=True)
parser.add_argument("--message", default="hello")
args = parser.parse_args()
started = time.time()


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/healthz":
            body = {"status": "ok", "uptime": round(time.time() - started, 1)}
        else:
            body = {"service": args.name, "message": args.message, "version": os.environ.get("KEYSTONE_VERSION")}
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


try:
    server = HTTPServer(("127.0.0.1", args.port), Handler)
except OSError as exc:
    sys.exit(f"{args.name}: cannot listen on 127.0.0.1:{args.port}: {exc.strerror}")
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print(f"{args.name} listening on 127.0.0.1:{args.port}", flush=True)
server.serve_forever()
