"""`lipsync synth`: a generated corpus whose mouths FaceMesh can follow, with known timing and offsets."""

from __future__ import annotations

from pathlib import Path

from pipeline.synth import SynthConfig, run


def test_runs_as_ray_tasks(tmp_path: Path, ray_session) -> None:  # noqa: ANN001
    """Many clips go to Ray tasks; the corpus is the same as a sequential run's."""
    cfg = SynthConfig(languages=("hi",), speakers=1, clips_per_speaker=2, seconds=2.0, seed=2)
    run(cfg, str(tmp_path / "seq"))
    run(SynthConfig(**{**cfg.__dict__, "ray_min_clips": 1}), str(tmp_path / "ray"))
    assert (tmp_path / "seq" / "manifest.csv").read_bytes() == (
        tmp_path / "ray" / "manifest.csv"
    ).read_bytes()
    assert len(list((tmp_path / "ray").glob("hi/*/*.mp4"))) == 2
