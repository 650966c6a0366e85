"""Container recipes (Go's ``[lifecycle.run.container]``), the engine command line, the
container snapshot record and the agent's ``[containers]`` config: pure logic, no engine."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from keystone.config import ContainersConfig, load_config
from keystone.errors import ValidationError
from keystone.recipe import PullPolicy, Recipe, load_recipe, parse_recipe
from keystone.runtime.container import (
    ContainerRecord,
    ContainerRunner,
    EngineMissing,
    find_engine,
)
from keystone.runtime.process import ProcessRunner
from keystone.runtime.spawn import SpawnSpec

GO_RECIPES = Path(__file__).parent.parent / "data" / "go_container_recipes"
# What Go's examples read from the host environment.
HOST_ENV = {"API_KEY": "k", "POSTGRES_PASSWORD": "p", "KEYSTONE_HOME": "/opt/keystone"}

MINIMAL = """
[metadata]
name = "web"
version = "1.0.0"
[lifecycle.run]
type = "container"
[lifecycle.run.container]
image = "docker.io/library/nginx:alpine"
"""


def go(name: str) -> Recipe:
    return load_recipe(GO_RECIPES / name, environ=HOST_ENV)


@pytest.mark.parametrize("path", sorted(GO_RECIPES.glob("*.recipe.toml")), ids=lambda p: p.stem)
def test_every_go_container_recipe_loads(path: Path) -> None:
    """All of Go's published container recipes load, with no unknown field."""
    recipe = load_recipe(path, environ=HOST_ENV)
    assert recipe.run.type == "container"
    assert recipe.run.container is not None and recipe.run.container.image
    assert recipe.run.exec is None
    assert recipe.unknown_fields == ()


def test_the_go_recipes_are_all_there() -> None:
    assert len(list(GO_RECIPES.glob("*.recipe.toml"))) == 9


def test_complete_recipe_has_go_meanings() -> None:
    """Every field of the table, with Go's defaults and units."""
    c = go("complete.recipe.toml").run.container
    assert c is not None
    assert (c.image, c.runtime, c.pull_policy) == (
        "docker.io/myorg/myapp:1.0.0",
        "auto",
        PullPolicy.IF_NOT_PRESENT,
    )
    assert (c.network_mode, c.user, c.privileged, c.hostname) == (
        "bridge",
        "1000:1000",
        False,
        "myapp",
    )
    assert c.env == {
        "LOG_LEVEL": "info",
        "DATABASE_URL": "postgres://localhost/mydb",
        "API_KEY": "k",
    }
    assert c.labels == {"com.example.team": "platform", "com.example.environment": "production"}
    assert [(m.type, m.source, m.target, m.read_only) for m in c.mounts] == [
        ("bind", "/data/myapp", "/app/data", False),
        ("volume", "myapp-logs", "/var/log/myapp", False),
        ("tmpfs", "", "/tmp", False),
    ]
    assert [(p.host_ip, p.host_port, p.container_port, p.protocol) for p in c.ports] == [
        ("0.0.0.0", 8080, 80, "tcp"),
        ("0.0.0.0", 8443, 443, "tcp"),
    ]
    r = c.resources
    assert (r.memory_mb, r.memory_swap, r.cpu_shares, r.cpu_quota, r.cpu_period, r.pids_limit) == (
        512,
        1024,
        1024,
        50000,
        100000,
        100,
    )
    assert c.digest is None and c.reference == c.image


def test_defaults_and_pinned_digest() -> None:
    digest = "sha256:" + "ab" * 32
    r = parse_recipe(MINIMAL.replace(":alpine", f":alpine@{digest}"), file="r")
    c = r.run.container
    assert c is not None
    assert (c.pull_policy, c.network_mode, c.runtime) == (PullPolicy.IF_NOT_PRESENT, "", "auto")
    assert c.digest == digest and c.reference == "docker.io/library/nginx:alpine"


def test_mount_paths_interpolate_the_host_environment() -> None:
    """As Go: $VAR and ${VAR} from the host; an unset one stays as written."""
    text = MINIMAL + (
        '[[lifecycle.run.container.mounts]]\nsource = "$KEYSTONE_HOME/vol/${APP:-db}"\n'
        'target = "/data"\n[[lifecycle.run.container.mounts]]\nsource = "/x/$NOPE"\ntarget = "/y"\n'
    )
    c = parse_recipe(text, file="r", environ={"KEYSTONE_HOME": "/srv"}).run.container
    assert c is not None
    assert [m.source for m in c.mounts] == ["/srv/vol/db", "/x/$NOPE"]


