"""GitSource against real servers: git http-backend, git daemon, a local path and ssh."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from keystone.errors import SourceUnreachable, ValidationError
from keystone.sources import FETCHED_REF, GitMirror, GitSource, PackTooLarge, RemoteRefNotFound
from tests.integration.sources.gitserver import FleetRepo, run_git

pytestmark = pytest.mark.integration


def _packs(mirror: GitMirror) -> set[str]:
    return set(os.listdir(mirror.objects_dir / "pack"))


class TestFetchOverSmartHTTP:
    def test_first_fetch_brings_the_tip(
        self, fleet: FleetRepo, mirror: GitMirror, http_base: str
    ) -> None:
        """A first fetch over smart HTTP stores the remote tip and reports the pack bytes."""
        fleet.commit({"plans/default.toml": "[[components]]\n"}, "one")
        tip = fleet.commit({"recipes/a.recipe.toml": "x = 1\n"}, "two")
        result = GitSource(f"{http_base}/fleet.git", "refs/heads/main", mirror).fetch()
        assert result.revision == tip
        assert result.changed is True
        assert result.bytes_received > 0
        assert result.source == f"{http_base}/fleet.git"
        assert mirror.ref(FETCHED_REF) == tip
        assert mirror.read_file(tip, "recipes/a.recipe.toml") == b"x = 1\n"

    def test_unchanged_remote_costs_one_request_and_no_pack(
        self, fleet: FleetRepo, mirror: GitMirror, http_base: str, http_log: list[str]
    ) -> None:
        """A second fetch with nothing new is one ref advertisement: changed False, 0 bytes."""
        tip = fleet.commit({"a": "1"})
        source = GitSource(f"{http_base}/fleet.git", "main", mirror)
        source.fetch()
        http_log.clear()
        again = source.fetch()
        assert (again.revision, again.changed, again.bytes_received) == (tip, False, 0)
        assert http_log == ["GET /fleet.git/info/refs?service=git-upload-pack"]

    def test_new_commit_fetches_only_what_is_new(
        self, fleet: FleetRepo, mirror: GitMirror, http_base: str
    ) -> None:
        """After a push the next fetch is changed and carries a small incremental pack."""
        big = os.urandom(64 * 1024).hex()
        fleet.commit({"artifacts/blob.txt": big}, "large")
        source = GitSource(f"{http_base}/fleet.git", "main", mirror)
        first = source.fetch()
        tip = fleet.commit({"plans/default.toml": "# small\n"}, "small")
        second = source.fetch()
        assert second.revision == tip and second.changed
        assert 0 < second.bytes_received < first.bytes_received / 10
        assert mirror.parents(tip) == (first.revision,)

    def test_protocol_v2_is_also_one_advertisement_without_pack(
        self, fleet: FleetRepo, mirror: GitMirror, http_base: str, http_log: list[str]
    ) -> None:
        """Forcing protocol v2 over HTTP still fetches, and an unchanged poll sends no fetch."""
        tip = fleet.commit({"a": "1"})
        source = GitSource(f"{http_base}/fleet.git", "main", mirror, protocol_version=2)
        assert source.fetch().revision == tip
        http_log.clear()
        assert source.fetch().bytes_received == 0
        assert len(http_log) == 2  # capabilities GET + ls-refs POST, no fetch command

    def test_missing_ref_names_ref_and_url(
        self, fleet: FleetRepo, mirror: GitMirror, http_base: str
    ) -> None:
        """A ref the remote does not have is RemoteRefNotFound naming the ref and the URL."""
        fleet.commit({"a": "1"})
        url = f"{http_base}/fleet.git"
        with pytest.raises(RemoteRefNotFound) as info:
            GitSource(url, "refs/heads/production", mirror).fetch()
        assert "refs/heads/production" in str(info.value) and url in str(info.value)
        assert mirror.ref(FETCHED_REF) is None

    def test_missing_repository_is_unreachable(self, mirror: GitMirror, http_base: str) -> None:
        """A URL with no repository behind it is SourceUnreachable naming the URL."""
        url = f"{http_base}/nothing-here.git"
        with pytest.raises(SourceUnreachable) as info:
            GitSource(url, "main", mirror).fetch()
        assert url in str(info.value)

    def test_password_never_appears_in_the_result(
        self, fleet: FleetRepo, mirror: GitMirror, http_base: str
    ) -> None:
        """Credentials in the URL are used but kept out of the reported source."""
        fleet.commit({"a": "1"})
        url = http_base.replace("http://", "http://deploy:s3cret@") + "/fleet.git"
        result = GitSource(url, "main", mirror).fetch()
        assert "s3cret" not in result.source and "deploy@" in result.source

    def test_pack_over_the_bound_is_refused(
        self, fleet: FleetRepo, mirror: GitMirror, http_base: str
    ) -> None:
        """A pack larger than max_pack_bytes is refused and leaves the mirror untouched."""
        fleet.commit({"blob": os.urandom(32 * 1024)})
        before = _packs(mirror)
        with pytest.raises(PackTooLarge):
            GitSource(f"{http_base}/fleet.git", "main", mirror, max_pack_bytes=4096).fetch()
        assert _packs(mirror) == before
        assert mirror.ref(FETCHED_REF) is None


class TestFetchOverLocalPaths:
    def test_plain_path_and_file_url(self, fleet: FleetRepo, mirror: GitMirror) -> None:
        """Both a plain path and a file:// URL fetch, and the second one sees nothing new."""
        tip = fleet.commit({"a": "1"})
        first = GitSource(str(fleet.bare), "main", mirror).fetch()
        again = GitSource(f"file://{fleet.bare}", "refs/heads/main", mirror).fetch()
        assert first.revision == tip and first.changed and first.bytes_received > 0
        assert (again.revision, again.changed, again.bytes_received) == (tip, False, 0)

    def test_force_push_to_a_known_commit_is_changed_without_pack(
        self, fleet: FleetRepo, mirror: GitMirror
    ) -> None:
        """A remote moved back to a commit the mirror has: changed, but nothing downloaded."""
        old = fleet.commit({"a": "1"})
        source = GitSource(str(fleet.bare), "main", mirror)
        source.fetch()
        fleet.commit({"a": "2"})
        source.fetch()
        fleet.git("reset", "-q", "--hard", old)
        fleet.push()
        back = source.fetch()
        assert (back.revision, back.changed, back.bytes_received) == (old, True, 0)

    def test_annotated_tag_is_peeled_to_its_commit(
        self, fleet: FleetRepo, mirror: GitMirror
    ) -> None:
        """A ref naming an annotated tag yields the tagged commit as the revision."""
        tip = fleet.commit({"a": "1"})
        fleet.git("tag", "-a", "-m", "release", "v1", "--no-sign")
        fleet.git("push", "-q", str(fleet.bare), "refs/tags/v1")
        result = GitSource(str(fleet.bare), "v1", mirror).fetch()
        assert result.revision == tip

    def test_missing_path_is_unreachable(self, tmp_path: Path, mirror: GitMirror) -> None:
        """A path with no repository is SourceUnreachable naming it."""
        with pytest.raises(SourceUnreachable) as info:
            GitSource(str(tmp_path / "absent.git"), "main", mirror).fetch()
        assert "absent.git" in str(info.value)

    def test_empty_remote_has_no_ref(self, fleet: FleetRepo, mirror: GitMirror) -> None:
        """A remote with no commits is RemoteRefNotFound, not a crash."""
        with pytest.raises(RemoteRefNotFound):
            GitSource(str(fleet.bare), "main", mirror).fetch()


