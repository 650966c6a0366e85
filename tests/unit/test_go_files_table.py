"""Go Keystone recipe and plan files, written in its formats, and what this agent does with them.

Each case is a small tree of files (a plan and its recipes, as a Go user keeps them) and the
expected outcome: ``accept`` (with the components it yields) or ``refuse`` with words of the
error (the file and line, the field, the value). Plans load the way a local plan loads
(``keystone agent --apply``): relative recipe paths under the working directory, absolute ones
anywhere, ``name:version`` from the recipe store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from keystone.errors import KeystoneError
from keystone.plan import RecipeStore, load_desired


def recipe(name: str, version: str = "1.0.0", body: str = "", *, run: str | None = None) -> str:
    """A Go recipe: [metadata], then ``body``, then a process run section."""
    run_section = (
        run
        if run is not None
        else '[lifecycle.run]\nrestart_policy = "on-failure"\nmax_retries = 3\n'
        '[lifecycle.run.exec]\ncommand = "./app"\n'
    )
    return f'[metadata]\nname = "{name}"\nversion = "{version}"\n{body}\n{run_section}'


def plan(*components: tuple[str, str]) -> str:
    return "".join(f'[[components]]\nname = "{n}"\nrecipe = "{r}"\n\n' for n, r in components)


DEMO_PRODUCER = recipe(
    "com.demo.producer",
    body='''description = "Demo data-producer v1"
publisher = "keystone-demo"

[[dependencies]]
name = "com.demo.config"
version = "1.0.0"
type = "hard"

[[artifacts]]
uri = "http://localhost:9000/data-producer-v1"
sha256 = "'''
    + "ab" * 32
    + '''"

[lifecycle.install]
script = """
cp ../../../artifacts/com.demo.producer/1.0.0/data-producer-v1 ./app
chmod +x ./app
"""
''',
    run="""[lifecycle.run]
restart_policy = "on-failure"
max_retries = 3

[lifecycle.run.exec]
command = "./app"

[lifecycle.run.exec.env]
PRODUCER_ADDR = ":7002"
CONFIG_URL = "http://localhost:7001/config"

[lifecycle.run.health]
check = "http://localhost:7002/healthz"
interval = "3s"
timeout = "2s"
failure_threshold = 3
""",
)

CONFINED = recipe(
    "com.keystone.confined",
    run="""[lifecycle.run]
restart_policy = "always"

[lifecycle.run.exec]
command = "/usr/bin/sleep"
args = ["3600"]

[lifecycle.run.security]
no_new_privileges = true
capabilities = []

[lifecycle.run.health]
check = "cmd:true"
interval = "500ms"

