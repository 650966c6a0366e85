"""A USB stick updates a containerised component: the bundle carries the OCI image archive."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.integration.agent.conftest import AgentProc, stop_agents
from tests.integration.bundles.conftest import as_json, bundle_fleet_at, device_config, keystone
from tests.integration.containers.conftest import Images, container_recipe

pytestmark = pytest.mark.integration


@pytest.fixture
def usb_image(images: Images, tmp_path: Path) -> Iterator[tuple[str, str, Path]]:
    """An image only an archive holds: (reference, image id, archive); the engine lacks it."""
    podman = images.podman
    ref = f"localhost/keystone-test-{podman.token}-usb:1"
    podman.run("tag", images.v2, ref)
    image_id = podman.image_id(ref)
    archive = tmp_path / "web-image.tar"
    podman.run("save", "--format", "oci-archive", "-o", str(archive), ref)
    podman.run("untag", ref)
    assert podman.run("image", "exists", ref, check=False) == ""
    yield ref, image_id, archive
    podman.run("rmi", "-f", ref, check=False)


def test_image_from_bundle_is_loaded_and_runs(
    images: Images, usb_image: tuple[str, str, Path], tmp_path: Path
) -> None:
    """bundle create --image carries the archive by digest; import loads it into podman, then
    the pinned, pull-never component starts from it; no network anywhere."""
    ref, image_id, archive = usb_image
    port = free_port()
    (tmp_path / "fleet").mkdir()
    with bundle_fleet_at(tmp_path / "fleet") as bfleet:
        recipe = container_recipe(
            images, "web", "1.0.0", port, image=f"{ref}@sha256:{image_id}", pull_policy="never"
        )
        bfleet.fleet.commit(
            {
                "recipes/web.recipe.toml": recipe,
                "plans/default.toml": bfleet.fleet.plan("web"),
            },
            "web in a container",
        )
        stick = tmp_path / "stick" / "fleet.ksb"
        made = bfleet.create(stick, "--image", str(archive))
        assert made.returncode == 0, made.stdout + made.stderr
        carried = as_json(made)["images"]
        assert [(i["name"], i["size"]) for i in carried] == [(archive.name, archive.stat().st_size)]
        shown = as_json(keystone("bundle", "inspect", str(stick), "--json", cwd=tmp_path))
        assert shown["images"] == carried

        agent = AgentProc(
            tmp_path,
            tmp_path / "device",
            free_port(),
            ["--config", str(device_config(tmp_path / "agent.toml", bfleet))],
            {
                "CONTAINERS_CONF": str(images.conf),
                "KEYSTONE_CONTAINER_ENGINE": "podman",
                "KEYSTONE_CONTAINER_RUNTIME": images.podman.runtime,
            },
        )
        try:
            agent.start()
            done = agent.cli("bundle", "import", str(stick), "--json")
            assert done.returncode == 0, done.stdout + done.stderr
            web = agent.wait_states({"web": "healthy"}, timeout=60)["web"]
            assert images.podman.image_id(ref) == image_id
            assert "serving image 2" in (agent.runtime / "logs" / "web" / "stdout.log").read_text()
            running = images.podman.containers("keystone.component=web")
            assert [c["Id"] for c in running] == [web["container_id"]]
            assert not list((agent.runtime / "bundles" / "images").glob("*.tar"))
            events = [
                json.loads(line)
                for line in (agent.runtime / "state" / "history.jsonl").read_text().splitlines()
            ]
            assert any(e.get("kind") == "image" and e.get("result") == "loaded" for e in events)
        finally:
            stop_agents([agent])
