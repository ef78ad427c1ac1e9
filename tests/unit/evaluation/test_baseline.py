"""The "do nothing" baseline beside generated videos: its video, its comparison, the report's strips."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.io import wavfile

from evaluation import baseline
from evaluation.report import run as report
from pipeline.media import probe, read_frames, write_video


def _strip(value: int) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.full((baseline.CROP_H, baseline.CROP_W * 4, 3), value, np.uint8)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _row(system: str, language: str, offset: int, r: float, viseme: float) -> dict:
    return {
        "id": f"{language}-0",
        "system": system,
        "language": language,
        "status": "ok",
        "reason": "",
        "video": f"/{system}/{language}.mp4",
        "landmark_offset_frames": offset,
        "landmark_confidence": 4.0,
        "openness_envelope_correlation": r,
        "viseme_agreement": viseme,
        "mouth_strip": _strip(200 if system == "baseline" else 50),
        "mouth_strip_frames": [0, 10, 20, 30],
        "envelope_trace": list(np.sin(np.arange(40) / 3.0)),
    }


SCORES = [
    _row("demo", "en", 0, 0.7, 0.9),
    _row("baseline", "en", -9, 0.1, 0.5),
    _row("demo", "hi", 3, 0.2, 0.6),  # generated worse than the baseline on offset and r
    _row("baseline", "hi", 1, 0.4, 0.6),
]


def test_comparison_says_where_the_generated_video_beats_the_baseline() -> None:
    table = {r["language"]: r for r in baseline.comparison(pd.DataFrame(SCORES))}
    assert set(table) == {"en", "hi"}
    en, hi = table["en"], table["hi"]
    assert en["abs_offset"] == {"generated": 0.0, "baseline": 9.0, "generated_better": True}
    assert en["openness_envelope_correlation"]["generated_better"] is True
    assert en["viseme_agreement"]["generated_better"] is True
    assert hi["abs_offset"]["generated_better"] is False  # |3| vs |1|: the sign must not count
    assert hi["openness_envelope_correlation"]["generated_better"] is False
    assert hi["viseme_agreement"]["generated_better"] is False  # a tie is not better


def test_no_baseline_rows_no_comparison() -> None:
    assert baseline.comparison(pd.DataFrame([r for r in SCORES if r["system"] != "baseline"])) == []


def test_report_shows_baseline_table_and_strips(tmp_path: Path) -> None:
    pd.DataFrame(SCORES).to_parquet(tmp_path / "scores.parquet")
    written = report(str(tmp_path / "scores.parquet"), str(tmp_path / "report"))
    html = Path(written["report_html"]).read_text()
    assert '"do nothing" baseline' in html and "(not better)" in html and "(better)" in html
    assert "mouth crops over time, generated vs baseline" in html
    assert "<b>en</b> fails" in html  # the meter's confidence is not recorded in these rows: no pass
    assert {"demo", "baseline"} <= set(written["systems"])


def test_baseline_video_is_the_source_looped_under_the_new_audio(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, size=(25, 64, 64, 3), dtype=np.uint8)  # 1 s of source video
    source = write_video(str(tmp_path / "source.mp4"), frames, 25.0)
    audio = tmp_path / "new.wav"
    wavfile.write(audio, 16000, (0.3 * np.sin(np.arange(40000) / 20)).astype(np.float32))  # 2.5 s
    outputs = pd.DataFrame(
        [
            {"id": "en-0", "video": source, "audio": str(audio), "output": "gen.mp4", "status": "ok"},
            {"id": "en-1", "video": source, "audio": str(audio), "output": "", "status": "failed"},
        ]
    )
    records = baseline.baseline_records(outputs, str(tmp_path), str(tmp_path / "scores"))
    assert [r["id"] for r in records] == ["en-0"]  # a failed pair has no baseline
    (record,) = records
    assert record["system"] == "baseline" and record["source"] == source and "audio" not in record
    info = probe(record["video"])
    assert info.duration_s == pytest.approx(2.5, abs=0.1)  # as long as the new audio, not the 1 s source
    out = read_frames(record["video"])
    src = read_frames(source)
    for i in (3, 25 + 3, 50 + 3):  # looped, unmodified: frame i is the source's frame i % 25
        distances = np.abs(src.astype(int) - out[i].astype(int)).mean(axis=(1, 2, 3))
        assert int(distances.argmin()) == 3


def test_mouth_strip_crops_the_mouth(synth_corpus: Path) -> None:
    from pipeline.landmarks import FaceMeshTracker, smooth_landmarks

    video = sorted(synth_corpus.rglob("*.mp4"))[0]
    frames = read_frames(str(video))[:50]
    track = FaceMeshTracker(max_faces=1).track(frames, fps=25.0)
    strip = baseline.mouth_strip(frames, smooth_landmarks(track.landmarks, track.found), n=8)
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(strip["mouth_strip"]))))
    assert image.shape == (baseline.CROP_H, 8 * baseline.CROP_W, 3) and len(strip["mouth_strip_frames"]) == 8
    assert (image != 128).any(axis=2).mean() > 0.9  # crops, not the grey of a frame without a face


def test_sync_bar_needs_a_confident_meter_and_a_worse_baseline() -> None:
    rows = [dict(r, landmark_abstained=False) for r in SCORES]
    bar = baseline.sync_bar(pd.DataFrame(rows))
    assert bar["en"]["pass"] is True  # offset 0, r 0.7, viseme 0.9; baseline worse on each
    assert bar["hi"]["pass"] is False and bar["hi"]["baseline_worse_on_each"] is False
    rows[0]["landmark_abstained"] = True
    assert baseline.sync_bar(pd.DataFrame(rows))["en"]["pass"] is False  # an abstaining meter proves nothing
    rows[0].update(landmark_abstained=False, viseme_agreement=0.79)
    assert baseline.sync_bar(pd.DataFrame(rows))["en"]["pass"] is False
