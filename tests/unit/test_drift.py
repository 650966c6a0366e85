"""Install manifests and drift (``keystone.runtime.drift``), the recipe's ``drift`` policy, the
``[drift]`` config, and the views of a drift."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from keystone.cli import views
from keystone.config import load_config, parse_config
from keystone.errors import ValidationError
from keystone.recipe import parse_recipe
from keystone.runtime import drift

RECIPE = '[metadata]\nname = "x"\nversion = "1.0.0"\n[lifecycle.run.exec]\ncommand = "true"\n'


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A work dir as an install leaves it: ``bin/tool`` (0755), ``etc/a.conf``, ``lib`` link,
    ``top.txt`` in the root, and the component's own ``state.db``."""
    w = tmp_path / "components" / "x" / "1.0.0"
    (w / "bin").mkdir(parents=True)
    (w / "etc").mkdir()
    (w / "bin/tool").write_text("#!/bin/sh\n")
    (w / "bin/tool").chmod(0o755)
    (w / "etc/a.conf").write_text("a = 1\n")
    (w / "top.txt").write_text("top\n")
    os.symlink("bin", w / "lib")
    drift.record(w, ["bin/tool", "etc/a.conf", "top.txt", "lib"], ["bin", "etc"])
    (w / "state.db").write_text("the component's own\n")
    return w


def _write(rel: str, text: str) -> Callable[[Path], None]:
    return lambda w: (w / rel).write_text(text)


CASES: list[tuple[str, Callable[[Path], None], dict[str, list[str]]]] = [
    ("nothing", lambda w: None, {}),
    ("content", _write("etc/a.conf", "a = 2\n"), {"changed": ["etc/a.conf"]}),
    ("mode", lambda w: (w / "bin/tool").chmod(0o700), {"changed": ["bin/tool"]}),
    (
        "symlink target",
        lambda w: ((w / "lib").unlink(), os.symlink("etc", w / "lib")),
        {"changed": ["lib"]},
    ),
    ("removed", lambda w: (w / "top.txt").unlink(), {"removed": ["top.txt"]}),
    ("added in an artifact dir", _write("etc/b.conf", "b\n"), {"added": ["etc/b.conf"]}),
    ("added in the root is the component's", _write("new.log", "x\n"), {}),
    ("keystone's own temp names", _write("etc/.keystone-installed", "x\n"), {}),
    (
        "a file replaced by a directory",
        lambda w: ((w / "top.txt").unlink(), (w / "top.txt").mkdir()),
        {"changed": ["top.txt"]},
    ),
]


class TestCheck:
    @pytest.mark.parametrize(("what", "act", "want"), CASES, ids=[c[0] for c in CASES])
    def test_table(
        self, work: Path, what: str, act: Callable[[Path], None], want: dict[str, list[str]]
    ) -> None:
        """Each kind of change is found as what it is, and nothing else is."""
        act(work)
        found = drift.check(work)
        assert found is not None
        got = {
            k: list(v)
            for k, v in (
                ("changed", found.changed),
                ("added", found.added),
                ("removed", found.removed),
            )
            if v
        }
        assert got == want
        assert found.drifted is bool(want)
        assert found.checked == 4

    def test_manifest_beside_the_work_dir(self, work: Path) -> None:
        """The manifest is a sibling of the work dir (out of the component's HOME)."""
        assert drift.manifest_path(work) == work.parent / "1.0.0.files.json"
        assert drift.manifest_path(work).is_file()
        assert not list(work.glob("*.files.json"))

    def test_no_manifest_is_no_answer(self, tmp_path: Path) -> None:
        """A work dir nothing was installed into has no drift to report."""
        assert drift.check(tmp_path) is None

    def test_clear_added(self, work: Path) -> None:
        """A repair removes what was planted in an artifact dir, files and directories."""
        (work / "etc/planted").mkdir()
        (work / "etc/planted/x").write_text("x")
        (work / "etc/b.conf").write_text("b")
        found = drift.check(work)
        assert found is not None and found.added == ("etc/b.conf", "etc/planted/x")
        drift.clear_added(work, found)
        after = drift.check(work)
        assert after is not None and not after.added

    def test_to_json_bounds_the_lists(self, work: Path) -> None:
        """Counts are exact; the named paths stop at MAX_LISTED."""
        for i in range(drift.MAX_LISTED + 5):
            (work / f"etc/n{i:03}").write_text("x")
        found = drift.check(work)
        assert found is not None
        doc = found.to_json()
        assert doc["added"] == drift.MAX_LISTED + 5
        assert len(doc["files"]["added"]) == drift.MAX_LISTED

    def test_tree_paths(self, tmp_path: Path) -> None:
        """An unpacked tree's files (symlinks to directories count as files) and directories."""
        (tmp_path / "a/b").mkdir(parents=True)
        (tmp_path / "a/b/f").write_text("f")
        (tmp_path / "g").write_text("g")
        os.symlink("a", tmp_path / "link")
        assert drift.tree_paths(tmp_path) == (["a/b/f", "g", "link"], ["a", "a/b"])


class TestPolicy:
    def test_default_and_repair(self) -> None:
        """No drift key: report; ``drift = "repair"`` is kept; neither changes the hash."""
        plain = parse_recipe(RECIPE, file="x.toml")
        repair = parse_recipe('drift = "repair"\n' + RECIPE, file="x.toml")
        assert plain.drift == "report" and repair.drift == "repair"
        assert plain.content_hash() == repair.content_hash()

    def test_unknown_policy_names_file_and_line(self) -> None:
        """Another value is refused at its line."""
        with pytest.raises(ValidationError) as exc:
            parse_recipe('# policy\ndrift = "fix"\n' + RECIPE, file="x.toml")
        assert exc.value.file == "x.toml" and exc.value.line == 2
        assert "expected report or repair" in str(exc.value)


class TestConfig:
    def test_interval_from_file_and_env(self, tmp_path: Path) -> None:
        """[drift] interval, overridden by KEYSTONE_DRIFT_INTERVAL; one hour by default."""
        assert parse_config("", file="a.toml").drift_interval == 3600.0
        cfg = parse_config('[drift]\ninterval = "10m"\n', file="a.toml")
        assert cfg.drift_interval == 600.0
        path = tmp_path / "agent.toml"
        path.write_text('[drift]\ninterval = "10m"\n')
        assert load_config(path, {"KEYSTONE_DRIFT_INTERVAL": "0"}).drift_interval == 0.0
        with pytest.raises(ValidationError):
            load_config(path, {"KEYSTONE_DRIFT_INTERVAL": "soon"})
        with pytest.raises(ValidationError):
            parse_config("[drift]\nevery = 1\n", file="a.toml")


class TestViews:
    def test_summary_and_text(self) -> None:
        """A drift in a few words, and per file for verify --installed."""
        d = {
            "drifted": True,
            "changed": 2,
            "added": 0,
            "removed": 1,
            "files": {"changed": ["a", "b"], "added": [], "removed": ["c"]},
        }
        assert views.drift_summary(d) == "2 changed, 1 removed"
        assert views.drift_summary({"drifted": False}) == "clean"
        assert views.drift_summary(None) == "-"
        text = views.drift_text(
            {"components": [{"name": "x", "policy": "repair", "drift": d}, {"name": "y"}]}
        )
        assert text.splitlines() == [
            "x: 2 changed, 1 removed (drift = repair)",
            "  changed  a",
            "  changed  b",
            "  removed  c",
            "y: no install manifest (drift = report)",
        ]
