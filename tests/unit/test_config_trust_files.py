"""``[trust] trust_bundle`` / ``leaf_cert`` in agent.toml: the file side of KEYSTONE_TRUST_BUNDLE."""

from __future__ import annotations

from pathlib import Path

import pytest

from keystone.config import TrustConfig, load_config
from keystone.errors import ValidationError


def _config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text('[device]\nid = "d"\n\n[trust]\n' + body)
    return path


def test_paths_resolve_beside_the_file_and_become_the_environment(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("pem")
    (tmp_path / "leaf.pem").write_text("pem")
    cfg = load_config(
        _config(tmp_path, 'trust_bundle = "ca.pem"\nleaf_cert = "leaf.pem"\n'), environ={}
    )
    assert cfg.trust.trust_bundle == tmp_path / "ca.pem"
    assert cfg.trust.leaf_cert == tmp_path / "leaf.pem"
    assert cfg.trust.environ() == {
        "KEYSTONE_TRUST_BUNDLE": str(tmp_path / "ca.pem"),
        "KEYSTONE_LEAF_CERT": str(tmp_path / "leaf.pem"),
    }


@pytest.mark.parametrize(
    ("env", "want"),
    [
        ({}, "file.pem"),
        ({"KEYSTONE_TRUST_BUNDLE": "/env/ca.pem"}, "/env/ca.pem"),
        ({"KEYSTONE_TRUST_BUNDLE": "  "}, "file.pem"),
    ],
)
def test_the_environment_wins(tmp_path: Path, env: dict[str, str], want: str) -> None:
    (tmp_path / "file.pem").write_text("pem")
    cfg = load_config(_config(tmp_path, 'trust_bundle = "file.pem"\n'), environ=env)
    assert cfg.trust.trust_bundle == (tmp_path / want if want == "file.pem" else Path(want))


def test_unset_sets_nothing(tmp_path: Path) -> None:
    cfg = load_config(_config(tmp_path, ""), environ={})
    assert cfg.trust.trust_bundle is None and cfg.trust.environ() == {}
    assert TrustConfig().environ() == {}


@pytest.mark.parametrize(
    ("body", "line"),
    [
        ('trust_bundle = "missing.pem"\n', 5),
        ('verify = "tip"\nleaf_cert = "nope.pem"\n', 6),
        ("trust_bundle = 3\n", 5),
    ],
)
def test_errors_name_file_and_line(tmp_path: Path, body: str, line: int) -> None:
    with pytest.raises(ValidationError) as info:
        load_config(_config(tmp_path, body), environ={})
    assert f"agent.toml:{line}" in str(info.value)