def test_changing_the_image_changes_the_content_hash() -> None:
    a = parse_recipe(MINIMAL, file="r")
    b = parse_recipe(MINIMAL.replace("alpine", "1.27"), file="r")
    assert a.content_hash() != b.content_hash()


@pytest.mark.parametrize(
    ("extra", "where", "why"),
    [
        ('pull_policy = "IfNotPresent"', "pull_policy", "expected always, if-not-present or never"),
        ('network_mode = "overlay"', "network_mode", "expected host, bridge or none"),
        ('runtime = "lxc"', "runtime", "expected one of auto"),
        ('user = "a b"', "user", "expected uid, uid:gid"),
    ],
)
def test_bad_fields_are_refused_naming_them(extra: str, where: str, why: str) -> None:
    with pytest.raises(ValidationError, match=rf"lifecycle\.run\.container\.{where}: {why}"):
        parse_recipe(MINIMAL + extra + "\n", file="r")


@pytest.mark.parametrize(
    ("text", "why"),
    [
        (MINIMAL.replace("docker.io/library/nginx:alpine", "nginx@sha256:abc"), "pinned digest"),
        (MINIMAL.replace("docker.io/library/nginx:alpine", "bad image"), "an image reference"),
        (MINIMAL.split("[lifecycle.run.container]")[0], "needs \\[lifecycle.run.container\\]"),
        (
            MINIMAL + '[[lifecycle.run.container.mounts]]\nsource = "rel"\ntarget = "/d"\n',
            "absolute host path",
        ),
        (
            MINIMAL + '[[lifecycle.run.container.mounts]]\ntype = "nfs"\ntarget = "/d"\n',
            "expected bind, volume or tmpfs",
        ),
        (
            MINIMAL + '[[lifecycle.run.container.mounts]]\nsource = "/a"\ntarget = "d"\n',
            "absolute path inside the container",
        ),
        (
            MINIMAL + "[[lifecycle.run.container.ports]]\nhost_port = 70000\ncontainer_port = 1\n",
            "a port from 1 to 65535",
        ),
        (
            MINIMAL
            + '[[lifecycle.run.container.ports]]\nhost_port = 80\ncontainer_port = 80\nprotocol = "sctp"\n',
            "expected tcp or udp",
        ),
        (MINIMAL + "[lifecycle.run.container.resources]\nmemory_mb = -1\n", ">= 0"),
        (
            MINIMAL + '[lifecycle.run.security]\nuser = "nobody"\n',
            "only applies to process components",
        ),
        (
            MINIMAL.replace(
                'type = "container"\n[lifecycle.run.container]', "[lifecycle.run.container]"
            )
            + '[lifecycle.run.exec]\ncommand = "x"\n',
            'only a container component \\(type = "container"\\)',
        ),
    ],
)
def test_bad_container_recipes_are_refused(text: str, why: str) -> None:
    with pytest.raises(ValidationError, match=why):
        parse_recipe(text, file="r")


def test_placeholder_digest_of_go_docs_is_refused() -> None:
    """Go's docs write ``sha256 = "..."``: refused naming the field, not silently taken."""
    text = (GO_RECIPES / "custom-api.recipe.toml").read_text()
    text = text.replace(text.split('sha256 = "')[1].split('"')[0], "...")
    with pytest.raises(ValidationError, match=r"artifacts\[0\]\.sha256"):
        parse_recipe(text, file="r")


# --- the engine command line ------------------------------------------------------------------


def fake_which(*present: str) -> Callable[[str], str | None]:
    """``shutil.which`` on a host where only ``present`` are installed."""
    return lambda name: f"/usr/bin/{name}" if name in present else None


def test_engine_detection_prefers_podman_and_names_what_is_missing() -> None:
    assert find_engine(which=fake_which("docker", "podman")).name == "podman"
    assert find_engine(which=fake_which("nerdctl")).name == "nerdctl"
    with pytest.raises(EngineMissing, match="none of podman, docker, nerdctl is on PATH"):
        find_engine(which=fake_which())
    with pytest.raises(EngineMissing, match="container engine docker is not installed"):
        find_engine("docker", which=fake_which("podman"))
    with pytest.raises(EngineMissing, match="unsupported container engine"):
        find_engine("lxc", which=fake_which("podman"))


def test_containerd_is_driven_through_nerdctl() -> None:
    runner = ContainerRunner(owner="o", which=fake_which("nerdctl"), host=ProcessRunner())
    assert runner.engine_for("containerd").name == "nerdctl"
    runner = ContainerRunner(owner="o", which=fake_which("podman"), host=ProcessRunner())
    with pytest.raises(
        EngineMissing, match="runtime = containerd: this agent drives containerd through nerdctl"
    ):
        runner.engine_for("containerd")


