"""Damaged and hostile recipes, plans and configs: refused with Keystone's own errors.

Each row is one failure mode the mutation harness found: a foreign exception that leaked
(tomlkit's KeyAlreadyPresent, TypeError, OverflowError, OSError, ValueError, RuntimeError,
UnicodeDecodeError, MemoryError), a hang, or an invalid file that was accepted.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

from keystone import tomlsrc
from keystone.config import load_config, parse_config
from keystone.errors import DuplicateKeyError, LimitExceeded, ValidationError
from keystone.limits import Limits
from keystone.plan import load_desired, load_plan, parse_plan, plan_from_json
from keystone.recipe import load_recipe, parse_recipe
from keystone.semver import Constraint, Version
from keystone.units import parse_duration, parse_size

BASE = '[metadata]\nname = "a"\nversion = "1"\n[lifecycle.run.exec]\ncommand = "x"\n'
PLAN = '[[components]]\nname = "hello"\nrecipe = "hello.recipe.toml"\n'


def with_exec(extra: str) -> str:
    return BASE.replace('command = "x"', 'command = "x"\n' + extra)


DUPLICATES = [
    # (text, message, line, first line)
    (BASE.replace('version = "1"', 'version = "1"\nname = "b"'), "duplicate key 'metadata.name'", 4, 2),
    (BASE + "[metadata]\n", "duplicate table 'metadata'", 6, 1),
    (BASE + '[lifecycle.run.exec]\nargs = ["a"]\n', "duplicate table 'lifecycle.run.exec'", 6, 4),
    (BASE + "[[metadata]]\n", "duplicate table 'metadata' (earlier a table)", 6, 1),
    (with_exec("env = { A = '1' }\n[lifecycle.run.exec.env]"), "duplicate table", 7, 6),
    (with_exec('args = ["a"]\nargs = ["b"]'), "duplicate key 'lifecycle.run.exec.args'", 7, 6),
]  # fmt: skip


class TestDuplicates:
    @pytest.mark.parametrize(("text", "message", "line", "first"), DUPLICATES)
    def test_both_lines_are_named(self, text: str, message: str, line: int, first: int) -> None:
        """A key or table written twice names itself and both of its lines."""
        with pytest.raises(DuplicateKeyError) as exc:
            parse_recipe(text, file="r.toml")
        assert message in str(exc.value)
        assert f"at r.toml:{line}, first defined at line {first}" in str(exc.value)
        assert (exc.value.line, exc.value.first_line) == (line, first)

    def test_duplicate_plan_key(self) -> None:
        """The issue's example: a plan key defined twice, both lines in the message."""
        text = PLAN + 'enabled = true\n[[components]]\nname = "b"\nrecipe = "x"\nname = "c"\n'
        with pytest.raises(DuplicateKeyError) as exc:
            parse_plan(text, file="plan.toml")
        assert str(exc.value) == (
            "duplicate key 'components[1].name' at plan.toml:8, first defined at line 6"
        )

    def test_duplicate_config_table(self) -> None:
        """agent.toml duplicates are named the same way."""
        with pytest.raises(DuplicateKeyError, match=r"agent\.toml:3, first defined at line 1"):
            parse_config('[device]\nid = "a"\n[device]\n', file="agent.toml")