class TestFetchOverGitDaemon:
    def test_git_protocol_fetch_and_unchanged(
        self, fleet: FleetRepo, mirror: GitMirror, daemon_base: str
    ) -> None:
        """git:// fetches the tip, and an unchanged remote sends no pack."""
        fleet.commit({"a": "1"})
        tip = fleet.commit({"b": "2"})
        source = GitSource(f"{daemon_base}/fleet.git", "main", mirror)
        first = source.fetch()
        again = source.fetch()
        assert first.revision == tip and first.bytes_received > 0
        assert (again.changed, again.bytes_received) == (False, 0)

    def test_git_protocol_v0_also_works(
        self, fleet: FleetRepo, mirror: GitMirror, daemon_base: str
    ) -> None:
        """The old protocol (v0) over git:// fetches the same tip."""
        tip = fleet.commit({"a": "1"})
        result = GitSource(f"{daemon_base}/fleet.git", "main", mirror, protocol_version=0).fetch()
        assert result.revision == tip


FAKE_SSH = """#!/bin/sh
# A stand-in for ssh (as git's own test suite uses): skip options, take the host, run the
# command locally, as a real sshd would run it in the user's shell.
while [ $# -gt 0 ]; do
  case "$1" in
    -o) case "$2" in "SetEnv GIT_PROTOCOL="*) export GIT_PROTOCOL="${2#SetEnv GIT_PROTOCOL=}";; esac
        echo "$2" >> "$FAKE_SSH_LOG"; shift 2;;
    -p|-i) shift 2;;
    -*) shift;;
    *) break;;
  esac
done
echo "host=$1" >> "$FAKE_SSH_LOG"
shift
exec sh -c "$*"
"""


