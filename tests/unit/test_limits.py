"""keystone.limits: defaults, overrides from the environment and agent.toml, refusals."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from keystone.config import load_config, parse_config
from keystone.errors import LimitExceeded, UsageError, ValidationError
from keystone.limits import BOUNDS, Limits, read_bounded

DOCS = Path(__file__).resolve().parents[2] / "docs" / "limits.md"


class TestLimits:
    def test_defaults(self) -> None:
        """The documented defaults."""
        lim = Limits.from_env({})
        assert (lim.max_recipe_bytes, lim.max_plan_bytes, lim.max_components) == (
            1 << 20,
            1 << 20,
            1000,
        )
        assert lim.max_toml_depth == 32

    @pytest.mark.parametrize("name", sorted(BOUNDS))
    def test_every_bound_has_its_variable(self, name: str) -> None:
        """Each bound is raised by its environment variable."""
        lim = Limits.from_env({BOUNDS[name].env: "4096"})
        assert getattr(lim, name) == 4096

    @pytest.mark.parametrize("raw", ["0", "-1", "1M", "x", "1.5"])
    def test_bad_values_are_usage_errors(self, raw: str) -> None:
        """A variable that is not a whole number >= 1 names itself."""
        with pytest.raises(UsageError, match="KEYSTONE_MAX_COMPONENTS"):
            Limits.from_env({"KEYSTONE_MAX_COMPONENTS": raw})

    def test_refusal_names_bound_and_remedy(self) -> None:
        """A refusal says what, how much, the limit and how to raise it."""
        err = Limits().refuse("max_recipe_bytes", 50 << 20, what="the file", file="r.toml")
        assert isinstance(err, ValidationError)
        assert str(err) == (
            "r.toml: the file is over the limit (50 MiB; the limit is 1 MiB): raise it with "
            "KEYSTONE_MAX_RECIPE_BYTES or [limits] max_recipe_bytes in agent.toml"
        )
        assert (err.bound, err.limit) == ("max_recipe_bytes", 1 << 20)

    def test_docs_list_every_bound(self) -> None:
        """docs/limits.md has a row for every bound, with its variable and key."""
        text = DOCS.read_text()
        for bound in BOUNDS.values():
            assert re.search(
                rf"`{bound.env}` \| `{bound.name}` \| {re.escape(bound.refuses)}", text
            )


class TestConfigLimits:
    def test_limits_table(self) -> None:
        """[limits] in agent.toml sets bounds; sizes may be written as sizes."""
        cfg = parse_config(
            '[limits]\nmax_recipe_bytes = "2M"\nmax_components = 50\n', file="agent.toml"
        )
        assert cfg.limits.max_recipe_bytes == 2 << 20
        assert cfg.limits.max_components == 50
        assert cfg.limits.max_plan_bytes == 1 << 20

    @pytest.mark.parametrize(
        "line",
        ["max_components = 0", 'max_components = "5"', "max_depth = 3", "max_plan_bytes = true"],
    )
    def test_bad_limits(self, line: str) -> None:
        """A bad or unknown [limits] key is refused with its line."""
        with pytest.raises(ValidationError, match=r"agent\.toml"):
            parse_config(f"[limits]\n{line}\n", file="agent.toml")

    def test_environment_wins_over_the_file(self, tmp_path: Path) -> None:
        """As for every setting: the environment over the file over the default."""
        path = tmp_path / "agent.toml"
        path.write_text("[limits]\nmax_components = 50\nmax_toml_depth = 8\n")
        cfg = load_config(path, {"KEYSTONE_MAX_COMPONENTS": "70"})
        assert (cfg.limits.max_components, cfg.limits.max_toml_depth) == (70, 8)

    def test_config_size(self, tmp_path: Path) -> None:
        """agent.toml itself is bounded (by the environment)."""
        path = tmp_path / "agent.toml"
        path.write_text('[device]\nid = "a"\n' + "#" * 5000 + "\n")
        with pytest.raises(LimitExceeded, match="KEYSTONE_MAX_CONFIG_BYTES"):
            load_config(path, {"KEYSTONE_MAX_CONFIG_BYTES": "1000"})


class TestReadBounded:
    def test_reads_a_file_under_the_bound(self, tmp_path: Path) -> None:
        """A regular file at the bound is read whole."""
        path = tmp_path / "f"
        path.write_text("x" * 100)
        text = read_bounded(
            path, max_bytes=100, limits=Limits(), bound="max_plan_bytes", display="f", what="plan"
        )
        assert text == "x" * 100

    def test_one_byte_over(self, tmp_path: Path) -> None:
        """One byte over the bound is refused."""
        path = tmp_path / "f"
        path.write_text("x" * 101)
        with pytest.raises(LimitExceeded, match="plan file is over the limit"):
            read_bounded(
                path,
                max_bytes=100,
                limits=Limits(),
                bound="max_plan_bytes",
                display="f",
                what="plan",
            )


class TestWireLimits:
    def test_environ_round_trips(self) -> None:
        """Limits.environ() is read back by from_env (how [limits] reaches the workers)."""
        lim = Limits(max_pack_bytes=12345, max_refs=7, max_api_connections=3)
        assert Limits.from_env(lim.environ()) == lim

    def test_sizes_in_the_environment(self) -> None:
        """A byte bound in the environment may be written as a size, as before."""
        assert Limits.from_env({"KEYSTONE_MAX_BUNDLE_BYTES": "1M"}).max_bundle_bytes == 1 << 20

    def test_header_checks(self) -> None:
        """A header flood or a long header line is refused naming its bound."""
        lim = Limits(max_headers=3, max_header_line_bytes=32)
        lim.check_headers([("A", "1"), ("B", "2")], what="x")
        with pytest.raises(LimitExceeded, match="KEYSTONE_MAX_HEADERS"):
            lim.check_headers([("H", "v")] * 4, what="the answer of http://h")
        with pytest.raises(LimitExceeded, match=r"'X-Big' of y.*max_header_line_bytes"):
            lim.check_headers([(b"X-Big", b"v" * 40)], what="y")


class TestSyncDeadlineConfig:
    def test_default_file_and_environment(self) -> None:
        """[source] deadline sets the sync deadline; KEYSTONE_SYNC_DEADLINE wins over it."""
        assert parse_config('[source]\nurl = "x"\n', file="a.toml").source.deadline == 300
        text = '[source]\nurl = "x"\ndeadline = "2m"\n'
        assert parse_config(text, file="a.toml").source.deadline == 120
        for raw, want in (("45", 45.0), ("10m", 600.0)):
            path = Path(self.tmp) / "agent.toml"
            path.write_text(text)
            cfg = load_config(path, {"KEYSTONE_SYNC_DEADLINE": raw})
            assert cfg.source is not None and cfg.source.deadline == want

    @pytest.fixture(autouse=True)
    def _tmp(self, tmp_path: Path) -> None:
        self.tmp = tmp_path

    @pytest.mark.parametrize("raw", ["0", "soon", "-3s"])
    def test_bad_environment(self, raw: str) -> None:
        """A KEYSTONE_SYNC_DEADLINE that is no positive duration names itself."""
        path = self.tmp / "agent.toml"
        path.write_text('[source]\nurl = "x"\n')
        with pytest.raises(ValidationError, match="KEYSTONE_SYNC_DEADLINE"):
            load_config(path, {"KEYSTONE_SYNC_DEADLINE": raw})

    def test_zero_in_the_file(self) -> None:
        """deadline = "0s" is refused at its line."""
        with pytest.raises(ValidationError, match=r"a\.toml:3.*deadline"):
            parse_config('[source]\nurl = "x"\ndeadline = "0s"\n', file="a.toml")
