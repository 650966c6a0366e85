"""Artifact policy, URI handling, the token rule, the trusted clock and Range parsing: tables."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from keystone.errors import UsageError
from keystone.runtime.artifacts import (
    GITHUB_HOSTS,
    ArtifactPolicy,
    ArtifactSpec,
    artifact_name,
    backoff_delay,
    locate,
    normalize_sha256,
    redact_uri,
    request_headers,
)
from keystone.runtime.clock import MARK_FILE, ClockBehind, TrustedClock
from keystone.serve import _parse_range, parse_addr

HEX = "ab" * 32


class TestSha256Pins:
    @pytest.mark.parametrize(
        ("given", "expected"),
        [
            (HEX, HEX),
            ("sha256:" + HEX, HEX),
            ("SHA256:" + HEX.upper(), HEX),
            (f"  {HEX}  ", HEX),
            (None, None),
            ("", None),
        ],
    )
    def test_pins_normalize(self, given: str | None, expected: str | None) -> None:
        """Prefix, case and spaces do not matter; empty means unpinned."""
        assert normalize_sha256(given) == expected

    @pytest.mark.parametrize("bad", ["abc", "sha1:" + HEX, HEX + "00", "zz" * 32, "md5:" + HEX])
    def test_bad_pins_are_refused(self, bad: str) -> None:
        """Anything but 64 hex digits is an error naming the value."""
        with pytest.raises(ValueError, match="64 hex"):
            normalize_sha256(bad)


class TestUris:
    @pytest.mark.parametrize(
        ("uri", "shown"),
        [
            ("https://user:secret@example.com/a.tgz", "https://example.com/a.tgz"),
            ("https://s3.example.com/a?X-Amz-Signature=abc", "https://s3.example.com/a?…"),
            ("http://127.0.0.1:9000/x", "http://127.0.0.1:9000/x"),
            ("file:///opt/a.tgz", "file:///opt/a.tgz"),
            ("artifacts/a.tgz", "artifacts/a.tgz"),
        ],
    )
    def test_redaction_drops_credentials_and_queries(self, uri: str, shown: str) -> None:
        """Messages and logs never carry userinfo or presigned query strings."""
        assert redact_uri(uri) == shown

    @pytest.mark.parametrize(
        ("uri", "name"),
        [
            ("https://example.com/rel/hello-1.2.tar.gz?x=1", "hello-1.2.tar.gz"),
            ("https://api.github.com/repos/o/r/actions/artifacts/1/zip", "zip"),
            ("file:///opt/my%20tool", "my tool"),
            ("artifacts/tool.bin", "tool.bin"),
            ("https://example.com/", "artifact"),
        ],
    )
    def test_artifact_name_is_the_last_segment(self, uri: str, name: str) -> None:
        """A plain artifact lands in the work dir under its URI's basename."""
        assert artifact_name(uri) == name

    def test_locate_kinds(self, tmp_path: Path) -> None:
        """http(s), file:// and repo-relative paths are told apart."""
        (tmp_path / "artifacts").mkdir()
        assert locate("https://example.com/a", None).kind == "http"
        assert locate("file:///opt/a", None).path == Path("/opt/a")
        rel = locate("artifacts/a.bin", tmp_path)
        assert rel.kind == "file"
        assert rel.path == Path(tmp_path.resolve() / "artifacts" / "a.bin")
        assert locate("file:artifacts/a.bin", tmp_path).path == rel.path

    @pytest.mark.parametrize(
        ("uri", "reason"),
        [
            ("../outside.bin", "uri-escapes-repo"),
            ("artifacts/../../outside.bin", "uri-escapes-repo"),
            ("link/secret", "uri-escapes-repo"),
            ("ftp://example.com/a", "unsupported-uri"),
            ("file://otherhost/a", "unsupported-uri"),
        ],
    )
    def test_locate_refusals(self, tmp_path: Path, uri: str, reason: str) -> None:
        """Paths that leave the repo (also through a symlink) and other schemes are refused."""
        repo = tmp_path / "repo"
        repo.mkdir()
        (repo / "link").symlink_to(tmp_path)
        with pytest.raises(ValueError) as info:
            locate(uri, repo)
        assert info.value.args[0] == reason

    def test_relative_path_without_repo_is_refused(self) -> None:
        """A relative path needs a repo checkout to be relative to."""
        with pytest.raises(ValueError) as info:
            locate("artifacts/a", None)
        assert info.value.args[0] == "relative-uri"


GH = "https://api.github.com/repos/o/r/releases/assets/1"


