"""Recipes in the Go Keystone's format load unchanged; bad ones say where and why."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import pytest

from keystone.errors import ValidationError
from keystone.recipe import DependencyType, Recipe, RestartPolicy, load_recipe, parse_recipe

GO_README_RECIPE = """
[metadata]
name = "com.example.hello"
version = "1.0.0"

[[artifacts]]
uri = "https://example.com/artifacts/hello.tar.gz"
sha256 = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
unpack = true

[lifecycle.run.exec]
command = "./hello"
args = ["--interval", "30s"]
"""

FULL_RECIPE = """
[metadata]
name = "com.example.api"
version = "1.2.0"
description = "API"
publisher = "Example"
type = "service"

[[dependencies]]
name = "com.example.db"
type = "hard"
version = ">=1.0.0, <2.0.0"

[[dependencies]]
name = "com.example.metrics"
type = "SOFT"

[[dependencies]]
name = "com.example.net"
type = "ordering"

[[artifacts]]
uri = "https://api.github.com/repos/org/repo/actions/artifacts/123/zip"
sha256 = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
sig_uri = "https://example.com/api.zip.sig"
cert_uri = "https://example.com/leaf.pem"
unpack = true
github_token = ""
[artifacts.headers]
Accept = "application/vnd.github+json"

[lifecycle.install]
script = "chmod +x api"
require_privilege = false

[lifecycle.run]
type = "process"
restart_policy = "on-failure"
max_retries = 7

[lifecycle.run.exec]
command = "./api"
args = ["--port", "${API_PORT:-8081}", "--db", "${DB_URL}"]
env = { LOG_LEVEL = "info", HOME_DIR = "${HOME_DIR:-/tmp}" }

[lifecycle.run.health]
check = "http://127.0.0.1:8081/healthz"
interval = "5s"
timeout = "2s"
failure_threshold = 3

[lifecycle.run.security]
user = "api:api"
no_new_privileges = true
capabilities = ["NET_BIND_SERVICE"]

[lifecycle.reload]
signal = "SIGHUP"
grace = "10s"

[lifecycle.shutdown]
script = "echo bye"

[resources]
open_files = 4096
memory_limit = "128M"
cpu_quota = "50%"
"""


def _asdict_hash(r: Recipe) -> str:
    """The content hash as first defined, over ``dataclasses.asdict`` (the reference)."""
    data = asdict(r)
    for key in ("source", "unknown_fields", "text", "drift", "defer"):
        data.pop(key, None)
    for dep in data["dependencies"]:
        dep.pop("line", None)
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


_DATASET = (
    '\n[[datasets]]\nname = "maps"\nmanifest = "https://h/m.toml"\n[datasets.headers]\nA = "b"\n'
)
_DELTA = 'unpack = true\n[artifacts.delta]\nserver = "https://d"\nsha256 = "' + "ab" * 32 + '"'
_CONTAINER_RECIPES = Path(__file__).parent.parent / "data" / "go_container_recipes"
_HASHED = [
    (FULL_RECIPE, {"DB_URL": "x"}),
    (GO_README_RECIPE, {}),
    (GO_README_RECIPE + _DATASET, {}),
    (GO_README_RECIPE.replace("unpack = true", _DELTA), {}),
    *(
        (p.read_text(), {"API_KEY": "k", "POSTGRES_PASSWORD": "p", "KEYSTONE_HOME": "/k"})
        for p in sorted(_CONTAINER_RECIPES.glob("*.recipe.toml"))
    ),
]


class TestContentHash:
    @pytest.mark.parametrize(("text", "env"), _HASHED)
    def test_same_as_over_asdict(self, text: str, env: dict[str, str]) -> None:
        """The hash is the one over ``asdict`` (installed components keep their hashes)."""
        r = parse_recipe(text, file="r.recipe.toml", environ=env)
        assert r.content_hash() == _asdict_hash(r)


class TestGoFormat:
    def test_go_readme_recipe_loads(self) -> None:
        """The recipe from the Go README (no [lifecycle.run] header) loads with Go defaults."""
        r = parse_recipe(GO_README_RECIPE, file="hello.recipe.toml")
        assert r.name == "com.example.hello"
        assert r.artifacts[0].sha256 == "0123456789abcdef" * 4
        assert r.artifacts[0].unpack is True
        assert r.run.restart_policy is RestartPolicy.ALWAYS
        assert r.run.max_retries == 5
        assert r.run.exec is not None and r.run.exec.args == ("--interval", "30s")
        assert r.unknown_fields == ()

    def test_every_field_loads(self) -> None:
        """Every table and field of GO-COMPAT's recipe reference parses into the model."""
        r = parse_recipe(FULL_RECIPE, file="api.recipe.toml", environ={"DB_URL": "postgres://db"})
        assert [d.type for d in r.dependencies] == [
            DependencyType.HARD,
            DependencyType.SOFT,
            DependencyType.ORDERING,
        ]
        assert r.artifacts[0].headers == {"Accept": "application/vnd.github+json"}
        assert r.artifacts[0].github_token is None
        assert r.run.exec is not None
        assert r.run.exec.args == ("--port", "8081", "--db", "postgres://db")
        assert r.run.exec.env == {"LOG_LEVEL": "info", "HOME_DIR": "/tmp"}
        assert r.run.health is not None and r.run.health.interval == 5.0
        assert r.run.security.capabilities == ("CAP_NET_BIND_SERVICE",)
        assert r.run.security.user == "api:api"
        assert r.reload is not None and r.reload.signal == "SIGHUP" and r.reload.grace == 10.0
        assert r.shutdown is not None and r.shutdown.script == "echo bye"
        assert r.resources.memory_limit == 128 << 20
        assert r.resources.cpu_quota == 0.5
        assert r.run.max_retries == 7

    def test_content_hash_tracks_what_runs(self) -> None:
        """Changing args changes the content hash; a comment does not."""
        env = {"DB_URL": "x"}
        a = parse_recipe(FULL_RECIPE, file="a", environ=env)
        b = parse_recipe(FULL_RECIPE + "\n# a comment\n", file="b", environ=env)
        c = parse_recipe(FULL_RECIPE.replace('"--port"', '"--listen"'), file="c", environ=env)
        assert a.content_hash() == b.content_hash()
        assert a.content_hash() != c.content_hash()