class TestFetchOverSSH:
    @pytest.fixture
    def fake_ssh(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
        script = tmp_path / "fake-ssh"
        script.write_text(FAKE_SSH)
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
        log = tmp_path / "ssh.log"
        monkeypatch.setenv("FAKE_SSH_LOG", str(log))
        return script

    def test_ssh_url_runs_the_ssh_client_non_interactively(
        self, fleet: FleetRepo, mirror: GitMirror, fake_ssh: Path, tmp_path: Path
    ) -> None:
        """ssh:// runs the ssh command with BatchMode and keep-alives, then upload-pack."""
        tip = fleet.commit({"a": "1"})
        url = f"ssh://deploy@fleet.example{fleet.bare}"
        source = GitSource(url, "main", mirror, ssh_command=str(fake_ssh), timeout=9)
        first = source.fetch()
        again = source.fetch()
        assert first.revision == tip and first.bytes_received > 0
        assert (again.changed, again.bytes_received) == (False, 0)
        log = (tmp_path / "ssh.log").read_text()
        assert "BatchMode=yes" in log and "ConnectTimeout=9" in log
        assert "ServerAliveInterval=3" in log and "host=deploy@fleet.example" in log

    def test_scp_like_location(self, fleet: FleetRepo, mirror: GitMirror, fake_ssh: Path) -> None:
        """user@host:path is an ssh location, as for git."""
        tip = fleet.commit({"a": "1"})
        source = GitSource(f"git@fleet.example:{fleet.bare}", "main", mirror,
                           ssh_command=str(fake_ssh))  # fmt: skip
        assert source.fetch().revision == tip

    def test_ssh_failure_is_unreachable_with_its_message(
        self, mirror: GitMirror, fake_ssh: Path
    ) -> None:
        """When the remote command fails, SourceUnreachable carries the server's words."""
        source = GitSource("ssh://fleet.example/no/such/repo.git", "main", mirror,
                           ssh_command=str(fake_ssh))  # fmt: skip
        with pytest.raises(SourceUnreachable) as info:
            source.fetch()
        assert "ssh://fleet.example/no/such/repo.git" in str(info.value)


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A loopback TCP server that accepts connections and never says a word."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        listener.close()
        thread.join(timeout=5)
        for conn in accepted:
            conn.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TestUnreachable:
    @pytest.mark.parametrize("scheme", ["http", "git"])
    def test_nothing_listening(self, scheme: str, mirror: GitMirror) -> None:
        """A closed loopback port is SourceUnreachable naming the URL, without retries."""
        url = f"{scheme}://127.0.0.1:{_closed_port()}/fleet.git"
        with pytest.raises(SourceUnreachable) as info:
            GitSource(url, "main", mirror, timeout=5).fetch()
        assert url in str(info.value)
        assert mirror.ref(FETCHED_REF) is None

    @pytest.mark.parametrize("scheme", ["http", "git"])
    def test_server_that_never_answers_times_out(
        self, scheme: str, mirror: GitMirror, silent_server: int
    ) -> None:
        """A server that accepts and then stays silent trips the read timeout."""
        url = f"{scheme}://127.0.0.1:{silent_server}/fleet.git"
        with pytest.raises(SourceUnreachable) as info:
            GitSource(url, "main", mirror, timeout=0.5).fetch()
        assert url in str(info.value)

    @pytest.mark.parametrize(
        "url",
        ["ftp://example.com/fleet.git", "file://otherhost/srv/fleet.git", "git:///fleet.git"],
    )
    def test_unusable_urls_are_refused(self, url: str, mirror: GitMirror) -> None:
        """A URL Keystone cannot fetch from is a ValidationError, not a retry loop."""
        with pytest.raises(ValidationError):
            GitSource(url, "main", mirror).fetch()


class TestDeadline:
    def test_total_deadline_abandons_the_fetch(
        self, fleet: FleetRepo, mirror: GitMirror, http_base: str
    ) -> None:
        """Past total_timeout the fetch is abandoned as SourceUnreachable; nothing is stored."""
        fleet.commit({"a": "1"})
        source = GitSource(f"{http_base}/fleet.git", "main", mirror, total_timeout=1e-6)
        with pytest.raises(SourceUnreachable, match="took longer than"):
            source.fetch()
        assert mirror.ref(FETCHED_REF) is None


FETCH_CHILD = """
import sys
from pathlib import Path
from keystone.sources import GitMirror, GitSource
with GitMirror(Path(sys.argv[1])) as mirror:
    print(GitSource(sys.argv[2], "main", mirror).fetch().revision)
"""


class TestConcurrentWriters:
    def test_two_processes_fetching_into_one_mirror(self, fleet: FleetRepo, tmp_path: Path) -> None:
        """Two worker processes fetching at once both succeed and leave one clean mirror."""
        fleet.commit({"blob": os.urandom(200_000)})
        tip = fleet.commit({"a": "1"})
        repo = tmp_path / "runtime" / "repo"
        GitMirror(repo).close()
        children = [
            subprocess.Popen(
                [sys.executable, "-c", FETCH_CHILD, str(repo), str(fleet.bare)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for _ in range(2)
        ]
        outputs = [child.communicate(timeout=120) for child in children]
        assert [c.returncode for c in children] == [0, 0], outputs
        assert [out.decode().strip() for out, _err in outputs] == [tip, tip]
        with GitMirror(repo) as mirror:
            assert mirror.ref(FETCHED_REF) == tip
            assert not [p for p in repo.iterdir() if p.name.startswith("keystone-incoming-")]
            run_git("fsck", "--strict", "--no-dangling", cwd=repo, env=fleet.env)


class TestForeignRepositoryIsInert:
    def test_config_hooks_and_submodules_of_the_remote_are_never_used(
        self, fleet: FleetRepo, mirror: GitMirror, tmp_path: Path
    ) -> None:
        """A hostile remote's config, hooks and submodules neither run nor reach the mirror."""
        sub = fleet.commit({"x": "1"}, "for the submodule")
        marker = tmp_path / "pwned"
        evil = f"touch {marker}"
        fleet.commit({".gitmodules": f'[submodule "s"]\n\tpath = s\n\turl = {evil}\n'}, "mods")
        fleet.git("update-index", "--add", "--cacheinfo", f"160000,{sub},s")
        tip = fleet.commit(message="gitlink")
        # Poisoned after the pushes: git's own receive-pack would run these hooks.
        for key, value in [
            ("core.fsmonitor", evil),
            ("core.sshCommand", evil),
            ("core.hooksPath", str(fleet.bare / "hooks")),
            ("uploadpack.packObjectsHook", evil),
            ("include.path", str(tmp_path / "absent-include")),
        ]:
            run_git("config", "--file", str(fleet.bare / "config"), key, value, env=fleet.env)
        for hook in ("post-checkout", "post-merge", "pre-upload-pack", "post-update",
                     "reference-transaction", "fsmonitor-watchman"):  # fmt: skip
            path = fleet.bare / "hooks" / hook
            path.write_text(f"#!/bin/sh\n{evil}\n")
            path.chmod(0o755)
        config_before = (mirror.path / "config").read_bytes()

        for url in (str(fleet.bare), f"file://{fleet.bare}"):
            assert GitSource(url, "main", mirror).fetch().revision == tip
        assert ("s", False) in mirror.list_dir(tip, "")
        with pytest.raises(ValidationError, match="submodule"):
            mirror.read_file(tip, "s")

        assert not marker.exists()
        assert (mirror.path / "config").read_bytes() == config_before
        assert not any((mirror.path / "hooks").glob("*")) or all(
            p.name.endswith(".sample") for p in (mirror.path / "hooks").iterdir()
        )
        assert not (mirror.path / "modules").exists()
