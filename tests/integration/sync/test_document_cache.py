"""``keystone plan diff`` and ``plan render`` keep parsed recipes in the repository's git
directory (``keystone-documents``): a later run answers exactly as a run without it, and a
damaged file only costs the parse."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from keystone.sources.documents import FILE_NAME, DocumentFile
from keystone.sources.git import GitMirror
from keystone.sync.resolve import resolve
from tests.integration.sources.gitserver import FleetRepo

pytestmark = pytest.mark.integration

RECIPE = (
    '[metadata]\nname = "{n}"\nversion = "{v}"\n\n'
    '[lifecycle.run.exec]\ncommand = "/bin/sleep"\nargs = ["${{DELAY:-5}}"]\n'
    "{deps}"
)


def files(n: int, changed: set[int] = frozenset()) -> dict[str, str]:  # type: ignore[assignment]
    out = {
        f"recipes/c{i}.recipe.toml": RECIPE.format(
            n=f"c{i}",
            v="2.0.0" if i in changed else "1.0.0",
            deps=f'[[dependencies]]\nname = "c{i - 1}"\n' if i % 3 else "",
        )
        for i in range(n)
    }
    out["plans/default.toml"] = "".join(
        f'[[components]]\nname = "c{i}"\nrecipe = "recipes/c{i}.recipe.toml"\n' for i in range(n)
    )
    return out


def keystone(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **env}
    full.pop("KEYSTONE_API_TOKEN", None)
    return subprocess.run(
        [sys.executable, "-m", "keystone", *args],
        cwd=cwd,
        env=full,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def fleet(tmp_path: Path) -> FleetRepo:
    repo = FleetRepo(tmp_path)
    repo.commit(files(12), "a")
    repo.commit(files(12, changed={2, 7}), "b")
    return repo


def _diff(fleet: FleetRepo, **env: str) -> str:
    r = keystone("plan", "diff", "HEAD~1", "HEAD", "--repo", str(fleet.bare), cwd=fleet.work, **env)
    assert r.returncode == 0 and not r.stderr, r.stderr
    return r.stdout


class TestKeptDocuments:
    def test_a_diff_answers_the_same_with_and_without_them(self, fleet: FleetRepo) -> None:
        """The first run keeps what it parsed; later runs, from it, print the very same."""
        kept = fleet.bare / FILE_NAME
        first = _diff(fleet)
        assert "c2" in first and "c7" in first
        # every recipe of both revisions and the two plan files
        assert len(DocumentFile.load(fleet.bare)) == 12 + 2 + 1
        mtime = kept.stat().st_mtime_ns
        assert _diff(fleet) == first
        assert kept.stat().st_mtime_ns == mtime  # nothing new: not written again
        as_json = ("--json",)
        with_docs = keystone(
            "plan", "diff", "HEAD~1", "HEAD", "--repo", str(fleet.bare), *as_json, cwd=fleet.work
        )
        kept.unlink()
        without = keystone(
            "plan", "diff", "HEAD~1", "HEAD", "--repo", str(fleet.bare), *as_json, cwd=fleet.work
        )
        assert with_docs.returncode == without.returncode == 0
        assert with_docs.stdout == without.stdout
        assert sorted(p.name for p in fleet.bare.iterdir() if "keystone" in p.name) == [FILE_NAME]

    def test_variables_are_substituted_each_run(self, fleet: FleetRepo) -> None:
        """A kept document is the parse before validation: ${DELAY} takes this run's value."""
        head = fleet.git("rev-parse", "HEAD").strip()
        for delay, kept_before in (("1", 0), ("2", 13), ("1", 13)):
            docs = DocumentFile.load(fleet.bare)
            assert len(docs) == kept_before
            with GitMirror(fleet.bare, create=False) as m:
                plan = resolve(
                    m.file_source(head),
                    device_id="d",
                    labels=[],
                    environ={"DELAY": delay},
                    cache={},  # a fresh process's: nothing parsed yet
                    documents=docs,
                )
            docs.save()
            assert plan.components["c5"].recipe.run.exec.args == (delay,)  # type: ignore[union-attr]

    def test_a_damaged_file_is_ignored_and_written_again(self, fleet: FleetRepo) -> None:
        """Bytes flipped in the middle and a cut tail: the same answer, no traceback, and the
        file whole again afterwards."""
        first = _diff(fleet)
        kept = fleet.bare / FILE_NAME
        raw = bytearray(kept.read_bytes())
        for at in range(len(raw) // 3, len(raw) // 2, 97):
            raw[at] ^= 0x5A
        kept.write_bytes(bytes(raw[:-40]))
        assert _diff(fleet) == first
        assert len(DocumentFile.load(fleet.bare)) == 12 + 2 + 1
        assert _diff(fleet) == first

    def test_a_broken_recipe_is_refused_as_before(self, fleet: FleetRepo) -> None:
        """A recipe that does not validate is refused in every run, kept or not, naming its file."""
        broken = files(12)
        broken["recipes/c4.recipe.toml"] = '[metadata]\nname = "c4"\nversion = 7\n'
        fleet.commit(broken, "c")
        for _ in range(2):
            r = keystone(
                "plan", "diff", "HEAD~1", "HEAD", "--repo", str(fleet.bare), cwd=fleet.work
            )
            assert r.returncode != 0
            assert "recipes/c4.recipe.toml@" in r.stderr + r.stdout and "Traceback" not in r.stderr