class TestTokenRule:
    @pytest.mark.parametrize(
        ("url", "first", "token", "headers", "expected"),
        [
            # the token goes to the GitHub host the artifact names
            (GH, GH, "t0k", {}, {"Authorization": "Bearer t0k"}),
            (
                "https://github.com/o/r/x",
                "https://github.com/o/r/x",
                "t0k",
                {},
                {"Authorization": "Bearer t0k"},
            ),
            # ... not after GitHub's 302 to object storage
            ("https://objects.githubusercontent.com/x?sig=1", GH, "t0k", {}, {}),
            # ... not from api.github.com across to github.com either (another host)
            ("https://github.com/x", GH, "t0k", {}, {}),
            # ... never to another host, never over plain http to a public host
            ("https://example.com/a", "https://example.com/a", "t0k", {}, {}),
            ("http://api.github.com/x", "http://api.github.com/x", "t0k", {}, {}),
            # a recipe's own Authorization wins and stays with its origin
            (GH, GH, "t0k", {"Authorization": "token mine"}, {"Authorization": "token mine"}),
            ("https://cdn.example.com/x", GH, "t0k", {"Authorization": "token mine"}, {}),
            # harmless headers follow a redirect, secrets do not
            (
                "https://cdn.example.com/x",
                GH,
                None,
                {"Accept": "application/octet-stream", "PRIVATE-TOKEN": "p"},
                {"Accept": "application/octet-stream"},
            ),
            # same origin keeps everything
            ("https://h/x2", "https://h/x1", None, {"X-Key": "k"}, {"X-Key": "k"}),
            # another port is another origin
            ("https://h:8443/x", "https://h/x", None, {"X-Key": "k"}, {}),
        ],
    )
    def test_headers_per_hop(
        self,
        url: str,
        first: str,
        token: str | None,
        headers: dict[str, str],
        expected: dict[str, str],
    ) -> None:
        """The token and the recipe's headers are sent only where they belong."""
        assert request_headers(url, first, headers, token, GITHUB_HOSTS) == expected

    def test_loopback_http_may_carry_a_token(self) -> None:
        """Over plain http the token goes only to a loopback address (it never leaves the box)."""
        url = "http://127.0.0.1:9/x"
        assert request_headers(url, url, {}, "t", {"127.0.0.1"}) == {"Authorization": "Bearer t"}


class TestPolicyFromEnv:
    def test_defaults(self, tmp_path: Path) -> None:
        """No variables: 2 GiB bounds, 30 min deadline, high-water clock, state beside the cache."""
        p = ArtifactPolicy.from_env(tmp_path / "artifacts", {})
        assert p.max_bytes == p.max_extract_bytes == p.cache_limit_bytes == 2 * 1024**3
        assert p.download_timeout == 1800.0
        assert p.clock_policy == "high-water"
        assert p.state_dir == tmp_path / "state"
        assert p.allow_unsigned and not p.require_sha256 and not p.insecure_skip_verify

    def test_go_variables(self, tmp_path: Path) -> None:
        """The Go Keystone's variables keep their meaning; overrides win."""
        env = {
            "KEYSTONE_TRUST_BUNDLE": "/etc/keystone/ca.pem",
            "KEYSTONE_LEAF_CERT": "/etc/keystone/leaf.pem",
            "KEYSTONE_GITHUB_TOKEN": "ghp_x",
            "KEYSTONE_MAX_EXTRACT_BYTES": "512M",
            "KEYSTONE_ARTIFACT_CACHE_LIMIT_BYTES": "1073741824",
            "KEYSTONE_ARTIFACT_DOWNLOAD_TIMEOUT": "5m",
            "KEYSTONE_CLOCK_POLICY": "strict",
            "KEYSTONE_INSECURE_SKIP_VERIFY": "true",
        }
        p = ArtifactPolicy.from_env(tmp_path, env, allow_unsigned=False)
        assert p.trust_bundle == Path("/etc/keystone/ca.pem")
        assert p.leaf_cert == Path("/etc/keystone/leaf.pem")
        assert p.github_token == "ghp_x"
        assert p.max_extract_bytes == 512 * 1024**2
        assert p.cache_limit_bytes == 1024**3
        assert p.download_timeout == 300.0
        assert p.clock_policy == "strict"
        # Go's meaning: skip the mandatory integrity requirements (never TLS checks).
        assert p.insecure_skip_verify is True
        assert p.allow_unsigned is False
        assert "ghp_x" not in repr(p)

    @pytest.mark.parametrize(
        ("name", "value"),
        [
            ("KEYSTONE_MAX_EXTRACT_BYTES", "lots"),
            ("KEYSTONE_ARTIFACT_DOWNLOAD_TIMEOUT", "soon"),
            ("KEYSTONE_ARTIFACT_DOWNLOAD_TIMEOUT", "0s"),
            ("KEYSTONE_CLOCK_POLICY", "sundial"),
        ],
    )
    def test_bad_values_name_the_variable(self, tmp_path: Path, name: str, value: str) -> None:
        """A value that does not parse is a usage error naming the variable."""
        with pytest.raises(UsageError, match=name):
            ArtifactPolicy.from_env(tmp_path, {name: value})

    def test_json_round_trip(self, tmp_path: Path) -> None:
        """The worker receives exactly the policy the agent built."""
        p = ArtifactPolicy.from_env(
            tmp_path, {"KEYSTONE_GITHUB_TOKEN": "t"}, repo_root=tmp_path / "repo"
        )
        again = ArtifactPolicy.from_json(json.loads(json.dumps(p.to_json())))
        assert again == p

    def test_spec_json_round_trip(self) -> None:
        """An artifact entry survives the trip to the worker."""
        spec = ArtifactSpec(
            uri="https://x/y", sha256=HEX, unpack=True, github_token="t", headers={"A": "b"}
        )
        assert ArtifactSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
        with pytest.raises(UsageError, match="unknown artifact keys"):
            ArtifactSpec.from_json({"uri": "x", "shaa256": HEX})