REFUSED = [
    # (recipe text, field, what the message says)
    (BASE + "[resources]\ncpu_quota = [1, 2]\n", "resources.cpu_quota", "expected cores"),
    (BASE + "[resources]\ncpu_quota = { a = 1 }\n", "resources.cpu_quota", "expected cores"),
    (BASE + "[resources]\ncpu_quota = nan\n", "resources.cpu_quota", "finite"),
    (BASE + '[resources]\ncpu_quota = "inf"\n', "resources.cpu_quota", "finite"),
    (BASE + '[resources]\nmemory_limit = "' + "9" * 400 + '"\n', "resources.memory_limit", "out of range"),
    (BASE + '[resources]\nmemory_limit = "\u0661\u0662\u0668M"\n', "resources.memory_limit", "invalid size"),
    (BASE + '[lifecycle.run]\nstop_timeout = "' + "9" * 400 + 's"\n', "lifecycle.run.stop_timeout", "out of range"),
    (BASE + '[lifecycle.run.health]\ncheck = "cmd:x"\ninterval = "\u0665s"\n', "lifecycle.run.health.interval", "invalid duration"),
    (BASE + "[resources]\nopen_files = 1180591620717411303424\n", "resources.open_files", "64-bit"),
    (BASE.replace('name = "a"', 'name = "a\\n"'), "metadata.name", "[A-Za-z0-9._+-]"),
    (with_exec('env = { "K\\n" = "v" }'), "lifecycle.run.exec.env.K\n", "environment variable name"),
    (with_exec('args = ["a\\u0000b"]'), "lifecycle.run.exec.args[0]", "NUL"),
    (BASE.replace('command = "x"', 'command = "x\\u0000"'), "lifecycle.run.exec.command", "NUL"),
    (with_exec("[lifecycle.run.security]\ncapabilities = [\"NET_ADMIN\\n\"]"), "lifecycle.run.security.capabilities", "capability"),
    (with_exec('[lifecycle.run.security]\nuser = "root\\n"'), "lifecycle.run.security.user", "expected user"),
]  # fmt: skip

MALFORMED = [
    # TOML 1.0 (what the Go agent's go-toml reads) refuses these; tomlkit took them
    BASE.replace('command = "x"', 'command = "x\\e"'),
    BASE.replace('version = "1"\n', 'version = "1"\n\r'),
    BASE + "\x00\n",
    BASE[:17],
]


class TestRefused:
    @pytest.mark.parametrize(("text", "field", "message"), REFUSED)
    def test_invalid_values_name_the_field(self, text: str, field: str, message: str) -> None:
        """Values that used to crash the parser or be accepted are located refusals."""
        with pytest.raises(ValidationError) as exc:
            parse_recipe(text, file="r.toml")
        assert exc.value.file == "r.toml"
        assert exc.value.field == field
        assert exc.value.line is not None
        assert message in str(exc.value)

    @pytest.mark.parametrize("text", MALFORMED)
    def test_malformed_toml_is_refused(self, text: str) -> None:
        """Invalid TOML is refused with file and line, never accepted."""
        with pytest.raises(ValidationError, match=r"^r\.toml:\d+: malformed TOML"):
            parse_recipe(text, file="r.toml")

    def test_versions_take_ascii_digits_only(self) -> None:
        """Unicode digits are not version numbers (int() would take them)."""
        with pytest.raises(ValueError):
            Version.parse("\u0661.0.0")
        with pytest.raises(ValueError):
            Constraint.parse("\u0661.x")

    @pytest.mark.parametrize("text", ["\u0665s", "1e400s", "9" * 400 + "h", "99999999999h"])
    def test_durations_in_range(self, text: str) -> None:
        """Durations are ASCII and at most Go's int64 nanoseconds (about 292 years)."""
        with pytest.raises(ValueError):
            parse_duration(text)

    def test_sizes_in_range(self) -> None:
        """A size that would overflow is a ValueError, not an OverflowError."""
        with pytest.raises(ValueError):
            parse_size("9" * 400)
        with pytest.raises(ValueError):
            parse_size(1 << 64)


def _paths(tmp: Path) -> dict[str, Path]:
    (tmp / "file").write_text(BASE)
    (tmp / "dir").mkdir()
    os.symlink("loop", tmp / "loop")
    os.mkfifo(tmp / "fifo")
    return {
        "too long": tmp / ("a" * 5000),
        "through a file": tmp / "file" / "x",
        "NUL": Path(f"{tmp}/x\0y"),
        "directory": tmp / "dir",
        "symlink loop": tmp / "loop",
        "FIFO without writer": tmp / "fifo",
        "device": Path("/dev/zero"),
        "missing": tmp / "missing.toml",
    }


