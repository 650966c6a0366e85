"""A test component: records its start, serves /healthz, can crash or stay unhealthy on purpose.

svc.py --name NAME --port N --log FILE [--unhealthy] [--exit-after S --code C] [--ignore-term]
       [--term-delay S]
"""

import argparse
import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

p = argparse.ArgumentParser()
p.add_argument("--name", required=True)
p.add_argument("--port", type=int, default=0)
p.add_argument("--log", required=True)
p.add_argument("--unhealthy", action="store_true")
p.add_argument("--exit-after", type=float, default=None)
p.add_argument("--code", type=int, default=1)
p.add_argument("--ignore-term", action="store_true")
p.add_argument("--tag", default="")
p.add_argument("--term-delay", type=float, default=0.0)
a = p.parse_args()

with open(a.log, "a") as f:
    f.write(
        json.dumps(
            {
                "name": a.name,
                "pid": os.getpid(),
                "t": time.time(),
                "tag": a.tag,
                "version": os.environ.get("KEYSTONE_VERSION"),
            }
        )
        + "\n"
    )

if a.ignore_term:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
elif a.term_delay:
    # A graceful shutdown that takes a while (connections drained, state flushed).
    signal.signal(
        signal.SIGTERM, lambda *_: threading.Timer(a.term_delay, lambda: os._exit(0)).start()
    )
else:
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))

if a.exit_after is not None:
    threading.Timer(a.exit_after, lambda: os._exit(a.code)).start()


class H(BaseHTTPRequestHandler):
    def do_GET(self):
        code = 500 if a.unhealthy else 200
        body = json.dumps({"name": a.name, "tag": a.tag}).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


if a.port:
    try:
        HTTPServer(("127.0.0.1", a.port), H).serve_forever()
    except OSError as exc:
        print(f"{a.name}: port {a.port}: {exc.strerror}", file=sys.stderr, flush=True)
        sys.exit(3)
else:
    while True:
        time.sleep(3600)
