"""The delta fields crossing the artifact worker's JSON, and the delta metrics."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest

from keystone.errors import UsageError
from keystone.metrics import Metrics
from keystone.recipe import parse_recipe
from keystone.runtime.artifacts import ArtifactSpec, PreparedArtifact

SHA = "ab" * 32
RECIPE = f"""
[metadata]
name = "app"
version = "1"
[[artifacts]]
uri = "https://h/app.tar.gz"
unpack = true
[artifacts.delta]
server = "https://d/base"
sha256 = "{SHA}"
[lifecycle.run.exec]
command = "true"
"""


def test_recipe_delta_crosses_the_worker_json() -> None:
    """The client sends asdict() of the recipe's artifact; the worker rebuilds the DeltaSpec."""
    art = parse_recipe(RECIPE, file="r").artifacts[0]
    sent = {**asdict(art), "headers": dict(art.headers)}
    spec = ArtifactSpec.from_json(sent)
    assert spec.delta is not None and spec.delta.sha256 == SHA
    assert ArtifactSpec.from_json(spec.to_json()) == spec
    assert ArtifactSpec.of(art).delta == art.delta
    assert ArtifactSpec.from_json({"uri": "x"}).delta is None


@pytest.mark.parametrize(
    "delta", [{"server": "relative", "sha256": SHA}, {"server": "https://d"}, "no"]
)
def test_bad_delta_json_is_a_usage_error(delta: object) -> None:
    with pytest.raises(UsageError, match="delta"):
        ArtifactSpec.from_json({"uri": "x", "delta": delta})


def test_prepared_round_trip_keeps_how_it_came() -> None:
    p = PreparedArtifact(
        sha256=SHA, path=Path("/x"), size=3, name="a", via="delta", wire_bytes=9, saved_bytes=90
    )
    back = PreparedArtifact.from_json(p.to_json())
    assert (back.via, back.wire_bytes, back.saved_bytes) == ("delta", 9, 90)
    assert PreparedArtifact.from_json({"sha256": SHA, "path": "/x", "size": 3, "name": "a"}) == p


def test_metrics_count_full_and_delta() -> None:
    m = Metrics()
    m.artifact_fetched("full", 1000, 0)
    m.artifact_fetched("delta", 10, 990)
    m.artifact_fetched("cache", 0, 0)
    text = m.render()[0].decode()
    assert 'keystone_artifact_fetches_total{path="full"} 1.0' in text
    assert 'keystone_artifact_fetches_total{path="delta"} 1.0' in text
    assert 'keystone_artifact_delta_bytes_total{kind="downloaded"} 10.0' in text
    assert 'keystone_artifact_delta_bytes_total{kind="saved"} 990.0' in text
