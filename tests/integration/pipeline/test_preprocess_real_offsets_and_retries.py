"""`lipsync offset` on real clips whose audio is shifted by a known number of frames, and preprocessing's
retry of an input whose ffprobe was killed by a signal."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support.tools import ffmpeg_cli as ffmpeg

from pipeline.preprocess_config import STATE_DIR, PreprocessConfig

SHIFTS = (-6, -3, 3, 6)


def shifted_copy(video: Path, k: int, out: Path) -> Path:
    """`video` with its audio delayed (k > 0) or advanced (k < 0) by k frames of 25 fps; video copied.

    k == 0 re-encodes the audio the same way, so the reference went through the same codec."""
    ms = abs(k) * 40
    if k > 0:
        audio_filter = f"adelay={ms}:all=1"
    elif k < 0:
        audio_filter = f"atrim=start={ms / 1000},asetpts=PTS-STARTPTS"
    else:
        audio_filter = "anull"
    ffmpeg(
        "-i", str(video), "-map", "0:v:0", "-map", "0:a:0", "-c:v", "copy",
        "-af", audio_filter, "-c:a", "aac", "-b:a", "128k", str(out),
    )  # fmt: skip
    return out


def analysis_sized(video: Path, out: Path) -> Path:
    """`video` itself, or for a video larger than the meter's decode size (`pipeline.offset.analysis_size`)
    a copy at that size in x264 at high quality, its timestamps and audio kept: the meter sees the frames it
    would, and each shifted copy no longer decodes 1080p HEVC (the five copies of each 20-s portrait clip
    took 42 s to read)."""
    from pipeline.media import probe
    from pipeline.offset import analysis_size

    info = probe(str(video))
    size = analysis_size(info.width, info.height)
    if size is None:
        return video
    scale = "scale={}:{}".format(*(-2 if side == -1 else side for side in size))  # x264 wants even sides
    ffmpeg(
        "-i", str(video), "-map", "0:v:0", "-map", "0:a:0", "-vf", scale, "-fps_mode", "passthrough",
        "-c:v", "libx264", "-preset", "ultrafast", "-crf", "16", "-c:a", "copy", str(out),
    )  # fmt: skip
    return out


class SameVideoTracker:
    """The real FaceMesh tracker, run once per distinct video: the shifted copies keep the video stream
    bit for bit (-c:v copy), so their decoded frames hash the same and reuse that track. Everything else
    in `offset_of_video` (probe, decode, audio, estimate) runs for every copy."""

    def __init__(self) -> None:
        from pipeline.landmarks import FaceMeshTracker

        self.tracker = FaceMeshTracker(max_faces=1)
        self.tracks: dict[str, Any] = {}
        self.runs = 0

    def track(self, frames: np.ndarray, fps: float = 25.0):  # noqa: ANN201
        import hashlib

        sample = np.ascontiguousarray(frames[:, ::4, ::4])
        key = f"{frames.shape}:{hashlib.sha1(sample.tobytes()).hexdigest()}"
        if key not in self.tracks:
            self.runs += 1
            self.tracks[key] = self.tracker.track(frames, fps=fps)
        return self.tracks[key]


@pytest.mark.slow
@pytest.mark.media
def test_offset_moves_with_shifted_audio_on_real_clips(shared_media: Path, tmp_path: Path) -> None:
    from pipeline.offset import offset_of_video

    tracker = SameVideoTracker()
    videos = sorted(shared_media.glob("*.mp4"))
    assert videos
    table: dict[str, dict[int, tuple[int, float]]] = {}
    failures = []
    for video in videos:
        row = table.setdefault(video.name, {})
        source = analysis_sized(video, tmp_path / f"{video.stem}_720.mp4")
        for k in (0, *SHIFTS):
            path = shifted_copy(source, k, tmp_path / f"{video.stem}_{k:+d}.mp4")
            est = offset_of_video(str(path), tracker=tracker)
            row[k] = (est.offset_frames, round(est.confidence, 3))
            path.unlink()
        base = row[0][0]
        for k in SHIFTS:
            if abs(row[k][0] - base - k) > 1:
                failures.append(f"{video.name} K={k:+d}: {row[k][0]} - {base} = {row[k][0] - base}")
    assert tracker.runs == len(videos), "a shifted copy changed the video frames"
    print(json.dumps(table, indent=1))
    assert not failures, "estimate does not move by K +- 1:\n" + "\n".join(failures) + f"\n{table}"


def _ffprobe_killed_first(tmp_path: Path, kills: int) -> Path:
    """A directory whose `ffprobe` SIGKILLs itself on its first `kills` runs, then is the real one.

    Each run appends a line to `calls`: how many times the input was probed."""
    real = shutil.which("ffprobe")
    assert real, "ffprobe is needed"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    script = bin_dir / "ffprobe"
    script.write_text(
        "#!/bin/sh\n"
        f'echo run >> "{calls}"\n'
        f'if [ "$(wc -l < "{calls}")" -le {kills} ]; then kill -9 $$; fi\n'
        f'exec "{real}" "$@"\n'
    )
    script.chmod(0o755)
    return bin_dir


@pytest.mark.parametrize(("kills", "accepted"), [(1, True), (3, False)])
def test_an_input_whose_ffprobe_was_killed_is_run_again(
    synth_corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kills: int, accepted: bool
) -> None:
    """A killed tool says nothing about the input: it is retried (twice), and only then rejected, and that
    reject does not count as done: the next run processes the input again."""
    from core.storage import Store
    from pipeline.clip_preprocessor import ClipPreprocessor, output_hash
    from pipeline.corpus import discover
    from pipeline.media import TOOL_KILLED
    from pipeline.preprocess import to_process
    from pipeline.preprocess_config import TOOL_RETRIES

    row = discover(str(synth_corpus))[0]
    monkeypatch.setenv("PATH", f"{_ffprobe_killed_first(tmp_path, kills)}{os.pathsep}{os.environ['PATH']}")
    cfg, out = PreprocessConfig(), str(tmp_path / "out")
    preprocessor = ClipPreprocessor(cfg, out)
    preprocessor({k: np.array([v]) for k, v in row.items()})  # writes the completion record, as a worker does
    record = json.loads((tmp_path / "out" / STATE_DIR / f"{row['input_id']}.json").read_text())
    probes = len((tmp_path / "calls").read_text().splitlines())
    pending, done = to_process(Store(out), output_hash(cfg), [row])
    if accepted:
        assert probes == kills + 1 and len(record["clips"]) == 1 and not record["rejects"]
        assert not pending and list(done) == [row["input_id"]]
    else:
        assert probes == TOOL_RETRIES + 1 and not record["clips"]
        assert [r["reason"] for r in record["rejects"]] == [TOOL_KILLED]
        assert pending == [row] and not done
        preprocessor({k: np.array([v]) for k, v in row.items()})  # the next run: ffprobe is no longer killed
        assert not to_process(Store(out), output_hash(cfg), [row])[0]
