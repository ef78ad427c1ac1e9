"""`lipsync preprocess` on a generated corpus: every clip accepted, aligned crops, mel, splits, resume."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.landmarks import FaceMeshTracker
from pipeline.offset import offset_of_video
from pipeline.preprocess import run
from pipeline.preprocess_config import PreprocessConfig, ResourcesConfig
from pipeline.shards import decode_crops, decode_landmarks, decode_mel, decode_pcm
from pipeline.synth import SynthConfig
from pipeline.synth import run as synth


@pytest.fixture(scope="module")
def clips(preprocessed_corpus: Path) -> pd.DataFrame:
    return pd.read_parquet(preprocessed_corpus / "clips.parquet")


def test_every_synth_clip_is_accepted(
    preprocessed_corpus: Path, synth_corpus: Path, clips: pd.DataFrame
) -> None:
    manifest = pd.read_csv(synth_corpus / "manifest.csv")
    assert len(clips) == len(manifest) == 6
    assert pq.read_table(preprocessed_corpus / "rejects.parquet").num_rows == 0
    summary = json.loads((preprocessed_corpus / "summary.json").read_text())
    assert summary["accepted_clips"] == 6 and summary["rejected"] == 0
    assert summary["processed_inputs"] == 6  # the run that built it, not a later resume
    speed = summary["throughput"]
    assert speed["worker_cpu_seconds"] > 0 and speed["frames_per_cpu_second"] > 0
    assert set(summary["languages"]) == {"en", "es", "hi"}
    assert all(v["speakers"] == 2 and v["phonemes_per_second"] > 5 for v in summary["languages"].values())


def test_language_speaker_and_speaker_disjoint_split(synth_corpus: Path, clips: pd.DataFrame) -> None:
    manifest = pd.read_csv(synth_corpus / "manifest.csv")
    by_source = {
        str((synth_corpus / v).resolve()): (lang, spk)
        for v, lang, spk in manifest[["video", "language", "speaker"]].values
    }
    for source, lang, spk in clips[["source", "language", "speaker"]].values:
        assert by_source[str(Path(source).resolve())] == (lang, spk)
    assert clips.groupby("speaker")["split"].nunique().max() == 1  # no speaker in two splits
    for _, per_language in clips.groupby("language"):
        assert set(per_language["split"]) == {"train", "val"}


def test_shard_rows_hold_aligned_crops_and_mel(preprocessed_corpus: Path, clips: pd.DataFrame) -> None:
    tracker = FaceMeshTracker(max_faces=1)
    for shard in sorted(set(clips["shard"])):
        for row in pq.read_table(preprocessed_corpus / shard).to_pylist():
            n = row["n_frames"]
            assert n == 100 and row["fps"] == 25.0
            mel = decode_mel(row)
            assert mel.shape[0] == 80 and abs(mel.shape[1] - 3.2 * n) <= 1
            assert len(decode_pcm(row)) == n * 640
            assert decode_landmarks(row).shape == (n, 468, 2)
            crops = decode_crops(
                row,
                0,
                100,
            )[::10]
            assert crops.shape[1:] == (96, 96, 3)
            track = tracker.track(crops)
            assert track.found.all()  # FaceMesh re-detects a face in the crops
            mouth_y = track.landmarks[:, [13, 14], 1]
            assert (mouth_y > 48).all() and (mouth_y < 96).all()  # the mouth lies in the lower half


def test_rerun_resumes_without_reprocessing(
    preprocessed_corpus: Path, synth_corpus: Path, clips: pd.DataFrame, tmp_path: Path
) -> None:
    # On a copy: a rerun rewrites summary.json and clips.parquet, which other tests (on either xdist
    # worker, at any time) read from the shared session corpus.
    out = shutil.copytree(preprocessed_corpus, tmp_path / "rerun")
    state = sorted((out / "_state").glob("*.json"))
    mtimes = [p.stat().st_mtime_ns for p in state]
    other_pool = ResourcesConfig(workers=1, cpus_per_worker=0.5, poll_seconds=0.2)  # same clips
    result = run(PreprocessConfig(resources=other_pool), str(synth_corpus), str(out))
    assert (result["processed_inputs"], result["skipped_inputs"]) == (0, 6)
    assert [p.stat().st_mtime_ns for p in state] == mtimes
    assert set(pd.read_parquet(out / "clips.parquet")["clip_id"]) == set(clips["clip_id"])


def test_overlapping_inputs_give_the_clips_of_one_at_a_time(synth_corpus: Path, tmp_path: Path) -> None:
    """By default an actor holds two inputs at once (one in FaceMesh, the next probing and decoding);
    taking one input at a time must write exactly the same shards."""
    assert PreprocessConfig().resources.inputs_per_worker == 2
    runs = {}
    for held in (2, 1):
        out = tmp_path / f"held{held}"
        run(
            PreprocessConfig(resources=ResourcesConfig(workers=1, inputs_per_worker=held)),
            str(synth_corpus),
            str(out),
        )
        summary = json.loads((out / "summary.json").read_text())
        assert summary["throughput"]["max_inputs_in_flight_per_worker"] == held
        runs[held] = (out, pd.read_parquet(out / "clips.parquet"))
    (overlapped, clips), (one_at_a_time, again) = runs[2], runs[1]
    assert len(clips) == 6 and set(clips["clip_id"]) == set(again["clip_id"])
    for shard in sorted(set(clips["shard"])):
        rows = pq.read_table(overlapped / shard).to_pylist()
        others = {r["clip_id"]: r for r in pq.read_table(one_at_a_time / shard).to_pylist()}
        for row in rows:
            other = others[row["clip_id"]]
            n = row["n_frames"]
            assert np.array_equal(decode_crops(row, 0, n), decode_crops(other, 0, n))
            assert np.array_equal(decode_landmarks(row), decode_landmarks(other))
            assert np.array_equal(decode_mel(row), decode_mel(other))
            assert row["av_offset_frames"] == other["av_offset_frames"]


def test_offset_estimate_matches_injected_offsets(tmp_path: Path) -> None:
    """`lipsync offset` on synth clips made with --offset-frames K (K in -8..8): K +- 1 for >= 99 %."""
    tracker = FaceMeshTracker(max_faces=1)
    errors = []
    for k in range(-8, 9):
        out = tmp_path / f"k{k}"
        synth(
            SynthConfig(
                languages=(("en", "es", "hi")[k % 3],),
                speakers=1,
                clips_per_speaker=1,
                offset_frames=k,
                seed=40 + k,
            ),
            str(out),
        )
        video = next(csv.DictReader((out / "manifest.csv").open()))["video"]
        errors.append(offset_of_video(str(out / video), tracker=tracker).offset_frames - k)
    within = np.mean(np.abs(errors) <= 1)
    assert within >= 0.99, str(errors)


def test_offset_command_json(synth_corpus: Path) -> None:
    video = next(synth_corpus.glob("en/*/clip000.mp4"))
    done = subprocess.run(
        [sys.executable, "-m", "lipsync.cli", "offset", str(video), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert abs(result["offset_frames"]) <= 1 and result["confidence"] > 0
    assert result["abstained"] is False and result["meter"] == "landmarks"
    curve = result["curve"]
    assert len(curve["lags"]) == len(curve["values"]) and curve["lags"][0] == -curve["lags"][-1]
    assert curve["lags"][int(np.argmax(curve["values"]))] == result["offset_frames"]
    missing = subprocess.run(
        [sys.executable, "-m", "lipsync.cli", "offset", "/nonexistent.mp4"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert missing.returncode == 2 and "/nonexistent.mp4" in missing.stderr.strip().splitlines()[-1]


def _network_meter_files(tmp_path: Path) -> dict[str, str]:
    """A syncnet_v2.model state dict and a `lipsync train syncnet` checkpoint, both with random weights:
    what is tested is that alignment reads its offsets from whichever network it is given."""
    import torch

    from models.checkpoint import checkpoint_payload, save_checkpoint
    from models.registry import build_model
    from models.syncnet_v2 import SyncNetV2

    torch.manual_seed(0)
    torch.save(SyncNetV2().state_dict(), tmp_path / "syncnet_v2.model")
    expert = save_checkpoint(
        str(tmp_path / "expert"), checkpoint_payload(build_model("syncnet"), "syncnet", 96, 0)
    )
    return {"syncnet_v2": str(tmp_path / "syncnet_v2.model"), "expert": expert}


@pytest.mark.slow
@pytest.mark.parametrize("meter", ["syncnet_v2", "expert"])
def test_align_reads_the_chosen_network_meter(meter: str, synth_corpus: Path, tmp_path: Path) -> None:
    """`align.meter: syncnet_v2 | expert`: clips.parquet holds that network's offset and confidence (what
    `lipsync offset --meter` reads of the same clip), repair shifts by them, on_abstain rejects by them,
    and the data card names the meter."""
    from pipeline.meters import MeterConfig, build_meter
    from pipeline.preprocess_config import AlignConfig

    weights = _network_meter_files(tmp_path)[meter]
    manifest = tmp_path / "one.csv"  # one clip: the network meter runs 3 times on it (~10 s each on CPU)
    rows = list(csv.DictReader((synth_corpus / "manifest.csv").open(encoding="utf-8")))[:1]
    with manifest.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**r, "video": str(synth_corpus / r["video"])} for r in rows)
    resources = ResourcesConfig(workers=1)
    trusting = AlignConfig(
        meter=meter, weights=weights, min_confidence=-1e9, mode="repair", max_abs_offset=15
    )
    out = tmp_path / "trusting"
    run(PreprocessConfig(align=trusting, resources=resources), str(manifest), str(out))
    clips = pd.read_parquet(out / "clips.parquet")
    assert (
        len(clips) == 1 and (clips["av_offset_meter"] == meter).all() and clips["av_offset_confident"].all()
    )
    reader = build_meter(MeterConfig(meter, weights, min_confidence=-1e9))
    for clip in clips.itertuples():
        est = offset_of_video(clip.source, meter=reader)
        assert (clip.av_offset_frames, clip.av_offset_confidence) == pytest.approx(
            (est.offset_frames, est.confidence), abs=1e-4
        )
        assert clip.av_offset_repaired == (est.offset_frames != 0)
    card = json.loads((out / "summary.json").read_text())
    assert card["aligned_by"]["meter"] == meter and card["aligned_by"]["weights"] == weights

    doubting = AlignConfig(meter=meter, weights=weights, min_confidence=1e9, on_abstain="reject")
    out = tmp_path / "doubting"
    run(PreprocessConfig(align=doubting, resources=resources), str(manifest), str(out))
    rejects = pd.read_parquet(out / "rejects.parquet")
    assert len(rejects) == 1 and (rejects["reason"] == "low_sync_confidence").all()
    assert rejects["message"].str.contains(f"the {meter} meter abstains").all()


def test_align_refuses_a_network_meter_without_readable_weights(synth_corpus: Path, tmp_path: Path) -> None:
    from core.errors import BadInput
    from pipeline.preprocess_config import AlignConfig

    for align, message in (
        (AlignConfig(meter="syncnet_v2"), "needs weights"),
        (AlignConfig(meter="expert", weights=str(tmp_path / "missing")), "missing"),
        (AlignConfig(meter="landmarkz"), "unknown meter"),
        (AlignConfig(on_abstain="drop"), "on_abstain"),
    ):
        with pytest.raises(BadInput, match=message):
            run(PreprocessConfig(align=align), str(synth_corpus), str(tmp_path / "out"))
