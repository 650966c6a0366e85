"""A spawn's cgroup and its limits, written into a plain directory standing in for cgroupfs."""

from __future__ import annotations

from pathlib import Path

import pytest

from keystone.runtime.cgroups import make_cgroup
from keystone.runtime.spawn import SpawnSpec


def spec(memory: int | None = None, cpu: float | None = None) -> SpawnSpec:
    return SpawnSpec(
        name="app",
        argv=("/bin/true",),
        cwd=Path("/"),
        env={},
        log_dir=Path("/tmp"),
        open_files=64,
        memory_limit=memory,
        cpu_quota=cpu,
    )


class TestMakeCgroup:
    @pytest.mark.parametrize(
        ("controllers", "memory", "cpu", "files", "enforced"),
        [
            (
                {"memory", "cpu"},
                1 << 20,
                0.5,
                {"memory.max": "1048576", "cpu.max": "50000 100000"},
                (True, True),
            ),
            ({"memory", "cpu"}, None, 0.001, {"cpu.max": "1000 100000"}, (False, True)),
            ({"cpu"}, 1 << 20, None, {}, (False, False)),
            (set(), None, 2.0, {}, (False, False)),
            ({"memory", "cpu"}, None, None, {}, (False, False)),
        ],
    )
    def test_limits(
        self,
        tmp_path: Path,
        controllers: set[str],
        memory: int | None,
        cpu: float | None,
        files: dict[str, str],
        enforced: tuple[bool, bool],
    ) -> None:
        """Each limit is written when its controller is on, and reported as not enforced otherwise."""
        cgroup, report = make_cgroup(tmp_path, frozenset(controllers), spec(memory, cpu), 3)
        assert cgroup is not None and cgroup.parent == tmp_path
        assert cgroup.name.startswith("app.") and cgroup.name.endswith(".3")
        for name, text in files.items():
            assert (cgroup / name).read_text() == text
        assert (report.memory_enforced, report.cpu_enforced) == enforced
        asked = (memory is not None) + (cpu is not None)
        assert len(report.notes) == asked - sum(enforced)
        assert report.open_files == 64 and report.cgroup == cgroup

    def test_no_root(self) -> None:
        """Without a cgroup root there is no cgroup, and every asked limit says why."""
        cgroup, report = make_cgroup(None, frozenset(), spec(1 << 20, 1.0), 1)
        assert cgroup is None and report.cgroup is None
        assert [n.split(" =")[0] for n in report.notes] == ["memory_limit", "cpu_quota"]
        assert all("not enforced" in n for n in report.notes)

    def test_root_not_writable(self, tmp_path: Path) -> None:
        """A root the cgroup cannot be made in gives no cgroup and a note."""
        cgroup, report = make_cgroup(tmp_path / "missing", frozenset({"memory"}), spec(1), 1)
        assert cgroup is None
        assert "no cgroup" in report.notes[0]
