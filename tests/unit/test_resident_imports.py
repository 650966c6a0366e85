"""What the resident agent does not load: modules only a scrape, a sync or a patch needs."""

from __future__ import annotations

import subprocess
import sys

NOT_RESIDENT = (
    "prometheus_client",  # /metrics is written by keystone.metrics
    "platform",  # keystone_build_info reads sys.version
    "keystone.delta",  # recipes need only keystone.deltaspec
    "gzip",
    "bsdiff4",
    "zstandard",
    "apscheduler",  # the poll schedule is a loop timer (keystone.sync.scheduler)
    "http.server",  # the API's requests are read by keystone.api.http1
    "http.client",
    "email",
    "html",
    "ssl",  # OpenSSL loads at the first TLS use or file hash (keystone.openssl)
    "_ssl",
    "hashlib",
    "_hashlib",
    "hmac",
    "secrets",
)


class TestResidentImports:
    def test_the_agent_and_a_scrape_load_no_patcher_or_prometheus_client(self) -> None:
        """Importing the agent, parsing a recipe with a delta and rendering the metrics load
        none of prometheus-client, platform, the delta patcher or its libraries, apscheduler,
        or http.server and the email package under it; nor OpenSSL, as the agent's command
        line imports asyncio (keystone.cli.main)."""
        code = (
            "import sys\n"
            "from keystone.openssl import asyncio_without_ssl\n"
            "assert asyncio_without_ssl()\n"
            "import keystone.agent, keystone.api\n"
            "from keystone.sync.scheduler import SyncScheduler\n"
            "from keystone.metrics import Metrics\n"
            "from keystone.deltaspec import parse_delta_table\n"
            "spec = parse_delta_table({'server': 'https://ota.example', 'sha256': 'a' * 64})\n"
            "assert spec is not None\n"
            "assert Metrics().render()[0]\n"
            f"print([m for m in {NOT_RESIDENT!r} if m in sys.modules])\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout == "[]\n"
