"""`lipsync select`: the source clips of the worst scored outputs, as the manifest `train --focus` reads.

The scores are built by hand with scores.parquet's real columns (the ones `ClipScorer.base_row` and the
meters write): ten generated outputs from nine source videos in three languages, a failed row and the "do
nothing" baseline rows, which must never be selected.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from core.errors import BadInput
from evaluation.select import DEFAULT_METRIC, SelectConfig, parse_worst, run

REPO = Path(__file__).resolve().parents[3]
CORPUS = "/data/corpus"
# id, language, source, landmark offset, LSE-D, LSE-C
OUTPUTS = (
    ("o01", "en", "a", 5, 9.5, 1.0),
    ("o02", "en", "a", 4, 9.0, 1.5),
    ("o03", "en", "b", 1, 7.0, 3.0),
    ("o04", "en", "i", 0, 6.5, 4.0),
    ("o05", "es", "c", -6, 10.0, 0.5),
    ("o06", "es", "d", 0, 6.0, 5.0),
    ("o07", "hi", "e", 3, 8.5, 2.0),
    ("o08", "hi", "f", 2, 8.0, 2.5),
    ("o09", "hi", "g", -1, 7.5, 3.5),
    ("o10", "hi", "h", 0, 6.2, 4.5),
)


def src(name: str) -> str:
    return f"{CORPUS}/{name}.mp4"


def _row(id_: str, language: str, source: str, offset: int, lse_d: float, lse_c: float) -> dict:
    return {
        "id": id_,
        "video": f"/data/generated/videos/{id_}.mp4",
        "language": language,
        "speaker": f"spk-{source}",
        "system": "wav2lip",
        "split": "",
        "emotion": "",
        "source": src(source),
        "status": "ok",
        "reason": "",
        "message": "",
        "landmark_offset_frames": offset,
        "landmark_confidence": 3.0,
        "openness_envelope_correlation": 0.4,
        "viseme_agreement": 0.7,
        "lse_d": lse_d,
        "lse_c": lse_c,
    }


def scores_frame() -> pd.DataFrame:
    rows = [_row(*o) for o in OUTPUTS]
    failed = {**_row("o11", "en", "z", 0, 0.0, 0.0), "status": "failed", "reason": "no_face"}
    for key in ("landmark_offset_frames", "landmark_confidence", "lse_d", "lse_c", "viseme_agreement"):
        failed[key] = None  # a failed row has no metrics
    # the do-nothing videos: far out of sync (they keep the old mouth), but not the model's outputs
    baseline = [
        {**_row(i, lang, s, 12, 14.0, 0.1), "system": "baseline", "video": f"/data/scores/baseline/{i}.mp4"}
        for i, lang, s in (("o04", "en", "i"), ("o10", "hi", "h"))
    ]
    return pd.DataFrame([*rows, failed, *baseline])


@pytest.fixture
def scores(tmp_path: Path) -> Path:
    out = tmp_path / "scores"
    out.mkdir()
    scores_frame().to_parquet(out / "scores.parquet")
    return out


def manifest(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "manifest.csv", keep_default_na=False)


def select(scores: Path, out: Path, **fields: object) -> dict:
    return run(SelectConfig(**fields), str(scores), str(out))


def test_worst_20_percent_are_the_largest_offsets_grouped_by_source(scores: Path, tmp_path: Path) -> None:
    result = select(scores, tmp_path / "sel")  # the defaults: worst 20% by |landmark offset|
    m = manifest(tmp_path / "sel")
    assert list(m.columns) == ["video", "language", "speaker", "metric", "value", "outputs"]
    assert list(m["video"]) == [src("c"), src("a")]  # |-6| then 5: worst first
    assert list(m["language"]) == ["es", "en"] and list(m["speaker"]) == ["spk-c", "spk-a"]
    assert set(m["metric"]) == {DEFAULT_METRIC} and list(m["value"]) == [-6.0, 5.0]
    assert list(m["outputs"]) == [1, 1]
    assert result["selected_outputs"] == 2 and result["sources"] == 2
    assert result["not_ok_skipped"] == 1 and result["baseline_rows"] == 2
    manifest_path = str(tmp_path / "sel" / "manifest.csv")
    assert result["manifest"] == manifest_path
    assert result["next"] == (
        f"lipsync train wav2lip DATA TRAIN_OUT --syncnet EXPERT --focus {manifest_path} --init-from CHECKPOINT"
    )
    doc = json.loads((tmp_path / "sel" / "select.json").read_text())
    assert doc["parameters"]["worst"] == "20%" and doc["parameters"]["direction"] == "abs"
    assert [s["id"] for s in doc["selected"]] == ["o05", "o01"] and doc["counts"]["sources"] == 2


def test_one_row_per_source_with_its_worst_value_and_output_count(scores: Path, tmp_path: Path) -> None:
    select(scores, tmp_path / "sel", worst="30%")  # o05, o01, o02: two of them from source a
    m = manifest(tmp_path / "sel")
    assert list(m["video"]) == [src("c"), src("a")]
    assert list(m["outputs"]) == [1, 2] and list(m["value"]) == [-6.0, 5.0]


def test_a_count_and_the_language_filter_apply_before_the_ranking(scores: Path, tmp_path: Path) -> None:
    select(scores, tmp_path / "count", worst="4")  # o05, o01, o02 (both from a), o07
    m = manifest(tmp_path / "count")
    assert list(m["video"]) == [src("c"), src("a"), src("e")] and list(m["outputs"]) == [1, 2, 1]
    result = select(scores, tmp_path / "hi", languages=("hi",))  # 20% of the 4 Hindi outputs: 1
    assert list(manifest(tmp_path / "hi")["video"]) == [src("e")] and result["after_language"] == 4
    select(scores, tmp_path / "two", languages=("hi", "es"), worst="2")
    assert list(manifest(tmp_path / "two")["video"]) == [src("c"), src("e")]


def test_thresholds_follow_each_metrics_direction(scores: Path, tmp_path: Path) -> None:
    select(scores, tmp_path / "d", metric="lse_d", above=8.2)  # lower is better: above = bad
    m = manifest(tmp_path / "d")
    assert list(m["video"]) == [src("c"), src("a"), src("e")] and list(m["outputs"]) == [1, 2, 1]
    assert list(m["value"]) == [10.0, 9.5, 8.5]
    select(scores, tmp_path / "c", metric="lse_c", below=1.2)  # higher is better: below = bad
    assert list(manifest(tmp_path / "c")["video"]) == [src("c"), src("a")]
    select(scores, tmp_path / "off", above=2)  # offsets: |value| > 2
    assert list(manifest(tmp_path / "off")["video"]) == [src("c"), src("a"), src("e")]
    # language, then threshold, then worst: en+hi rows with LSE-D above 8.2 are o01, o02, o07 -> the worst one
    result = select(scores, tmp_path / "all", languages=("en", "hi"), metric="lse_d", above=8.2, worst="1")
    assert list(manifest(tmp_path / "all")["video"]) == [src("a")]
    assert (result["after_language"], result["after_threshold"], result["selected_outputs"]) == (8, 3, 1)


def test_rows_without_a_source_fall_back_to_their_video(tmp_path: Path) -> None:
    frame = scores_frame()
    frame.loc[frame["id"] == "o05", "source"] = ""  # e.g. a corpus manifest scored as it is
    frame["audio"] = [f"/data/audio/{i}.wav" for i in frame["id"]]  # scores that carry the clip's audio
    (tmp_path / "s").mkdir()
    frame.to_parquet(tmp_path / "s" / "scores.parquet")
    result = run(SelectConfig(), str(tmp_path / "s" / "scores.parquet"), str(tmp_path / "sel"))
    m = manifest(tmp_path / "sel")
    assert list(m["video"]) == ["/data/generated/videos/o05.mp4", src("a")]
    assert list(m["audio"]) == ["/data/audio/o05.wav", "/data/audio/o01.wav"]
    assert result["source_from_video"] == 1


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"metric": "sharpness"}, "unknown metric 'sharpness'; known: landmark_offset_frames"),
        ({"metric": "lse_v2_d"}, "metric lse_v2_d is not in these scores"),
        ({"languages": ("fr",)}, "--language fr emptied the selection: the scored rows are in en, es, hi"),
        ({"metric": "lse_d", "below": 5.0}, "the threshold emptied the selection"),
        ({"worst": "0%"}, "--worst '0%'"),
    ],
)
def test_refusals_name_what_is_wrong(scores: Path, tmp_path: Path, fields: dict, message: str) -> None:
    with pytest.raises(BadInput, match=re.escape(message)):
        select(scores, tmp_path / "sel", **fields)
    assert not (tmp_path / "sel").exists()


@pytest.mark.parametrize("text", ["0", "-3", "2.5", "abc", "150%", "0%", "%", ""])
def test_bad_worst_values(text: str) -> None:
    with pytest.raises(BadInput, match="--worst"):
        parse_worst(text)


def test_worst_values() -> None:
    assert parse_worst("20%") == ("share", 0.2) and parse_worst("100%") == ("share", 1.0)
    assert parse_worst("15") == ("count", 15)


def lipsync(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "lipsync.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_command_writes_the_manifest_and_prints_the_next_command(scores: Path, tmp_path: Path) -> None:
    out = tmp_path / "sel"
    done = lipsync("select", str(scores), str(out), "--worst", "30%", "--language", "en,es", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["manifest"] == str(out / "manifest.csv") and result["sources"] == 2
    assert f"--focus {out / 'manifest.csv'}" in result["next"]
    assert list(manifest(out)["video"]) == [src("c"), src("a")]  # 30% of 6: o05, o01


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--metric", "sharpness"], "unknown metric 'sharpness'; known: landmark_offset_frames, "),
        (["--language", "fr"], "--language fr emptied the selection"),
        (["--metric", "lse_c", "--above", "9"], "no scored row has lse_c above 9"),
        (["--worst", "many"], "--worst 'many': expected a share like 20%"),
    ],
)
def test_refusals_exit_2_with_one_line(scores: Path, tmp_path: Path, args: list[str], message: str) -> None:
    done = lipsync("select", str(scores), str(tmp_path / "sel"), *args)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"lipsync: error: {message}")


def test_scores_that_are_missing_or_not_a_table_exit_2(tmp_path: Path) -> None:
    not_parquet = tmp_path / "scores.parquet"
    not_parquet.write_text("id,system\n1,a\n")
    for target, message in (
        (tmp_path / "nowhere", "scores {} do not exist"),
        (not_parquet, "scores {} are not a Parquet table"),
    ):
        done = lipsync("select", str(target), str(tmp_path / "sel"))
        assert done.returncode == 2, done.stderr
        expected = message.format(target if target.suffix else f"{target}/scores.parquet")
        (line,) = done.stderr.strip().splitlines()
        assert line.startswith(f"lipsync: error: {expected}")


def test_the_report_shows_the_next_iteration_only_when_given(scores: Path, tmp_path: Path) -> None:
    from evaluation.report import run as report

    steps = "lipsync select /runs/scores /runs/select --worst 20%\nlipsync train wav2lip D O --focus M"
    report(str(scores), str(tmp_path / "with"), next_steps=steps)
    html = (tmp_path / "with" / "report.html").read_text()
    assert (
        "<h2>Next iteration</h2>" in html and "lipsync select /runs/scores /runs/select --worst 20%" in html
    )
    assert json.loads((tmp_path / "with" / "report.json").read_text())["next_steps"] == steps
    report(str(scores), str(tmp_path / "without"))
    assert "Next iteration" not in (tmp_path / "without" / "report.html").read_text()