@pytest.mark.parametrize("engine", ["podman", "docker", "nerdctl"])
def test_create_argv_maps_every_field(engine: str) -> None:
    """Go's argv for every field, the same for all three engines but the runtime and log flags."""
    recipe = go("complete.recipe.toml")
    c = recipe.run.container
    assert c is not None
    runner = ContainerRunner(
        owner="own",
        engine=engine,
        oci_runtime="runc",
        extra_args=("--root", "/x"),
        which=fake_which(engine),
        host=ProcessRunner(),
    )
    eng = runner.engine_for(c.runtime)
    spec = SpawnSpec("myapp", (), Path("/"), {}, Path("/l"), container=c, version="1.0.0")
    argv = eng.argv(*runner._create_args(spec, c, "keystone-myapp-1", eng))
    line = " ".join(argv)
    assert argv[:3] == [f"/usr/bin/{engine}", "--root", "/x"]
    assert ("--runtime runc create" in line) == (engine == "podman")
    assert ("create --name keystone-myapp-1 --runtime runc" in line) == (engine != "podman")
    assert ("--log-driver passthrough" in line) == (engine == "podman")
    for part in (
        "--label keystone.managed=true",
        "--label keystone.component=myapp",
        "--label keystone.version=1.0.0",
        "--label keystone.owner=own",
        "--label com.example.team=platform",
        "-e LOG_LEVEL=info",
        "--hostname myapp",
        "--user 1000:1000",
        "-v /data/myapp:/app/data",
        "--mount type=volume,source=myapp-logs,target=/var/log/myapp",
        "--mount type=tmpfs,target=/tmp",
        "-p 0.0.0.0:8080:80/tcp",
        "-p 0.0.0.0:8443:443/tcp",
        "--memory 512m",
        "--memory-swap 1024m",
        "--cpu-shares 1024",
        "--cpu-quota 50000",
        "--cpu-period 100000",
        "--pids-limit 100",
        "--network bridge",
    ):
        assert part in line, part
    assert "--privileged" not in argv
    assert eng.remove_args("id") == ["rm", "-f", *(["-t", "0"] if engine == "podman" else []), "id"]


def test_record_round_trip_and_kind() -> None:
    rec = ContainerRecord("abc", "keystone-web-1", "podman", 42, 7)
    data = rec.to_json()
    assert data["runner"] == "container"
    assert ContainerRecord.from_json(data) == rec
    with pytest.raises(ValueError, match="not a container entry"):
        ContainerRecord.from_json({**data, "runner": "process"})
    with pytest.raises(ValueError, match="main_pid"):
        ContainerRecord.from_json({**data, "main_pid": "x"})
    runner = ContainerRunner(owner="o", which=fake_which("podman"), host=ProcessRunner())
    assert runner.adopt_record("web", {"runner": "process", "pid": 1}) is None
    assert ProcessRunner().adopt_record("web", data) is None


# --- the agent config -------------------------------------------------------------------------


def test_containers_config_file_and_environment(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        '[containers]\nengine = "podman"\nruntime = "runc"\nextra_args = ["--log-level", "warn"]\n'
    )
    assert load_config(cfg, environ={}).containers == ContainersConfig(
        "podman", "runc", ("--log-level", "warn")
    )
    env = {
        "KEYSTONE_CONTAINER_ENGINE": "docker",
        "KEYSTONE_CONTAINER_ARGS": "-H 'unix:///run/d.sock'",
    }
    assert load_config(cfg, environ=env).containers == ContainersConfig(
        "docker", "runc", ("-H", "unix:///run/d.sock")
    )
    assert load_config(None, environ={}).containers == ContainersConfig()


def test_bad_containers_config_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[containers]\nengine = "lxc"\n')
    with pytest.raises(
        ValidationError, match=r"agent\.toml:2: containers\.engine: expected auto, podman"
    ):
        load_config(cfg, environ={})
    cfg.write_text('[containers]\nengin = "podman"\n')
    with pytest.raises(ValidationError, match="engin"):
        load_config(cfg, environ={})


def test_record_keeps_the_log_follower_and_refuses_a_gone_container() -> None:
    rec = ContainerRecord("abc", "keystone-web-1", "docker", 42, 7, logs_pid=43, logs_ticks=8)
    assert ContainerRecord.from_json(rec.to_json()) == rec
    assert "logs_pid" not in ContainerRecord("abc", "n", "podman", 42, 7).to_json()
    runner = ContainerRunner(owner="o", which=fake_which("podman"), host=ProcessRunner())
    # pid 1 runs, but not with these start ticks: the container it named is gone
    gone = ContainerRecord("abc", "keystone-web-1", "podman", 1, 10**12).to_json()
    assert runner.adopt_record("web", gone) is None