PATH_CASES = ["too long", "through a file", "NUL", "directory", "symlink loop",
              "FIFO without writer", "device", "missing"]  # fmt: skip


class TestPaths:
    @pytest.mark.parametrize("case", PATH_CASES)
    def test_unreadable_paths_are_named(self, case: str, tmp_path: Path) -> None:
        """Every loader turns a bad path into a ValidationError naming it (no OSError,
        ValueError, RuntimeError, no hang on a FIFO, no endless read of /dev/zero)."""
        path = _paths(tmp_path)[case]
        for load in (
            lambda: load_recipe(path),
            lambda: load_plan(path),
            lambda: load_config(path, {}),
        ):
            with pytest.raises(ValidationError) as exc:
                load()
            assert str(path)[:100] in str(exc.value)

    @pytest.mark.parametrize("ref", ["a" * 5000, "a/" * 3000 + "x", "\\u0000", "loop", "file/x"])
    def test_recipe_references_are_named(self, ref: str, tmp_path: Path) -> None:
        """A plan's recipe path that cannot be resolved is a refusal naming the plan line."""
        _paths(tmp_path)
        (tmp_path / "plan.toml").write_text(f'[[components]]\nname = "x"\nrecipe = "{ref}"\n')
        with pytest.raises(ValidationError) as exc:
            load_desired(tmp_path / "plan.toml", root=tmp_path, environ={})
        assert (exc.value.field or "").endswith("recipe")
        assert exc.value.line == 3

    def test_binary_files(self, tmp_path: Path) -> None:
        """Bytes that are not UTF-8 are named with their line."""
        path = tmp_path / "agent.toml"
        path.write_bytes(b'[device]\nid = "\xff"\n')
        with pytest.raises(ValidationError, match=r"agent\.toml:2: not UTF-8"):
            load_config(path, {})


class TestDamagedSnapshot:
    @pytest.mark.parametrize(
        "data",
        [
            {"components": "x"},
            {"components": [1]},
            {"components": [{"name": 1, "recipe_ref": "r", "recipe_text": ""}]},
            {"components": [{"name": "a", "recipe_ref": "r"}]},
            {"components": [], "sources": [1]},
        ],
    )
    def test_wrong_types_are_validation_errors(self, data: dict[str, object]) -> None:
        """A snapshot of the wrong shape names the field instead of raising TypeError."""
        with pytest.raises(ValidationError, match=r"agent\.json"):
            plan_from_json(data, environ={}, file="agent.json")


