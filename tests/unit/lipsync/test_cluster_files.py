"""Every file under cluster/ parses, names CLI entrypoints that exist, and pins pyproject's Ray version."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from lipsync.cli import build_parser

REPO = Path(__file__).resolve().parents[3]
CLUSTER = REPO / "cluster"
YAML_FILES = sorted(CLUSTER.rglob("*.yaml"))


def ray_pin() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [re.search(r"==([\d.]+)", d).group(1) for d in deps if d.startswith("ray[")]
    return pin


def test_there_are_cluster_files() -> None:
    names = {p.relative_to(CLUSTER).as_posix() for p in YAML_FILES}
    assert {"aws.yaml", "runtime_env.yaml", "kuberay/raycluster.yaml"} <= names
    assert len([n for n in names if n.startswith("kuberay/rayjob-")]) >= 4


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(CLUSTER).as_posix())
def test_yaml_parses(path: Path) -> None:
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs and all(isinstance(d, dict) for d in docs)


def _entrypoints() -> list[tuple[str, str]]:
    out = []
    for path in YAML_FILES:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc.get("kind") == "RayJob":
                out.append((path.name, doc["spec"]["entrypoint"]))
    return out


@pytest.mark.parametrize(("name", "entrypoint"), _entrypoints())
def test_rayjob_entrypoints_exist_in_the_cli(name: str, entrypoint: str) -> None:
    tokens = shlex.split(entrypoint)
    assert tokens[0] == "lipsync", name
    args = build_parser().parse_args(tokens[1:])  # raises BadInput on an unknown command or option
    assert args.address == "auto"


def test_ray_version_is_pinned_everywhere() -> None:
    version = ray_pin()
    aws = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    assert version in aws["docker"]["image"] and version in aws["docker"]["worker_image"]
    cluster = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    assert cluster["spec"]["rayVersion"] == version
    images = [cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]]
    images += [g["template"]["spec"]["containers"][0]["image"] for g in cluster["spec"]["workerGroupSpecs"]]
    assert all(version in image for image in images), images
    assert f"rayproject/ray:{version}" in (CLUSTER / "Dockerfile").read_text()
