"""Every YAML in configs/ loads into its stage's config dataclass, and bad keys are exit-2 errors."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from core.config import config_hash, load_config
from core.errors import BadInput

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
CLASSES = {
    "synth.yaml": "pipeline.synth:SynthConfig",
    "preprocess.yaml": "pipeline.stages:PreprocessConfig",
    "train_syncnet.yaml": "training.syncnet_job:SyncNetConfig",
    "train_wav2lip.yaml": "training.wav2lip_job:Wav2LipConfig",
    "generate.yaml": "generation.config:GenerateConfig",
    "generate_cpu.yaml": "generation.config:GenerateConfig",
    "demo.yaml": "lipsync.demo:DemoConfig",
    "tune": "tuning.sweep:SweepConfig",
}


def _class(spec: str) -> type:
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def _files() -> list[tuple[Path, str]]:
    out = []
    for path in sorted(CONFIGS.rglob("*.yaml")):
        key = path.name if path.parent == CONFIGS else path.parent.name
        out.append((path, CLASSES[key]))
    return out


@pytest.mark.parametrize(("path", "spec"), _files(), ids=lambda v: v.name if isinstance(v, Path) else v)
def test_config_file_loads(path: Path, spec: str) -> None:
    cfg = load_config(_class(spec), path)
    assert len(config_hash(cfg)) == 16


def test_every_config_file_has_a_class() -> None:
    assert {p.name if p.parent == CONFIGS else p.parent.name for p in CONFIGS.rglob("*.yaml")} <= set(CLASSES)


def test_unknown_key_names_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("filters:\n  min_secnds: 2\n")
    with pytest.raises(BadInput, match="min_secnds"):
        load_config(_class(CLASSES["preprocess.yaml"]), bad)


@pytest.mark.parametrize(
    "bad", [{"workers": 0}, {"cpus_per_worker": 0.0}, {"poll_seconds": 0.0}, {"poll_seconds": 6.0}]
)
def test_preprocess_and_score_refuse_the_same_bad_resources(bad: dict) -> None:
    from evaluation.score import _validate as validate_score
    from evaluation.score_config import ScoreConfig
    from pipeline.preprocess import _validate as validate_preprocess
    from pipeline.preprocess_config import PoolConfig, PreprocessConfig, ResourcesConfig

    name = next(iter(bad))
    with pytest.raises(BadInput, match=name.split("_")[0]):
        validate_preprocess(PreprocessConfig(resources=ResourcesConfig(**bad)))
    with pytest.raises(BadInput, match=name.split("_")[0]):
        validate_score(ScoreConfig(resources=PoolConfig(**bad)))
    validate_score(ScoreConfig())  # the defaults pass
    validate_preprocess(PreprocessConfig())


def test_score_config_refuses_preprocessing_s_inputs_per_worker(tmp_path: Path) -> None:
    """Scoring takes one video per call, so preprocessing's `resources.inputs_per_worker` is an unknown key
    in a score config, named in the error, not a setting silently ignored."""
    from evaluation.score_config import ScoreConfig
    from pipeline.preprocess_config import PreprocessConfig

    path = tmp_path / "resources.yaml"
    path.write_text("resources:\n  workers: 1\n  inputs_per_worker: 3\n")
    assert load_config(PreprocessConfig, path).resources.inputs_per_worker == 3
    with pytest.raises(BadInput, match="unknown key.*inputs_per_worker"):
        load_config(ScoreConfig, path)
    with pytest.raises(BadInput, match="inputs_per_worker"):
        load_config(PreprocessConfig, path, {"resources.inputs_per_worker": 0}).resources.validate()
