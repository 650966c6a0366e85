"""validate_check: which health check strings a recipe may carry."""

from __future__ import annotations

import pytest

from keystone.runtime.health import validate_check

GOOD = [
    "http://127.0.0.1:8081/healthz",
    "http://localhost/",
    "http://[::1]:8080/ready?full=1",
    "https://api.example.com/health",
    "http://user:pw@127.0.0.1:80/",
    "tcp://127.0.0.1:5432",
    "tcp://db.local:6379/",
    "tcp://[::1]:22",
    "cmd:pg_isready -h 127.0.0.1",
    "cmd: test -f ready",
]

BAD = [
    ("", "expected http://"),
    ("ftp://127.0.0.1/", "expected http://"),
    ("127.0.0.1:8080", "expected http://"),
    ("HTTP://127.0.0.1/", "expected http://"),
    ("http:///healthz", "expected a host"),
    ("http://127.0.0.1:99999/", "invalid check URL"),
    ("http://127.0.0.1:0/", "port 0"),
    ("http://127.0.0.1/a b", "whitespace"),
    ("tcp://127.0.0.1", "expected tcp://host:port"),
    ("tcp://127.0.0.1:0", "expected tcp://host:port"),
    ("tcp://127.0.0.1:80/path", "nothing after the port"),
    ("tcp://:80", "expected a host"),
    ("cmd:", "expected a shell command"),
    ("cmd:   ", "expected a shell command"),
    ("exec:true", "expected http://"),
]


class TestValidateCheck:
    @pytest.mark.parametrize("check", GOOD)
    def test_accepts(self, check: str) -> None:
        """Each supported form validates."""
        assert validate_check(check) is None

    @pytest.mark.parametrize(("check", "why"), BAD)
    def test_rejects_with_reason(self, check: str, why: str) -> None:
        """Each unusable form is refused with a reason saying what was expected."""
        reason = validate_check(check)
        assert reason is not None and why in reason
