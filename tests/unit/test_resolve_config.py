"""Plan resolution by labels, scheduler arithmetic and agent configuration (tables)."""

from __future__ import annotations

from pathlib import Path

import pytest

from keystone.config import load_config, parse_config
from keystone.errors import ValidationError
from keystone.sync.resolve import plan_files, repo_path, resolve
from keystone.sync.scheduler import backoff_delay, device_offset


class Tree:
    """An in-memory revision."""

    def __init__(self, files: dict[str, str]) -> None:
        self.files = files

    def read(self, path: str) -> bytes | None:
        text = self.files.get(path)
        return None if text is None else text.encode()


def recipe(name: str, version: str = "1.0.0") -> str:
    return f'[metadata]\nname = "{name}"\nversion = "{version}"\n[lifecycle.run.exec]\ncommand = "true"\n'


def entry(name: str, recipe_path: str, enabled: bool = True) -> str:
    return f'[[components]]\nname = "{name}"\nrecipe = "{recipe_path}"\n' + (
        "" if enabled else "enabled = false\n"
    )


FLEET = {
    "recipes/hello.recipe.toml": recipe("hello"),
    "recipes/hello2.recipe.toml": recipe("hello", "2.0.0"),
    "recipes/sensor.recipe.toml": recipe("sensor"),
    "recipes/uplink.recipe.toml": recipe("uplink"),
    "plans/default.toml": entry("hello", "recipes/hello.recipe.toml"),
    "labels/gateway/plan.toml": entry("sensor", "recipes/sensor.recipe.toml"),
    "labels/berlin/plan.toml": entry("uplink", "recipes/uplink.recipe.toml")
    + entry("hello", "recipes/hello2.recipe.toml"),
    "devices/gw-1/plan.toml": entry("uplink", "recipes/uplink.recipe.toml", enabled=False),
}


class TestResolve:
    @pytest.mark.parametrize(
        ("device", "labels", "want"),
        [
            ("x", [], {"hello": ("1.0.0", "plans/default.toml")}),
            (
                "x",
                ["gateway"],
                {
                    "hello": ("1.0.0", "plans/default.toml"),
                    "sensor": ("1.0.0", "labels/gateway/plan.toml"),
                },
            ),
            (
                "x",
                ["gateway", "berlin"],
                {
                    "hello": ("2.0.0", "labels/berlin/plan.toml"),
                    "sensor": ("1.0.0", "labels/gateway/plan.toml"),
                    "uplink": ("1.0.0", "labels/berlin/plan.toml"),
                },
            ),
            ("gw-1", ["berlin"], {"hello": ("2.0.0", "labels/berlin/plan.toml")}),
            ("x", ["unknown-label"], {"hello": ("1.0.0", "plans/default.toml")}),
        ],
    )
    def test_merge_order_and_provenance(
        self, device: str, labels: list[str], want: dict[str, tuple[str, str]]
    ) -> None:
        """default, then labels in order, then the device; each component names its file."""
        plan = resolve(Tree(FLEET), device_id=device, labels=labels, environ={})
        assert {n: (c.version, c.origin) for n, c in plan.components.items()} == want

    def test_missing_recipe_names_revision(self) -> None:
        """A plan naming a missing recipe says which file, line and revision."""
        files = {"plans/default.toml": entry("a", "recipes/nope.recipe.toml")}
        with pytest.raises(
            ValidationError,
            match=r"plans/default.toml@abcdef012345:3: recipe: recipe file not found at abcdef012345",
        ):
            resolve(Tree(files), device_id="d", labels=[], environ={}, revision="abcdef0123456789")

    @pytest.mark.parametrize("bad", ["../outside.toml", "/etc/passwd", "recipes/../../x.toml"])
    def test_paths_may_not_leave_the_repo(self, bad: str) -> None:
        """Absolute paths and paths that climb out of the repository are refused."""
        with pytest.raises(ValidationError):
            repo_path(bad)

    def test_unsafe_label(self) -> None:
        """Labels become path segments, so they must be safe."""
        with pytest.raises(ValidationError, match="label"):
            plan_files("d", ["../devices"])


class TestScheduler:
    def test_offset_is_fixed_and_spread(self) -> None:
        """Each device keeps its slot; a fleet spreads over the window."""
        assert device_offset("gw-1", 60) == device_offset("gw-1", 60)
        offsets = [device_offset(f"dev-{i}", 60) for i in range(1000)]
        assert all(0 <= o < 60 for o in offsets)
        buckets = [sum(1 for o in offsets if b * 6 <= o < (b + 1) * 6) for b in range(10)]
        assert min(buckets) > 60, buckets
        assert device_offset("x", 0) == 0

    def test_backoff(self) -> None:
        """Unreachable polls back off exponentially up to a cap."""
        assert [backoff_delay(60, n) for n in range(6)] == [60, 120, 240, 480, 960, 960]
        assert backoff_delay(600, 4) == 1800


class TestConfig:
    def test_full_config(self, tmp_path: Path) -> None:
        """Every section parses; relative paths are relative to the file."""
        cfg = parse_config(
            '[device]\nid = "gw-001"\nlabels = ["gateway", "site-berlin"]\n'
            '[source]\ntype = "git"\nurl = "https://git.example.com/fleet.git"\ninterval = "60s"\njitter = "10s"\nsoak = "30s"\n'
            '[trust]\nallowed_signers = "allowed_signers"\nverify = "all"\nmax_age = "24h"\n'
            '[api]\nlisten = "127.0.0.1:9090"\n[paths]\nruntime = "rt"\n[bundles]\nwatch = ["/media/*/keystone"]\n',
            file=str(tmp_path / "agent.toml"),
        )
        assert cfg.device_id == "gw-001" and cfg.labels == ("gateway", "site-berlin")
        assert cfg.source is not None and cfg.source.interval == 60 and cfg.source.soak == 30
        assert (
            cfg.trust.allowed_signers == tmp_path / "allowed_signers" and cfg.trust.max_age == 86400
        )
        assert cfg.runtime == tmp_path / "rt" and cfg.api.listen == "127.0.0.1:9090"

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ('[source]\ntype = "svn"\nurl = "x"\n', "expected git or http"),
            ('[trust]\nverify = "some"\n', "expected tip or all"),
            ('[source]\nurl = "x"\ninterval = "soon"\n', "source.interval"),
            ('[device]\nlables = ["a"]\n', "unknown field device.lables"),
            ('[device]\nlabels = ["../x"]\n', "label"),
        ],
    )
    def test_bad_config(self, text: str, message: str) -> None:
        """A bad config names the file, line and field."""
        with pytest.raises(ValidationError, match=message):
            parse_config(text, file="agent.toml")

    def test_env_overrides_file(self, tmp_path: Path) -> None:
        """Environment variables beat the file."""
        p = tmp_path / "agent.toml"
        p.write_text('[device]\nid = "from-file"\n')
        cfg = load_config(p, {"KEYSTONE_DEVICE_ID": "from-env", "KEYSTONE_LABELS": "a, b"})
        assert cfg.device_id == "from-env" and cfg.labels == ("a", "b")