class TestBackoff:
    def test_grows_and_is_capped(self) -> None:
        """Delays double from the base, with jitter in [50%, 100%], never above the cap."""
        rng = random.Random(1)
        for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (6, 30.0), (20, 30.0)]:
            d = backoff_delay(attempt, 1.0, 30.0, rng=rng)
            assert ceiling / 2 <= d <= ceiling


class FakeWall:
    """A settable system clock."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


DAY = 86400.0
T0 = 1_800_000_000.0  # 2027-01-15


class TestTrustedClock:
    def test_never_runs_backwards(self, tmp_path: Path) -> None:
        """After seeing T0, a clock reset to 1970 still judges at T0 (high-water)."""
        wall = FakeWall(T0)
        clock = TrustedClock(tmp_path, "high-water", wall=wall, build=0.0)
        assert clock.verification_time().now == T0
        wall.now = 0.0
        reading = clock.verification_time()
        assert reading.now == T0
        assert reading.source == "high-water"
        assert not reading.trusted
        assert json.loads((tmp_path / MARK_FILE).read_text())["high_water"] == T0

    def test_build_time_is_a_floor(self, tmp_path: Path) -> None:
        """With no mark, a clock behind the build time is judged at the build time."""
        clock = TrustedClock(tmp_path, "high-water", wall=FakeWall(0.0), build=T0)
        reading = clock.verification_time()
        assert reading.now == T0 and reading.source == "build-time"

    def test_strict_refuses_while_behind(self, tmp_path: Path) -> None:
        """Strict: a system clock behind the mark refuses to judge at all."""
        wall = FakeWall(T0)
        clock = TrustedClock(tmp_path, "strict", wall=wall, build=0.0)
        clock.verification_time()
        wall.now = T0 - 10 * DAY
        with pytest.raises(ClockBehind, match="KEYSTONE_CLOCK_POLICY"):
            clock.verification_time()
        wall.now = T0 - 60  # an NTP step of a minute is tolerated
        assert clock.verification_time().now == T0

    def test_mark_only_moves_forward(self, tmp_path: Path) -> None:
        """observe() ignores earlier times; a damaged mark file reads as no mark."""
        clock = TrustedClock(tmp_path, wall=FakeWall(0.0), build=0.0)
        clock.observe(T0)
        clock.observe(T0 - DAY)
        assert clock.mark() == T0
        (tmp_path / MARK_FILE).write_text("{garbage")
        assert clock.mark() == 0.0

    def test_unknown_policy_is_a_usage_error(self, tmp_path: Path) -> None:
        """Only high-water and strict exist."""
        with pytest.raises(UsageError):
            TrustedClock(tmp_path, "lenient")


class TestServeHelpers:
    @pytest.mark.parametrize(
        ("addr", "expected"),
        [
            (":9000", ("0.0.0.0", 9000)),
            ("127.0.0.1:9000", ("127.0.0.1", 9000)),
            ("[::1]:80", ("::1", 80)),
            ("9000", ("0.0.0.0", 9000)),
        ],
    )
    def test_addr(self, addr: str, expected: tuple[str, int]) -> None:
        """Go-style listen addresses."""
        assert parse_addr(addr) == expected

    @pytest.mark.parametrize("addr", ["localhost", ":http", ":70000"])
    def test_bad_addr(self, addr: str) -> None:
        """A malformed address is a usage error."""
        with pytest.raises(UsageError):
            parse_addr(addr)

    @pytest.mark.parametrize(
        ("header", "expected"),
        [
            ("bytes=0-9", (0, 9)),
            ("bytes=10-", (10, 99)),
            ("bytes=-10", (90, 99)),
            ("bytes=90-200", (90, 99)),
            ("bytes=100-", "unsatisfiable"),
            ("bytes=-0", "unsatisfiable"),
            ("bytes=0-1,5-6", None),
            ("bytes=9-3", None),
            ("items=0-1", None),
        ],
    )
    def test_range(self, header: str, expected: object) -> None:
        """Single ranges are served, unsatisfiable ones are 416, the rest ignored."""
        assert _parse_range(header, 100) == expected