class TestBoundsInParsers:
    def test_nesting_is_refused_before_parsing(self) -> None:
        """20,000 nested arrays: refused with the bound, not a RecursionError."""
        text = BASE + "zz = " + "[" * 20_000 + "]" * 20_000 + "\n"
        with pytest.raises(LimitExceeded, match="KEYSTONE_MAX_TOML_DEPTH") as exc:
            parse_recipe(text, file="r.toml")
        assert exc.value.line == 6

    def test_nesting_by_headers(self) -> None:
        """Nesting by dotted headers counts too."""
        with pytest.raises(LimitExceeded, match="max_toml_depth"):
            parse_recipe(BASE + "[" + ".".join(["a"] * 40) + "]\n", file="r.toml")

    @pytest.mark.parametrize(
        "nest",
        [
            ".".join(["b"] * 20_000) + " = 1",
            "zz = {" + ".".join(["b"] * 20_000) + " = 1}",
            "zz = [{a = 1, " + ".".join(['"b"'] * 20_000) + " = 1}]",
            "[" + ".".join(["b"] * 200_000) + "]",
        ],
    )
    def test_long_dotted_keys_are_refused_before_parsing(
        self, nest: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A dotted key of 20,000 parts is 20,000 levels: refused by the scan, before the
        parser (whose cost grows with the square of the parts: 2 GB and 5 s for this one),
        which is never called."""
        parsed: list[int] = []

        def loads(text: str) -> dict[str, object]:
            parsed.append(len(text))
            raise AssertionError("the parser was reached")

        monkeypatch.setattr(
            tomlsrc,
            "tomllib",
            SimpleNamespace(loads=loads, TOMLDecodeError=tomllib.TOMLDecodeError),
        )
        with pytest.raises(LimitExceeded, match="max_toml_depth"):
            parse_recipe(BASE + nest + "\n", file="r.toml")
        assert parsed == []

    def test_depth_at_the_bound_is_accepted(self) -> None:
        """32 levels parse; 33 do not."""
        ok = "[" + ".".join(["b"] * 32) + "]\n"
        assert parse_recipe(BASE + ok, file="r.toml").unknown_fields
        with pytest.raises(LimitExceeded):
            parse_recipe(BASE + "[" + ".".join(["b"] * 33) + "]\n", file="r.toml")

    def test_components_are_bounded(self) -> None:
        """A plan of 10,000 components is refused clearly, naming the bound."""
        text = "".join(f'[[components]]\nname = "c{i}"\nrecipe = "r.toml"\n' for i in range(10_000))
        with pytest.raises(LimitExceeded) as exc:
            parse_plan(text, file="plan.toml")
        message = str(exc.value)
        assert message.startswith("plan.toml:3001: components: the number of components")
        assert "10000 components; the limit is 1000 components" in message
        assert "KEYSTONE_MAX_COMPONENTS" in message

    def test_a_raised_bound_accepts(self) -> None:
        """The same plan under a raised bound parses."""
        text = "".join(f'[[components]]\nname = "c{i}"\nrecipe = "r"\n' for i in range(1500))
        plan = parse_plan(text, file="plan.toml", limits=Limits(max_components=2000))
        assert len(plan.entries) == 1500

    def test_size_is_refused_before_parsing(self, tmp_path: Path) -> None:
        """A file over max_recipe_bytes is refused from its size, before it is read."""
        path = tmp_path / "big.recipe.toml"
        with path.open("wb") as f:
            f.write(BASE.encode())
            f.truncate(50 << 20)  # sparse: 50 MB of NULs after a valid start
        with pytest.raises(LimitExceeded, match="KEYSTONE_MAX_RECIPE_BYTES") as exc:
            load_recipe(path)
        assert exc.value.bound == "max_recipe_bytes"
        assert str(path) in str(exc.value)
        assert "52428800 bytes is over" not in str(exc.value)
        assert "(50 MiB; the limit is 1 MiB)" in str(exc.value)

    def test_refusing_50_mb_stays_small(self, tmp_path: Path) -> None:
        """The process refusing a 50 MB recipe stays under the agent's 40 MB RSS budget: the
        file is never read (it is 50 MB of real data here, not a sparse file)."""
        path = tmp_path / "big.recipe.toml"
        with path.open("w") as f:
            f.write(BASE.replace('"x"', '"x', 1))
            for _ in range(50):
                f.write("x" * (1 << 20))
            f.write('"\n')
        # VmHWM (the high-water mark of this process image), not ru_maxrss, which Linux
        # carries over from the forking test process
        code = (
            "import sys\n"
            "from pathlib import Path\n"
            "from keystone.errors import LimitExceeded\n"
            "from keystone.recipe import load_recipe\n"
            "try:\n"
            "    load_recipe(Path(sys.argv[1]))\n"
            "except LimitExceeded:\n"
            "    status = Path('/proc/self/status').read_text()\n"
            "    print(next(l.split()[1] for l in status.splitlines() if l.startswith('VmHWM')))\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True
        )
        assert int(out.stdout) < 40 * 1024, f"peak RSS {int(out.stdout) // 1024} MB"

    def test_text_over_the_bound(self) -> None:
        """Text already in memory (a git blob, a request body) is measured before parsing."""
        with pytest.raises(LimitExceeded, match="max_plan_bytes"):
            parse_plan(PLAN + "#" * 2000, file="plan.toml", limits=Limits(max_plan_bytes=1000))