BAD = [
    (
        "max_retries = 7",
        "max_retries = 7.0",
        "lifecycle.run.max_retries",
        "expected an integer, got float",
    ),
    ("[[artifacts]]", "[artifacts]", "artifacts", "expected an array of tables"),
    ('type = "hard"', 'type = "strong"', "dependencies[0].type", "expected hard, soft or ordering"),
    ('version = "1.2.0"', 'version = "../1.2"', "metadata.version", "[A-Za-z0-9._+-]"),
    ('name = "com.example.api"', 'name = "a/b"', "metadata.name", "[A-Za-z0-9._+-]"),
    (
        'restart_policy = "on-failure"',
        'restart_policy = "sometimes"',
        "lifecycle.run.restart_policy",
        "expected always",
    ),
    (
        'interval = "5s"',
        'interval = "5 parsecs"',
        "lifecycle.run.health.interval",
        "invalid duration",
    ),
    (
        'check = "http://127.0.0.1:8081/healthz"',
        'check = "ftp://x"',
        "lifecycle.run.health.check",
        "expected http",
    ),
    ('memory_limit = "128M"', 'memory_limit = "lots"', "resources.memory_limit", "invalid size"),
    ("open_files = 4096", 'open_files = "4096"', "resources.open_files", "expected an integer"),
    ("unpack = true", 'unpack = "yes"', "artifacts[0].unpack", "expected true or false"),
    ('sha256 = "0123', 'sha256 = "zz23', "artifacts[0].sha256", "64 hex digits"),
    (
        "no_new_privileges = true",
        "no_new_privileges = 1",
        "lifecycle.run.security.no_new_privileges",
        "true or false",
    ),
    ('signal = "SIGHUP"', 'signal = "SIGKILL"', "lifecycle.reload.signal", "SIGHUP"),
]


