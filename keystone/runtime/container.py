"""The container runner: ``type = "container"`` components as containers of an OCI engine.

It drives the command line of an engine the device already has: podman first, docker and nerdctl
through the same code path (the same argv wherever they agree). No engine is a dependency of
Keystone; :func:`find_engine` names what is missing when none is installed.

How it stays on one event loop with no thread and no helper process per container:

* Engine commands (``create``, ``start``, ``inspect``, ``stop``, ``rm``, ``pull``, ``load``,
  ``exec``) are one-shot children of a :class:`~keystone.runtime.process.ProcessRunner`, each
  bounded by a timeout and killed whole when it outlives it.
* A container's exit is observed through a pidfd on its main process (``State.Pid``, in the
  host's pid namespace): no ``wait`` or ``events`` process runs while containers run. When the
  pidfd fires, ``inspect`` reads the exit status the engine recorded. An engine whose containers'
  pids the agent cannot see (another pid namespace) falls back to one bounded ``<engine> wait``
  per container.
* Logs: podman starts the container with ``--log-driver passthrough`` and the runner hands it
  ``stdout.log``/``stderr.log`` opened ``O_APPEND``, exactly as a process gets them, so they are
  rotated the same way and keep being written while the agent restarts. docker and nerdctl have
  no such driver: one ``<engine> logs -f`` follower per container writes the same files.

Ownership: every container is named ``keystone-<component>-<ns>`` and labelled
``keystone.managed=true``, ``keystone.component``, ``keystone.version`` and ``keystone.owner``
(a digest of the agent's runtime directory, so two agents on one host never touch each other's
containers). A spawn first removes every other container of the same component and owner: one
owner per container, no duplicates. :meth:`ContainerRunner.sweep` removes those a previous agent
left that nobody adopted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger

from keystone.errors import KeystoneError, ProcessError
from keystone.recipe import Container, PullPolicy
from keystone.runtime.process import ProcessHandle, ProcessRunner
from keystone.runtime.procfs import is_live, read_start_ticks, stat_fields
from keystone.runtime.runner import (
    KIND_KEY,
    CommandRunner,
    RunnerRecord,
    record_ints,
    record_json,
    record_kind,
)
from keystone.runtime.spawn import OUTPUT_CAP, RunResult, RunSecurity, SpawnSpec

#: The runner kind of container snapshot entries.
CONTAINER_KIND = "container"
#: Engines in the order they are looked for when the agent config says ``auto``.
ENGINES = ("podman", "docker", "nerdctl")
#: Seconds an engine command (other than pull, load, stop) may take.
CLI_TIMEOUT = 60.0
#: Seconds a pull or a load may take.
PULL_TIMEOUT = 600.0
#: Labels every container of this runner carries.
MANAGED = "keystone.managed"
COMPONENT = "keystone.component"
VERSION = "keystone.version"
OWNER = "keystone.owner"


class EngineMissing(ProcessError):
    """No container engine is installed (or the one asked for is not)."""


@dataclass(frozen=True)
class Engine:
    """One engine's command line: its name, executable and the arguments every call carries.

    ``oci_runtime`` (e.g. ``runc``) is podman's global ``--runtime`` and a ``run``/``create``
    flag of docker and nerdctl; ``extra_args`` go before every subcommand (podman's
    ``--root``, docker's ``--host``...).
    """

    name: str
    path: str
    oci_runtime: str = ""
    extra_args: tuple[str, ...] = ()

    def argv(self, *args: str) -> list[str]:
        """The full command for ``args`` (a subcommand and its arguments)."""
        pre = list(self.extra_args)
        if self.oci_runtime and self.name == "podman":
            pre += ["--runtime", self.oci_runtime]
        return [self.path, *pre, *args]

    @property
    def create_args(self) -> list[str]:
        """Arguments of ``create`` that depend on the engine (runtime, log driver)."""
        out: list[str] = []
        if self.oci_runtime and self.name != "podman":
            out += ["--runtime", self.oci_runtime]
        if self.passthrough:
            out += ["--log-driver", "passthrough"]
        return out

    def remove_args(self, cid: str) -> list[str]:
        """``rm -f`` at once (podman's ``rm -f`` would grant the stop timeout first)."""
        return ["rm", "-f", *(["-t", "0"] if self.name == "podman" else []), cid]

    @property
    def passthrough(self) -> bool:
        """The container writes straight to the files its ``start`` is given (podman)."""
        return self.name == "podman"


def find_engine(
    wanted: str = "auto",
    *,
    oci_runtime: str = "",
    extra_args: Sequence[str] = (),
    which: Callable[[str], str | None] = shutil.which,
) -> Engine:
    """The engine to drive: ``wanted`` (a name or an executable path), or the first installed.

    Raises:
        EngineMissing: naming what was looked for and how to install or choose one.
    """
    wanted = (wanted or "auto").strip()
    if wanted in ("auto", "cli", ""):
        for name in ENGINES:
            path = which(name)
            if path:
                return Engine(name, path, oci_runtime, tuple(extra_args))
        raise EngineMissing(
            "no container engine found: none of podman, docker, nerdctl is on PATH; install one "
            '(e.g. apt-get install podman) or set [containers] engine = "/path/to/podman" in the '
            "agent config"
        )
    name = os.path.basename(wanted)
    kind = next((e for e in ENGINES if name.startswith(e)), None)
    if kind is None:
        raise EngineMissing(
            f"unsupported container engine {wanted!r}: expected podman, docker or nerdctl"
        )
    path = which(wanted) if "/" not in wanted else (wanted if os.access(wanted, os.X_OK) else None)
    if not path:
        raise EngineMissing(
            f"container engine {wanted} is not installed (not found on PATH={os.environ.get('PATH', '')})"
        )
    return Engine(kind, path, oci_runtime, tuple(extra_args))


# --- handles and records --------------------------------------------------------------------


@dataclass(frozen=True)
class ContainerHandle:
    """A started (or adopted) container.

    ``pid`` is 0, as the Go agent reports for containers; ``main_pid`` and ``start_ticks``
    identify the container's main process on the host (what the runner watches).
    """

    name: str
    container_id: str
    container_name: str
    engine: str
    main_pid: int
    start_ticks: int
    pid: int = 0


@dataclass(frozen=True)
class ContainerRecord:
    """The snapshot entry of a container: ``{"runner": "container", "id", "container", "engine",
    "main_pid", "start_ticks"}``."""

    container_id: str
    container_name: str
    engine: str
    main_pid: int
    start_ticks: int
    logs_pid: int = 0  # docker/nerdctl: the ``logs -f`` follower (0: none)
    logs_ticks: int = 0

    @property
    def kind(self) -> str:
        """Always :data:`CONTAINER_KIND`."""
        return CONTAINER_KIND

    def to_json(self) -> dict[str, object]:
        """The snapshot entry."""
        return {
            KIND_KEY: CONTAINER_KIND,
            "id": self.container_id,
            "container": self.container_name,
            "engine": self.engine,
            "main_pid": self.main_pid,
            "start_ticks": self.start_ticks,
            **({"logs_pid": self.logs_pid, "logs_ticks": self.logs_ticks} if self.logs_pid else {}),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> ContainerRecord:
        """Parse a snapshot entry.

        Raises:
            ValueError: a field is missing or of the wrong type, or the entry is of another kind.
        """
        if record_kind(data) != CONTAINER_KIND:
            raise ValueError(f"not a container entry (runner = {record_kind(data)!r})")
        texts: list[str] = []
        for key in ("id", "container", "engine"):
            value = data.get(key)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{key} must be a non-empty string, got {value!r}")
            texts.append(value)
        numbers = record_ints(
            data, ("main_pid", "start_ticks", "logs_pid", "logs_ticks"), default=0
        )
        return cls(texts[0], texts[1], texts[2], *numbers)


class _Watch:
    """One watched container: the pidfd on its main process and who waits for its exit."""

    __slots__ = ("done", "exited", "follower", "handle", "pidfd", "status", "task", "waiters")

    def __init__(self, handle: ContainerHandle) -> None:
        self.handle = handle
        self.pidfd: int | None = None
        self.done = False
        self.exited = False  # the main process is gone (its status may still be read)
        self.status: int | None = None
        self.waiters: list[asyncio.Future[int | None]] = []
        self.task: asyncio.Task[None] | None = None
        self.follower: ProcessHandle | None = None


@dataclass(frozen=True)
class ImageInfo:
    """What ``image inspect`` says of a local image: its id and the digests it is known by."""

    id: str
    digests: tuple[str, ...] = field(default_factory=tuple)


# --- the runner -----------------------------------------------------------------------------


class ContainerRunner:
    """Runs ``type = "container"`` components through an engine's CLI (see the module doc).

    Install, shutdown and reload scripts run on the host (:meth:`run`), as for the Go agent;
    ``cmd:`` health checks run inside the container (:meth:`in_component`).
    """

    def __init__(
        self,
        *,
        owner: str,
        engine: str = "auto",
        oci_runtime: str = "",
        extra_args: Sequence[str] = (),
        host: ProcessRunner | None = None,
        env: Mapping[str, str] | None = None,
        which: Callable[[str], str | None] = shutil.which,
    ) -> None:
        """Create a runner; nothing is looked up or started until the first container.

        Args:
            owner: the value of the ``keystone.owner`` label (see :func:`owner_label`).
            engine: ``auto`` or an engine name or path (the agent config's ``[containers]``).
            oci_runtime: the OCI runtime the engine should use (``runc``, ``crun``); empty:
                the engine's default.
            extra_args: arguments before every engine subcommand.
            host: runs host-side scripts; engine commands always run without a cgroup.
            env: the environment of engine commands (default: the agent's).
        """
        self.owner = owner
        self.wanted = engine
        self.oci_runtime = oci_runtime
        self.extra_args = tuple(extra_args)
        self.host = host or ProcessRunner(cgroup_root=None)
        self.cli = ProcessRunner(cgroup_root=None)
        self.env = dict(os.environ if env is None else env)
        self.which = which
        self._engines: dict[str, Engine] = {}
        self._watches: dict[str, _Watch] = {}
        self._prepared: dict[tuple[str, str], str] = {}
        self._seq = 0

    # --- engines ----------------------------------------------------------------------------

    def engine_for(self, runtime: str = "auto") -> Engine:
        """The engine for a recipe's ``runtime`` selector (``auto``/``cli``: the agent's).

        ``containerd`` is driven through nerdctl, its CLI.

        Raises:
            EngineMissing: that engine (or any, for ``auto``) is not installed.
        """
        key = runtime or "auto"
        if key in ("auto", "cli"):
            key = self.wanted or "auto"
        if key == "containerd":
            key = "nerdctl"
        engine = self._engines.get(key)
        if engine is None:
            try:
                engine = find_engine(
                    key, oci_runtime=self.oci_runtime, extra_args=self.extra_args, which=self.which
                )
            except EngineMissing as exc:
                if runtime == "containerd":
                    raise EngineMissing(
                        f"runtime = containerd: this agent drives containerd through nerdctl: {exc}"
                    ) from None
                raise
            self._engines[key] = engine
            logger.info("containers: using {} ({})", engine.name, engine.path)
        return engine

    def _engine_named(self, name: str) -> Engine:
        for engine in self._engines.values():
            if engine.name == name:
                return engine
        return self.engine_for(name)

    async def _cli(
        self, engine: Engine, *args: str, timeout: float = CLI_TIMEOUT, what: str = ""
    ) -> RunResult:
        try:
            return await self.cli.run(
                engine.argv(*args), cwd=Path("/"), env=self.env, timeout=timeout
            )
        except ProcessError as exc:
            raise ProcessError(f"{what or engine.name}: {exc}") from exc

    @staticmethod
    def _why(result: RunResult) -> str:
        text = (result.stderr or result.stdout).decode(errors="replace").strip()
        if result.timed_out:
            return f"timed out after {result.duration:.0f}s"
        return text.splitlines()[-1] if text else f"exit status {result.returncode}"

    # --- images -----------------------------------------------------------------------------

    async def image_info(self, engine: Engine, reference: str) -> ImageInfo | None:
        """The local image ``reference`` names, or None when the engine has none."""
        result = await self._cli(
            engine, "image", "inspect", "--format", "{{json .}}", reference, what=reference
        )
        if result.returncode != 0:
            return None
        try:
            data = json.loads(result.stdout.decode(errors="replace"))
        except ValueError:
            return None
        if isinstance(data, list):
            data = data[0] if data else {}
        if not isinstance(data, dict):
            return None
        image_id = str(data.get("Id") or data.get("ID") or "")
        if image_id and not image_id.startswith("sha256:"):
            image_id = "sha256:" + image_id
        digests = {image_id}
        if data.get("Digest"):
            digests.add(str(data["Digest"]))
        for rd in data.get("RepoDigests") or ():
            digests.add(str(rd).rpartition("@")[2])
        return ImageInfo(image_id, tuple(sorted(d for d in digests if d)))

    async def ensure_image(self, component: str, container: Container, *, pull: bool = True) -> str:
        """Make sure the image is here as the recipe's ``pull_policy`` says; return its id.

        ``always`` pulls (when ``pull``); ``if-not-present`` pulls when it is missing; ``never``
        refuses a missing image. A pinned digest (``image@sha256:...``) must be the local
        image's id or one of its digests, or the image is refused.

        Raises:
            ProcessError: missing with ``never``, a pull failed, or the digest does not match.
        """
        engine = self.engine_for(container.runtime)
        ref = container.reference
        pinned = container.digest
        lookup = container.image if pinned and "@" in container.image else ref
        info = await self.image_info(engine, ref) or (
            await self.image_info(engine, lookup) if lookup != ref else None
        )
        policy = container.pull_policy
        if (policy is PullPolicy.ALWAYS and pull) or (
            info is None and policy is PullPolicy.IF_NOT_PRESENT
        ):
            result = await self._cli(
                engine, "pull", container.image, timeout=PULL_TIMEOUT, what=component
            )
            if result.returncode != 0:
                if info is None or policy is not PullPolicy.ALWAYS:
                    raise ProcessError(
                        f"{component}: cannot pull image {container.image}: {self._why(result)}"
                    )
                logger.warning(
                    "{}: pull of {} failed ({}); using the local image",
                    component,
                    container.image,
                    self._why(result),
                )
            info = await self.image_info(engine, ref) or await self.image_info(engine, lookup)
        if info is None:
            if policy is PullPolicy.NEVER:
                raise ProcessError(
                    f"{component}: image {container.image} is not present and pull_policy = "
                    f'"never": load it first ({engine.name} load, or an air-gapped bundle with '
                    "images)"
                )
            raise ProcessError(f"{component}: image {container.image} not found after pull")
        if pinned and pinned not in info.digests:
            raise ProcessError(
                f"{component}: image {ref} does not match its pinned digest {pinned} "
                f"(the local image is {info.id}, known by {', '.join(info.digests)}); refused"
            )
        return info.id

    async def prepare(self, component: str, container: Container) -> None:
        """The deployer's prepare step: the engine and the image are there before anything stops.

        Raises:
            KeystoneError: no engine, a missing image with ``never``, a failed pull, a digest
                mismatch; the message names the component.
        """
        try:
            # The spawn that follows uses this id once (a restart looks again).
            self._prepared[(component, container.image)] = await self.ensure_image(
                component, container, pull=True
            )
        except ProcessError as exc:
            raise KeystoneError(str(exc)) from exc

    async def load_image(self, archive: Path, *, engine: str = "auto") -> str:
        """``<engine> load -i archive``; returns what the engine printed (the loaded names).

        Raises:
            ProcessError: the engine refused the archive.
        """
        eng = self.engine_for(engine)
        result = await self._cli(
            eng, "load", "-i", str(archive), timeout=PULL_TIMEOUT, what=archive.name
        )
        if result.returncode != 0:
            raise ProcessError(f"{eng.name} load {archive.name}: {self._why(result)}")
        return result.stdout.decode(errors="replace").strip()

    # --- spawn ------------------------------------------------------------------------------

    def _create_args(self, spec: SpawnSpec, c: Container, cname: str, engine: Engine) -> list[str]:
        labels = {
            **c.labels,
            MANAGED: "true",
            COMPONENT: spec.name,
            VERSION: spec.version,
            OWNER: self.owner,
        }
        args = ["create", "--name", cname, *engine.create_args]
        for key, value in labels.items():
            args += ["--label", f"{key}={value}"]
        for key, value in c.env.items():
            args += ["-e", f"{key}={value}"]
        if c.hostname:
            args += ["--hostname", c.hostname]
        if c.user:
            args += ["--user", c.user]
        for m in c.mounts:
            if "$" in m.source or "$" in m.target:
                raise ProcessError(
                    f"{spec.name}: mount {m.source or m.type}:{m.target} names an unset "
                    "environment variable"
                )
            if m.type == "bind":
                args += ["-v", f"{m.source}:{m.target}" + (":ro" if m.read_only else "")]
            elif m.type == "tmpfs":
                args += ["--mount", f"type=tmpfs,target={m.target}"]
            else:
                opt = f"type=volume,source={m.source},target={m.target}"
                args += ["--mount", opt + (",readonly" if m.read_only else "")]
        for p in c.ports:
            args += ["-p", f"{p.host_ip}:{p.host_port}:{p.container_port}/{p.protocol}"]
        r = c.resources
        if r.memory_mb:
            args += ["--memory", f"{r.memory_mb}m"]
        if r.memory_swap:
            args += ["--memory-swap", "-1" if r.memory_swap < 0 else f"{r.memory_swap}m"]
        if r.cpu_shares:
            args += ["--cpu-shares", str(r.cpu_shares)]
        if r.cpu_quota:
            args += ["--cpu-quota", str(r.cpu_quota)]
        if r.cpu_period:
            args += ["--cpu-period", str(r.cpu_period)]
        if r.pids_limit:
            args += ["--pids-limit", str(r.pids_limit)]
        if c.privileged:
            args.append("--privileged")
        if c.network_mode:
            args += ["--network", c.network_mode]
        return args

    async def spawn(self, spec: SpawnSpec) -> ContainerHandle:
        """Create and start the component's container; return once its main process runs.

        Raises:
            ProcessError: no engine, no image, the engine refused to create or start it; the
                message names the component and the engine's reason.
        """
        c = spec.container
        name = spec.name
        if c is None:
            raise ProcessError(f"{name}: not a container component (no [lifecycle.run.container])")
        engine = self.engine_for(c.runtime)
        await self._remove_stale(engine, name)
        image_id = self._prepared.pop((name, c.image), None) or await self.ensure_image(
            name, c, pull=False
        )
        self._seq += 1
        cname = f"keystone-{_safe(name)}-{time.time_ns()}"
        args = self._create_args(spec, c, cname, engine)
        spec.log_dir.mkdir(parents=True, exist_ok=True)
        # podman prints no id for a passthrough container: the id file has it in any case
        cidfile = spec.log_dir / f".{cname}.cid"
        try:
            result = await self._cli(
                engine, *args, "--cidfile", str(cidfile), image_id, *spec.argv, what=name
            )
            if result.returncode != 0:
                raise ProcessError(f"{name}: {engine.name} create failed: {self._why(result)}")
            cid = cidfile.read_text().strip() if cidfile.exists() else ""
        finally:
            cidfile.unlink(missing_ok=True)
        if not cid:
            raise ProcessError(f"{name}: {engine.name} create wrote no container id")
        try:
            await self._start(engine, name, cid, spec)
            main_pid = await self._main_pid(engine, cid)
        except ProcessError:
            await self._cli(engine, *engine.remove_args(cid), what=name)
            raise
        ticks = (read_start_ticks(main_pid) or 0) if main_pid else 0
        handle = ContainerHandle(name, cid, cname, engine.name, main_pid, ticks)
        watch = self._track(handle)
        if not engine.passthrough:
            watch.follower = await self._follow_logs(engine, handle, spec.log_dir, since=None)
        logger.debug("{}: started container {} ({})", name, cid[:12], cname)
        return handle

    async def _start(self, engine: Engine, name: str, cid: str, spec: SpawnSpec) -> None:
        if not engine.passthrough:
            result = await self._cli(engine, "start", cid, what=name)
            if result.returncode != 0:
                raise ProcessError(f"{name}: {engine.name} start failed: {self._why(result)}")
            return
        # The container inherits this command's stdout and stderr: the component's log files.
        stderr_log = spec.log_dir / "stderr.log"
        offset = stderr_log.stat().st_size if stderr_log.exists() else 0
        starter = await self.cli.spawn(
            SpawnSpec(
                name=f"{name} (start)",
                argv=tuple(engine.argv("start", cid)),
                cwd=Path("/"),
                env=self.env,
                log_dir=spec.log_dir,
            )
        )
        try:
            status = await asyncio.wait_for(self.cli.exited(starter), CLI_TIMEOUT)
        except TimeoutError:
            await self.cli.stop(starter, timeout=1.0)
            raise ProcessError(
                f"{name}: {engine.name} start timed out after {CLI_TIMEOUT:g}s"
            ) from None
        if status != 0:
            why = _since(stderr_log, offset) or f"exit status {status}"
            raise ProcessError(f"{name}: {engine.name} start failed: {why}")

    async def _main_pid(self, engine: Engine, cid: str) -> int:
        result = await self._cli(
            engine, "inspect", "--format", "{{.State.Pid}} {{.State.Status}}", cid
        )
        fields = result.stdout.decode(errors="replace").split()
        if result.returncode != 0 or len(fields) < 2:
            raise ProcessError(f"{engine.name} inspect {cid[:12]}: {self._why(result)}")
        try:
            return int(fields[0])
        except ValueError:
            return 0

    async def _follow_logs(
        self, engine: Engine, handle: ContainerHandle, log_dir: Path, *, since: str | None
    ) -> ProcessHandle | None:
        args = ["logs", "-f", *(["--since", since] if since else []), handle.container_id]
        try:
            return await self.cli.spawn(
                SpawnSpec(
                    name=f"{handle.name} (logs)",
                    argv=tuple(engine.argv(*args)),
                    cwd=Path("/"),
                    env=self.env,
                    log_dir=log_dir,
                )
            )
        except ProcessError as exc:
            logger.warning("{}: cannot follow the container's logs: {}", handle.name, exc)
            return None

    # --- watching ---------------------------------------------------------------------------

    def _track(self, handle: ContainerHandle) -> _Watch:
        watch = self._watches.get(handle.container_id)
        if watch is not None:
            return watch
        watch = _Watch(handle)
        self._watches[handle.container_id] = watch
        loop = asyncio.get_running_loop()
        pidfd: int | None = None
        if handle.main_pid > 0:
            try:
                pidfd = os.pidfd_open(handle.main_pid)
            except OSError:
                pidfd = None
            if pidfd is not None and read_start_ticks(handle.main_pid) != handle.start_ticks:
                os.close(pidfd)  # the main process is already gone (its pid was reused)
                pidfd = None
                watch.exited = True
                watch.task = loop.create_task(self._exit_status(watch))
                return watch
        if pidfd is not None:
            watch.pidfd = pidfd
            loop.add_reader(pidfd, self._on_exit, watch)
        else:
            watch.task = loop.create_task(self._wait_fallback(watch))
        return watch

    def _on_exit(self, watch: _Watch) -> None:
        watch.exited = True
        loop = asyncio.get_running_loop()
        if watch.pidfd is not None:
            loop.remove_reader(watch.pidfd)
            os.close(watch.pidfd)
            watch.pidfd = None
        if watch.task is None:
            watch.task = loop.create_task(self._exit_status(watch))

    async def _exit_status(self, watch: _Watch) -> None:
        """The main process exited: read the status the engine recorded (it may lag a little)."""
        engine = self._engine_named(watch.handle.engine)
        status: int | None = None
        delay = 0.02
        for _ in range(12):
            result = await self._cli(
                engine,
                "inspect",
                "--format",
                "{{.State.Status}} {{.State.ExitCode}}",
                watch.handle.container_id,
            )
            fields = result.stdout.decode(errors="replace").split()
            if result.returncode != 0 or len(fields) < 2:
                break  # removed: the status is gone with it
            if fields[0] not in ("running", "stopping"):
                with contextlib.suppress(ValueError):
                    status = int(fields[1])
                break
            await asyncio.sleep(delay)  # the engine has not noticed yet: bounded, backing off
            delay = min(delay * 2, 0.5)
        self._finish(watch, status)
        await self._discard(engine, watch)

    async def _wait_fallback(self, watch: _Watch) -> None:
        """No pidfd on the main process: one ``<engine> wait`` for this container."""
        engine = self._engine_named(watch.handle.engine)
        result = await self._cli(engine, "wait", watch.handle.container_id, timeout=float(1 << 31))
        status: int | None = None
        with contextlib.suppress(ValueError, IndexError):
            status = int(result.stdout.decode(errors="replace").split()[0])
        self._finish(watch, status)
        if result.returncode == 0:  # it did exit (a failed wait says nothing of the container)
            await self._discard(engine, watch)

    async def _discard(self, engine: Engine, watch: _Watch) -> None:
        """Remove a container whose main process exited: it is of no more use (its output is in
        the component's logs), and a rollback that stops nothing must not leave it behind."""
        result = await self._cli(
            engine, *engine.remove_args(watch.handle.container_id), what=watch.handle.name
        )
        if result.returncode != 0 and b"no such container" not in result.stderr.lower():
            logger.warning("{}: {} rm: {}", watch.handle.name, engine.name, self._why(result))

    def _finish(self, watch: _Watch, status: int | None) -> None:
        if watch.done:
            return
        watch.done = True
        watch.exited = True
        watch.status = status
        for fut in watch.waiters:
            if not fut.done():
                fut.set_result(status)
        watch.waiters.clear()

    def _forget(self, watch: _Watch) -> None:
        if watch.pidfd is not None:
            with contextlib.suppress(RuntimeError, ValueError):
                asyncio.get_running_loop().remove_reader(watch.pidfd)
            os.close(watch.pidfd)
            watch.pidfd = None
        if watch.task is not None and not watch.task.done():
            watch.task.cancel()
        self._watches.pop(watch.handle.container_id, None)

    def exited(self, handle: ContainerHandle) -> Awaitable[int | None]:
        """Completes with the container's exit code (None when the engine no longer knows it)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int | None] = loop.create_future()
        watch = self._watches.get(handle.container_id) or self._track(handle)
        if watch.done:
            fut.set_result(watch.status)
        else:
            watch.waiters.append(fut)
        return fut

    def alive(self, handle: ContainerHandle) -> bool:
        """True while the container's main process runs."""
        watch = self._watches.get(handle.container_id)
        if watch is not None:
            return not watch.exited
        return _process_alive(handle.main_pid, handle.start_ticks)

    def signal(self, handle: ContainerHandle, sig: int, *, group: bool = True) -> None:
        """Send ``sig`` to the container's main process (as ``<engine> kill --signal`` does).

        Raises:
            ProcessError: the container is not running or its process cannot be signalled.
        """
        if not self.alive(handle) or handle.main_pid <= 0:
            raise ProcessError(f"{handle.name}: container {handle.container_name} is not running")
        try:
            os.kill(handle.main_pid, sig)
        except ProcessLookupError:
            raise ProcessError(
                f"{handle.name}: container {handle.container_name} is not running"
            ) from None
        except PermissionError as exc:
            raise ProcessError(f"{handle.name}: may not signal the container: {exc}") from exc

    # --- stop -------------------------------------------------------------------------------

    async def stop(self, handle: ContainerHandle, *, timeout: float) -> int | None:
        """``<engine> stop -t <grace>`` (the stop signal, the grace, then KILL) and ``rm -f``.

        Idempotent: a container already gone returns the status last seen.

        Raises:
            ProcessError: the container still exists after ``rm -f``.
        """
        engine = self._engine_named(handle.engine)
        watch = self._watches.get(handle.container_id)
        grace = max(0, math.ceil(timeout))
        cid = handle.container_id
        result = await self._cli(
            engine, "stop", "-t", str(grace), cid, timeout=grace + CLI_TIMEOUT, what=handle.name
        )
        if result.returncode != 0 and b"no such container" not in result.stderr.lower():
            logger.warning("{}: {} stop: {}", handle.name, engine.name, self._why(result))
        status: int | None = None
        info = await self._cli(engine, "inspect", "--format", "{{.State.ExitCode}}", cid)
        with contextlib.suppress(ValueError, IndexError):
            status = int(info.stdout.decode(errors="replace").split()[0])
        removed = await self._cli(engine, *engine.remove_args(cid), what=handle.name)
        if removed.returncode != 0:
            check = await self._cli(engine, "inspect", "--format", "{{.Id}}", cid)
            if check.returncode == 0:
                raise ProcessError(
                    f"{handle.name}: container {handle.container_name} survived stop and rm -f: "
                    f"{self._why(removed)}"
                )
        if watch is not None:
            if status is None and watch.done:
                status = watch.status
            self._finish(watch, status)
            if watch.follower is not None:
                await self.cli.stop(watch.follower, timeout=1.0)
            self._forget(watch)
        logger.debug("{}: container {} stopped and removed", handle.name, cid[:12])
        return status

    async def _containers(self, engine: Engine, *filters: str) -> list[tuple[str, str]]:
        args = ["ps", "-a", "--no-trunc", "--filter", f"label={OWNER}={self.owner}"]
        for f in filters:
            args += ["--filter", f"label={f}"]
        result = await self._cli(engine, *args, "--format", "{{.ID}} {{.Names}}")
        if result.returncode != 0:
            logger.warning("containers: {} ps: {}", engine.name, self._why(result))
            return []
        out = []
        for line in result.stdout.decode(errors="replace").splitlines():
            parts = line.split()
            if len(parts) >= 2:
                out.append((parts[0], parts[1]))
        return out

    async def _remove_stale(self, engine: Engine, component: str) -> None:
        """Remove every container of ``component`` this runner does not watch as running."""
        for cid, cname in await self._containers(engine, f"{COMPONENT}={component}"):
            watch = self._watches.get(cid)
            if watch is not None and not watch.done:
                continue
            logger.info("{}: removing stale container {} ({})", component, cname, cid[:12])
            await self._cli(engine, *engine.remove_args(cid), what=component)

    async def sweep(self, runtimes: Sequence[str] = ()) -> list[str]:
        """Remove this agent's containers that nothing adopted (after a restore); their names.

        The engines asked are those in use and those of ``runtimes`` (the applied plan's
        container recipes); an agent without containers runs no engine command.
        """
        for runtime in runtimes:
            try:
                self.engine_for(runtime)
            except EngineMissing as exc:
                logger.warning("containers: {}", exc)
        removed: list[str] = []
        for engine in list(self._engines.values()):
            for cid, cname in await self._containers(engine, f"{MANAGED}=true"):
                watch = self._watches.get(cid)
                if watch is not None and not watch.done:
                    continue
                logger.info(
                    "removing stale container {} ({}) left by the previous run", cname, cid[:12]
                )
                await self._cli(engine, *engine.remove_args(cid), what=cname)
                removed.append(cname)
        return removed

    # --- adopt ------------------------------------------------------------------------------

    def describe(self, handle: ContainerHandle) -> ContainerRecord:
        """The snapshot record of ``handle`` (what :meth:`adopt_record` takes back)."""
        watch = self._watches.get(handle.container_id)
        follower = watch.follower if watch is not None else None
        return ContainerRecord(
            handle.container_id,
            handle.container_name,
            handle.engine,
            handle.main_pid,
            handle.start_ticks,
            follower.pid if follower else 0,
            follower.start_ticks if follower else 0,
        )

    def adopt_record(
        self, name: str, record: RunnerRecord | Mapping[str, object]
    ) -> ContainerHandle | None:
        """Take over a container a previous agent left running; None when it is gone.

        The container's main process must still run with the recorded start time (so neither
        the container nor its pid was replaced); it is then watched like a started one.
        """
        data = record_json(record)
        if record_kind(data) != CONTAINER_KIND:
            return None
        try:
            rec = ContainerRecord.from_json(data)
        except ValueError as exc:
            logger.warning("{}: unusable snapshot entry: {}", name, exc)
            return None
        try:
            self._engine_named(rec.engine)
        except EngineMissing as exc:
            logger.warning("{}: cannot adopt container {}: {}", name, rec.container_name, exc)
            return None
        handle = ContainerHandle(
            name, rec.container_id, rec.container_name, rec.engine, rec.main_pid, rec.start_ticks
        )
        if not _process_alive(rec.main_pid, rec.start_ticks):
            return None
        watch = self._track(handle)
        if rec.logs_pid and watch.follower is None:
            # The previous agent's log follower still copies this container's output: keep it.
            watch.follower = self.cli.adopt(
                f"{name} (logs)", rec.logs_pid, rec.logs_pid, rec.logs_ticks, None
            )
        return handle

    async def resume_logs(self, handle: ContainerHandle, log_dir: Path) -> None:
        """docker/nerdctl: follow an adopted container's logs again from now."""
        engine = self._engine_named(handle.engine)
        watch = self._watches.get(handle.container_id)
        if engine.passthrough or watch is None or watch.follower is not None:
            return
        since = str(int(time.time()))
        watch.follower = await self._follow_logs(engine, handle, log_dir, since=since)

    # --- one-shot commands ------------------------------------------------------------------

    async def run(
        self,
        argv: Sequence[str],
        *,
        cwd: Path,
        env: Mapping[str, str],
        timeout: float,
        input: bytes | None = None,
        log: Path | None = None,
        max_output: int = OUTPUT_CAP,
        security: RunSecurity | None = None,
    ) -> RunResult:
        """Run a host-side command (install, shutdown, reload scripts), as the Go agent does;
        an install script with its recipe's ``security`` (see ``ProcessRunner.run``)."""
        return await self.host.run(
            argv,
            cwd=cwd,
            env=env,
            timeout=timeout,
            input=input,
            log=log,
            max_output=max_output,
            security=security,
        )

    def in_component(self, handle: ContainerHandle) -> CommandRunner:
        """A command runner whose commands run inside the container (``cmd:`` health checks)."""
        return _ExecRunner(self, handle)

    def close(self) -> None:
        """Stop watching without touching any container (they outlive the agent)."""
        for watch in list(self._watches.values()):
            for fut in watch.waiters:
                fut.cancel()
            self._forget(watch)
        self.cli.close()


class _ExecRunner:
    """``<engine> exec <container> argv``: a health check's command inside the container."""

    def __init__(self, runner: ContainerRunner, handle: ContainerHandle) -> None:
        self.runner = runner
        self.handle = handle

    async def run(
        self,
        argv: Sequence[str],
        *,
        cwd: Path,
        env: Mapping[str, str],
        timeout: float,
        input: bytes | None = None,
        log: Path | None = None,
        max_output: int = OUTPUT_CAP,
        security: RunSecurity | None = None,  # inside the container: the container's own user
    ) -> RunResult:
        engine = self.runner._engine_named(self.handle.engine)
        return await self.runner.cli.run(
            engine.argv("exec", self.handle.container_id, *argv),
            cwd=Path("/"),
            env=self.runner.env,
            timeout=timeout,
            input=input,
            log=log,
            max_output=max_output,
        )


def owner_label(runtime: Path) -> str:
    """The ``keystone.owner`` label of the agent whose runtime directory is ``runtime``."""
    return hashlib.sha256(str(runtime.resolve()).encode()).hexdigest()[:16]


def _since(log: Path, offset: int, limit: int = 2048) -> str:
    """The last lines written to ``log`` after ``offset`` (what a failed ``start`` said)."""
    try:
        with log.open("rb") as f:
            f.seek(max(offset, f.seek(0, os.SEEK_END) - limit))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text.splitlines()[-3:] if line.strip())


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "_.-" else "_" for ch in name)


def _process_alive(pid: int, start_ticks: int) -> bool:
    return pid > 0 and read_start_ticks(pid) == start_ticks and is_live(stat_fields(pid))


__all__ = [
    "CONTAINER_KIND",
    "ENGINES",
    "ContainerHandle",
    "ContainerRecord",
    "ContainerRunner",
    "Engine",
    "EngineMissing",
    "find_engine",
    "owner_label",
]