[resources]
open_files = 1024
memory_limit = "128M"
""",
)


def dep(name: str, version: str = "", kind: str = "hard") -> str:
    return f'[[dependencies]]\nname = "{name}"\nversion = "{version}"\ntype = "{kind}"\n'


@dataclass(frozen=True)
class Case:
    id: str
    files: dict[str, str]
    plan: str
    components: tuple[str, ...] = ()  # accepted: the plan's components
    refuse: tuple[str, ...] = ()  # refused: words of the error
    store: dict[tuple[str, str], str] = field(default_factory=dict)
    warns: str = ""


CASES = [
    # --- accepted -------------------------------------------------------------------------
    Case(
        "go-demo-stack",
        {
            "demo/recipes/v1/com.demo.config.recipe.toml": recipe("com.demo.config"),
            "demo/recipes/v1/com.demo.producer.recipe.toml": DEMO_PRODUCER,
            "demo/recipes/v1/com.demo.consumer.recipe.toml": recipe(
                "com.demo.consumer",
                body=dep("com.demo.config", "1.0.0") + dep("com.demo.producer", "^1.0.0"),
            ),
        },
        plan(
            ("config", "demo/recipes/v1/com.demo.config.recipe.toml"),
            ("producer", "demo/recipes/v1/com.demo.producer.recipe.toml"),
            ("consumer", "demo/recipes/v1/com.demo.consumer.recipe.toml"),
        ),
        components=("config", "consumer", "producer"),
    ),
    Case(
        "security-and-resources",
        {"configs/examples/confined.recipe.toml": CONFINED},
        plan(("confined", "configs/examples/confined.recipe.toml")),
        components=("confined",),
    ),
    Case(
        "store-reference",
        {},
        plan(("api", "com.acme.api:1.4.0")),
        components=("api",),
        store={("com.acme.api", "1.4.0"): recipe("com.acme.api", "1.4.0")},
    ),
    Case(
        "absolute-recipe-path",
        {"/ABS/opt/recipes/api.recipe.toml": recipe("com.acme.api")},
        plan(("api", "/ABS/opt/recipes/api.recipe.toml")),
        components=("api",),
    ),
    Case(
        "soft-dependency-absent",
        {"a.toml": recipe("a", body=dep("metrics", kind="soft"))},
        plan(("a", "a.toml")),
        components=("a",),
        warns="metrics",
    ),
    Case(
        "ordering-and-case-insensitive-types",
        {
            "db.toml": recipe("db"),
            "api.toml": recipe("api", body=dep("db", ">=1.0.0", "ORDERING")),
            "web.toml": recipe("web", body=dep("api", "", "Hard")),
        },
        plan(("db", "db.toml"), ("api", "api.toml"), ("web", "web.toml")),
        components=("api", "db", "web"),
    ),
    Case(
        "unknown-field-is-reported-not-refused",
        {"a.toml": recipe("a", body="[lifecycle.shutdown]\nscript = 'true'\nscirpt = 'x'\n")},
        plan(("a", "a.toml")),
        components=("a",),
    ),
    # --- refused --------------------------------------------------------------------------
    Case(
        "duplicate-component-name",
        {"a.toml": recipe("a")},
        plan(("a", "a.toml"), ("a", "a.toml")),
        refuse=("plan.toml:6", "duplicate component name 'a'"),
    ),
    Case(
        "missing-recipe-field",
        {},
        '[[components]]\nname = "a"\nrecipie = "a.toml"\n',
        refuse=("plan.toml:1", "components[0].recipe", "missing"),
    ),
    Case(
        "hard-dependency-missing",
        {"a.toml": recipe("a", body=dep("db"))},
        plan(("a", "a.toml")),
        refuse=("a.toml:4", "hard dependency on 'db'", "not in the plan"),
    ),
    Case(
        "hard-dependency-version-not-satisfied",
        {"db.toml": recipe("db", "1.2.0"), "a.toml": recipe("a", body=dep("db", "^2.0.0"))},
        plan(("db", "db.toml"), ("a", "a.toml")),
        refuse=("a.toml:4", "needs db ^2.0.0", "1.2.0"),
    ),
    Case(
        "invalid-dependency-type",
        {"db.toml": recipe("db"), "a.toml": recipe("a", body=dep("db", kind="weak"))},
        plan(("db", "db.toml"), ("a", "a.toml")),
        refuse=("a.toml:7", "dependencies[0].type", "'weak'"),
    ),
    Case(
        "dependency-cycle",
        {"a.toml": recipe("a", body=dep("b")), "b.toml": recipe("b", body=dep("a"))},
        plan(("a", "a.toml"), ("b", "b.toml")),
        refuse=("dependency cycle: a -> b -> a",),
    ),
    Case(
        "two-components-one-recipe-name",
        {"a.toml": recipe("a"), "a2.toml": recipe("a", "2.0.0")},
        plan(("x", "a.toml"), ("y", "a2.toml")),
        refuse=("plan.toml", "both use recipe 'a'"),
    ),
    Case(
        "unsafe-metadata-name",
        {"a.toml": recipe("../etc")},
        plan(("a", "a.toml")),
        refuse=("a.toml:2", "metadata.name", "'../etc'"),
    ),
    Case(
        "float-where-a-string-is-expected",
        {"a.toml": '[metadata]\nname = "a"\nversion = 1.0\n[lifecycle.run.exec]\ncommand = "x"\n'},
        plan(("a", "a.toml")),
        refuse=("a.toml:3", "metadata.version", "got float"),
    ),
    Case(
        "artifacts-as-a-table",
        {"a.toml": recipe("a", body='[artifacts]\nuri = "https://x/y"\n')},
        plan(("a", "a.toml")),
        refuse=("a.toml:4", "[[artifacts]]", "got a table"),
    ),
    Case(
        "missing-metadata",
        {"a.toml": '[lifecycle.run.exec]\ncommand = "x"\n'},
        plan(("a", "a.toml")),
        refuse=("a.toml", "metadata: required table is missing"),
    ),
    Case(
        "bad-restart-policy",
        {
            "a.toml": recipe(
                "a",
                run='[lifecycle.run]\nrestart_policy = "sometimes"\n'
                '[lifecycle.run.exec]\ncommand = "x"\n',
            )
        },
        plan(("a", "a.toml")),
        refuse=("a.toml:6", "restart_policy", "'sometimes'"),
    ),
    Case(
        "bad-health-check-scheme",
        {
            "a.toml": recipe(
                "a",
                run='[lifecycle.run.exec]\ncommand = "x"\n'
                '[lifecycle.run.health]\ncheck = "ftp://127.0.0.1/"\n',
            )
        },
        plan(("a", "a.toml")),
        refuse=("a.toml:8", "health.check", "'ftp://127.0.0.1/'"),
    ),
    Case(
        "relative-path-escaping-the-working-directory",
        {"../outside.toml": recipe("a")},
        plan(("a", "../outside.toml")),
        refuse=("plan.toml:3", "'../outside.toml' escapes"),
    ),
    Case(
        "recipe-file-not-there",
        {},
        plan(("a", "recipes/missing.recipe.toml")),
        refuse=("plan.toml:3", "recipe file not found"),
    ),
    Case(
        "store-reference-not-stored",
        {},
        plan(("api", "com.acme.api:9.9.9")),
        refuse=("plan.toml:3", "'com.acme.api:9.9.9' is not in the recipe store"),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_go_file_table(tmp_path: Path, case: Case) -> None:
    work = tmp_path / "work"
    work.mkdir()
    for rel, text in case.files.items():
        path = (tmp_path / rel[len("/ABS/") :]) if rel.startswith("/ABS/") else work / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    store = RecipeStore(tmp_path / "store")
    for text in case.store.values():
        store.put(text, force=False, environ={})
    plan_file = work / "plan.toml"
    plan_file.write_text(case.plan.replace("/ABS/", f"{tmp_path}/"))

    if case.refuse:
        with pytest.raises(KeystoneError) as info:
            load_desired(plan_file, root=work, store=store, environ={})
        message = str(info.value)
        for words in case.refuse:
            assert words in message, message
        return
    desired = load_desired(plan_file, root=work, store=store, environ={})
    assert tuple(sorted(desired.components)) == case.components
    if case.warns:
        assert any(case.warns in w for w in desired.warnings), desired.warnings
    if case.id == "unknown-field-is-reported-not-refused":
        assert any("scirpt" in u for u in desired.unknown_fields), desired.unknown_fields