class TestBadRecipes:
    @pytest.mark.parametrize(("old", "new", "field", "message"), BAD)
    def test_error_names_file_line_field(
        self, old: str, new: str, field: str, message: str
    ) -> None:
        """Each mistyped field is refused with file, line, field and what was expected."""
        text = FULL_RECIPE.replace(old, new, 1)
        assert text != FULL_RECIPE
        with pytest.raises(ValidationError) as exc:
            parse_recipe(text, file="api.recipe.toml", environ={"DB_URL": "x"})
        err = exc.value
        assert err.file == "api.recipe.toml"
        assert err.field == field
        assert err.line is not None
        assert message in str(err)
        assert text.splitlines()[err.line - 1].strip().split("=")[0].strip() in new + "[" + field

    def test_unknown_fields_are_listed_with_lines(self) -> None:
        """Unknown keys are collected with their line numbers, not silently dropped."""
        text = FULL_RECIPE.replace("[resources]", "[resources]\ncpu_shares = 3").replace(
            'publisher = "Example"', 'publisher = "Example"\nowner = "me"'
        )
        r = parse_recipe(text, file="api.recipe.toml", environ={"DB_URL": "x"})
        assert len(r.unknown_fields) == 2
        assert r.unknown_fields[0].startswith("api.recipe.toml:7: unknown field metadata.owner")
        assert "resources.cpu_shares" in r.unknown_fields[1]

    def test_malformed_toml(self) -> None:
        """A TOML syntax error names the file and line."""
        with pytest.raises(ValidationError, match=r"x\.toml:3: malformed TOML"):
            parse_recipe('[metadata]\nname = "a"\nversion = \n', file="x.toml")

    def test_missing_variable(self) -> None:
        """An unset ${VAR} without default is an error naming the variable and field."""
        with pytest.raises(
            ValidationError, match=r"lifecycle\.run\.exec\.args: \$\{DB_URL\} is not set"
        ):
            parse_recipe(FULL_RECIPE, file="api.recipe.toml", environ={})

    def test_datasets_and_delta_accepted(self) -> None:
        """Datasets and delta updates, once refused by name, parse onto the recipe."""
        r = parse_recipe(
            GO_README_RECIPE + '\n[[datasets]]\nname = "maps"\nmanifest = "https://h/m.toml"\n',
            file="r",
        )
        assert [d.name for d in r.datasets] == ["maps"]
        assert r.datasets[0].sig_uri == "https://h/m.toml.sig"
        assert r.datasets[0].required and r.datasets[0].keep == 2
        sha = "ab" * 32
        delta = GO_README_RECIPE.replace(
            "unpack = true",
            f'unpack = true\n[artifacts.delta]\nserver = "https://d"\nsha256 = "{sha.upper()}"',
        )
        spec = parse_recipe(delta, file="r").artifacts[0].delta
        assert spec is not None
        assert (spec.server, spec.sha256, spec.format) == ("https://d", sha, "bsdiff+zstd")
        assert parse_recipe(GO_README_RECIPE, file="r").artifacts[0].delta is None

    def test_delta_and_dataset_errors_are_located(self) -> None:
        """A delta without its tar digest and a bad dataset name name the file and field."""
        delta = GO_README_RECIPE.replace(
            "unpack = true", 'unpack = true\n[artifacts.delta]\nserver = "https://d"'
        )
        with pytest.raises(ValidationError, match=r"^r:\d+: artifacts\[0\]\.delta\.sha256"):
            parse_recipe(delta, file="r")
        with pytest.raises(ValidationError, match=r"datasets\[0\]\.name"):
            parse_recipe(
                GO_README_RECIPE + '\n[[datasets]]\nname = "a/b"\nmanifest = "https://h/m"\n',
                file="r",
            )

    def test_dataset_reload_rules(self) -> None:
        """With datasets, the reload follows Go's rules: one of signal or script."""
        both = (
            GO_README_RECIPE
            + '\n[[datasets]]\nname = "maps"\nmanifest = "https://h/m"\n'
            + '[lifecycle.reload]\nsignal = "SIGHUP"\nscript = "kill -HUP 1"\n'
        )
        if "[lifecycle.reload]" in GO_README_RECIPE:
            pytest.skip("the sample already declares a reload")
        with pytest.raises(ValidationError, match="pick one"):
            parse_recipe(both, file="r")
        # Without datasets the same table keeps its old meaning.
        plain = both.replace('[[datasets]]\nname = "maps"\nmanifest = "https://h/m"\n', "")
        assert parse_recipe(plain, file="r").reload is not None

    def test_container_without_its_table_refused(self) -> None:
        """A container component names the table it lacks (tests/unit/test_container_recipes)."""
        with pytest.raises(ValidationError, match=r"needs \[lifecycle\.run\.container\]"):
            parse_recipe(GO_README_RECIPE + '\n[lifecycle.run]\ntype = "container"\n', file="r")

    def test_missing_exec(self) -> None:
        """A recipe without a command says which table is missing."""
        with pytest.raises(ValidationError, match=r"lifecycle\.run\.exec"):
            parse_recipe(
                '[metadata]\nname = "a"\nversion = "1"\n[lifecycle.run]\nmax_retries = 1\n',
                file="r",
            )

    def test_missing_file(self, tmp_path: Path) -> None:
        """A missing recipe file is named."""
        with pytest.raises(ValidationError, match=r"nope\.toml: recipe file not found"):
            load_recipe(tmp_path / "nope.toml", display="nope.toml")
