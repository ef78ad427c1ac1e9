"""The AV-sync meter on real clips it was not fitted on: shifts, degradations, leave-one-clip-out.

Each clip of the development set (`../shared/media`, MANIFEST.tsv names the language) has its audio shifted
by k in {-10, -6, -3, -1, 0, +1, +3, +6, +10} frames of 40 ms (k > 0 delays the audio with leading silence,
k < 0 cuts its start; the audio still starts at 0), under each condition:

- clean: the file as it is;
- crf35_aac32k: video re-encoded with x264 CRF 35, audio AAC 32 kbit/s;
- audio_8k: audio resampled to 8 kHz in the file (the meter reads it back at 16 kHz);
- noise_10db: white noise added to the audio at 10 dB SNR;
- retime_30fps: video re-timed to 30 fps (the meter decodes at 25 fps, as preprocessing does).

The meter's projection (pipeline.offset.fit_projection) is fitted leave-one-clip-out: every figure for a
clip comes from a projection fitted on the clean versions of the other clips and on a synth corpus (en/es/hi,
18 clips of 8 s, seed 7; never on the clip itself). Printed per clip, per
language, per condition and overall:

- relative recovery: |(d(k) - d(0)) - k| <= 1 for the 8 non-zero shifts;
- |d(0)| <= 2: the unshifted clip reads near 0 (the clips are taken to be in sync);
- confident: share of (clip, k) cases where the meter does not abstain, and among those the share within
  +-1 frame of k + d_ref (d_ref: the clip's clean, unshifted reading; `acc_ref`) and of k (`acc_abs`).

The same run measures today's meter, loaded from git history (`--baseline-rev`; skipped without git), with
generation's correction threshold (confidence >= 0.2) as its "confident". `--windows` adds every 5 s piece
of every clip as a clip of its own (the hardest case: short clips). `--synth` adds synth clips made with
`--offset-frames K`, K in -8..8 (other seeds than the fitting corpus). `--write-projection FILE` fits the
projection on all clips and the synth corpus and writes it (the shipped one is pipeline/sync_projection.json).

Usage: python benchmarks/offset.py [--media ../shared/media] [--work /tmp/offset_bench] [--windows] [--synth]
Writes benchmarks/results/offset.json.
"""

from __future__ import annotations

import argparse
import collections
import csv
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
FPS = 25.0
SAMPLE_RATE = 16000
SHIFTS = (-10, -6, -3, -1, 0, 1, 3, 6, 10)
CONDITIONS = ("clean", "crf35_aac32k", "audio_8k", "noise_10db", "retime_30fps")
BASELINE_CONFIDENCE = 0.2  # generation's post.min_confidence for today's meter
WINDOW_FRAMES, WINDOW_HOP = 125, 60


@dataclass
class Clip:
    name: str
    language: str
    lips: np.ndarray  # (T, 27) lip shape at 25 fps, NaN rows without a face
    openness: np.ndarray  # (T,) for today's meter
    pcm: np.ndarray  # 16 kHz mono


# --- the data -------------------------------------------------------------------------------------------
def languages(media: Path) -> dict[str, str]:
    """Clip file name -> language code (the file name's prefix; MANIFEST.tsv's own words beside it)."""
    with (media / "MANIFEST.tsv").open(encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh, delimiter="\t") if r["file"].endswith(".mp4")]
    return {r["file"]: r["file"].split("_")[0] for r in rows}


def ffmpeg(*args: str) -> None:
    from pipeline.media import ffmpeg_executable

    subprocess.run([ffmpeg_executable(), "-hide_banner", "-loglevel", "error", "-y", *args], check=True)


def degraded(src: Path, condition: str, work: Path) -> Path:
    """The clip under a condition (made once, kept in `work`)."""
    if condition in ("clean", "noise_10db"):
        return src
    out = work / f"{src.stem}.{condition}.mp4"
    if out.exists():
        return out
    tmp = out.with_suffix(".part.mp4")
    maps = ["-map", "0:v:0", "-map", "0:a:0"]
    if condition == "crf35_aac32k":
        codecs = ["-c:v", "libx264", "-crf", "35", "-preset", "veryfast", "-c:a", "aac", "-b:a", "32k"]
    elif condition == "audio_8k":
        codecs = ["-c:v", "copy", "-c:a", "aac", "-ar", "8000"]
    elif condition == "retime_30fps":
        codecs = ["-vf", "fps=30", "-c:v", "libx264", "-crf", "18", "-preset", "veryfast", "-c:a", "copy"]
    else:
        raise ValueError(condition)
    ffmpeg("-i", str(src), *maps, *codecs, str(tmp))
    tmp.rename(out)
    return out


def with_noise(pcm: np.ndarray, snr_db: float, seed: int) -> np.ndarray:
    """White noise at `snr_db` below the signal's mean power."""
    power = float(np.mean(pcm.astype(np.float64) ** 2))
    noise = np.random.default_rng(seed).normal(0.0, np.sqrt(power / 10 ** (snr_db / 10)), len(pcm))
    return (pcm + noise).astype(np.float32)


def tracked(path: Path, work: Path, tracker) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    """(lip shape, openness) at 25 fps, decoded as preprocessing decodes (cached by the file's content)."""
    from pipeline.landmarks import lip_shape, mouth_openness, smooth_landmarks
    from pipeline.media import probe, read_frames
    from pipeline.offset import analysis_size

    digest = hashlib.sha1(path.read_bytes()).hexdigest()[:16]
    cache = work / f"{path.stem}.{digest}.npz"
    if not cache.exists():
        info = probe(path)
        frames = read_frames(path, fps=FPS, size=analysis_size(info.width, info.height))
        track = tracker.track(frames, fps=FPS)
        np.savez_compressed(cache, landmarks=track.landmarks, found=track.found)
    data = np.load(cache)
    smooth = smooth_landmarks(data["landmarks"], data["found"])
    return lip_shape(smooth), mouth_openness(smooth)


def load_clips(media: Path, work: Path, conditions: tuple[str, ...]) -> dict[str, list[Clip]]:
    """Every development clip under every condition."""
    from pipeline.landmarks import FaceMeshTracker
    from pipeline.media import read_audio

    tracker = FaceMeshTracker(max_faces=1)
    out: dict[str, list[Clip]] = {c: [] for c in conditions}
    for name, language in sorted(languages(media).items()):
        src = media / name
        for condition in conditions:
            path = degraded(src, condition, work)
            lips, openness = tracked(path, work, tracker)
            pcm = read_audio(path, SAMPLE_RATE)
            if condition == "noise_10db":
                pcm = with_noise(pcm, 10.0, zlib.crc32(name.encode()))
            out[condition].append(Clip(Path(name).stem, language, lips, openness, pcm))
        print(f"  {name}: {len(lips)} frames", file=sys.stderr, flush=True)
    return out


def windows(clips: list[Clip]) -> list[Clip]:
    """Every 5 s piece (hop 2.4 s) of every clip, as a clip of its own."""
    per = SAMPLE_RATE / FPS
    out = []
    for c in clips:
        for s in range(0, max(1, len(c.lips) - WINDOW_FRAMES + 1), WINDOW_HOP):
            e = s + WINDOW_FRAMES
            pcm = c.pcm[int(s * per) : int(e * per)]
            out.append(Clip(f"{c.name}@{s}", c.language, c.lips[s:e], c.openness[s:e], pcm))
    return out


def shifted(pcm: np.ndarray, k: int) -> np.ndarray:
    """Audio delayed by k frames (leading silence) or, for k < 0, advanced (its start cut)."""
    n = int(round(abs(k) * SAMPLE_RATE / FPS))
    if k > 0:
        return np.concatenate([np.zeros(n, np.float32), pcm[: len(pcm) - n]])
    return pcm[n:].copy() if k < 0 else pcm


# --- meters -----------------------------------------------------------------------------------------------
Meter = Callable[[Clip, np.ndarray], tuple[int, bool, float]]  # (offset, confident, confidence)


def synth_training_clips(work: Path) -> list[Clip]:
    """The synth corpus the projection is also fitted on: en/es/hi, 3 speakers x 2 clips of 8 s, seed 7."""
    from pipeline.landmarks import FaceMeshTracker
    from pipeline.media import read_audio
    from pipeline.synth import SynthConfig, run

    root = work / "synth_training"
    if not (root / "manifest.csv").exists():
        run(SynthConfig(speakers=3, clips_per_speaker=2, seconds=8.0, seed=7), str(root))
    tracker = FaceMeshTracker(max_faces=1)
    out = []
    for row in csv.DictReader((root / "manifest.csv").open(encoding="utf-8")):
        video = root / row["video"]
        lips, openness = tracked(video, work, tracker)
        name = "synth/" + row["video"].replace("/", "_")
        out.append(Clip(name, row["language"], lips, openness, read_audio(video, SAMPLE_RATE)))
    return out


def fit(clips: list[Clip]):  # noqa: ANN201
    from pipeline.offset import fit_projection

    return fit_projection(((c.lips, c.pcm, SAMPLE_RATE, FPS) for c in clips), names=[c.name for c in clips])


def loo_meters(clean: list[Clip], synth: list[Clip]) -> dict[str, Meter]:
    """Per held-out clip: the meter with a projection fitted on the other real clips (clean) and the synth."""
    from pipeline.offset import estimate_offset

    meters = {}
    for held in clean:
        projection = fit([c for c in clean if c.name != held.name] + synth)

        def meter(clip: Clip, pcm: np.ndarray, projection=projection) -> tuple[int, bool, float]:  # noqa: ANN001
            est = estimate_offset(clip.lips, pcm, SAMPLE_RATE, FPS, projection=projection)
            return est.offset_frames, est.confident, est.confidence

        meters[held.name] = meter
    return meters


def baseline_meter(rev: str) -> Meter | None:
    """Today's meter: pipeline/offset.py as of `rev`, loaded from git history (None without git)."""
    try:
        source = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{rev}:pipeline/offset.py"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(tempfile.mkdtemp()) / "offset_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("offset_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)

    def meter(clip: Clip, pcm: np.ndarray) -> tuple[int, bool, float]:
        est = module.estimate_offset(clip.openness, pcm, SAMPLE_RATE, FPS)
        return est.offset_frames, est.confidence >= BASELINE_CONFIDENCE, est.confidence

    return meter


def measure(clips: list[Clip], meter_of: Callable[[Clip], Meter], condition: str) -> list[dict]:
    """One record per (clip, k)."""
    records = []
    for clip in clips:
        meter = meter_of(clip)
        for k in SHIFTS:
            d, confident, confidence = meter(clip, shifted(clip.pcm, k))
            records.append(
                {
                    "clip": clip.name,
                    "language": clip.language,
                    "condition": condition,
                    "k": k,
                    "d": d,
                    "confident": bool(confident),
                    "confidence": round(float(confidence), 4),
                }
            )
    return records


# --- figures ----------------------------------------------------------------------------------------------
def figures(records: list[dict], reference: dict[str, int]) -> dict[str, float | int]:
    """Relative recovery, |d(0)| <= 2, confident share and accuracy of one group of records."""
    by_clip: dict[str, dict[int, dict]] = collections.defaultdict(dict)
    for r in records:
        by_clip[r["clip"]][r["k"]] = r
    rel = [abs(r["d"] - d[0]["d"] - k) <= 1 for d in by_clip.values() for k, r in d.items() if k != 0]
    zero = [abs(d[0]["d"]) <= 2 for d in by_clip.values()]
    confident = [r for r in records if r["confident"]]
    ref = [abs(r["d"] - r["k"] - reference.get(r["clip"].split("@")[0], 0)) <= 1 for r in confident]
    absolute = [abs(r["d"] - r["k"]) <= 1 for r in confident]
    return {
        "cases": len(records),
        "relative_recovery": round(float(np.mean(rel)), 4) if rel else float("nan"),
        "relative_ok": int(sum(rel)),
        "relative_n": len(rel),
        "zero_within_2": int(sum(zero)),
        "clips": len(zero),
        "confident_share": round(len(confident) / max(len(records), 1), 4),
        "confident_acc_ref": round(float(np.mean(ref)), 4) if ref else float("nan"),
        "confident_acc_abs": round(float(np.mean(absolute)), 4) if absolute else float("nan"),
    }


def grouped(records: list[dict], key: str, reference: dict[str, int]) -> dict[str, dict]:
    groups = collections.defaultdict(list)
    for r in records:
        groups[r[key]].append(r)
    return {g: figures(rs, reference) for g, rs in sorted(groups.items())}


def loo_thresholds(records: list[dict], reference: dict[str, int], target: float = 0.99) -> dict[str, float]:
    """Per held-out clip: the lowest confidence threshold that reaches `target` accuracy on the others."""
    out = {}
    for held in sorted({r["clip"].split("@")[0] for r in records}):
        rest = [r for r in records if r["clip"].split("@")[0] != held]
        conf = np.array([r["confidence"] for r in rest])
        ok = np.array([abs(r["d"] - r["k"] - reference[r["clip"].split("@")[0]]) <= 1 for r in rest])
        out[held] = next((float(t) for t in np.unique(conf) if ok[conf >= t].mean() >= target), float("inf"))
    return out


def table(title: str, rows: dict[str, dict]) -> str:
    lines = [
        title,
        f"  {'':32s} {'rel ±1':>13s} {'|d0|<=2':>8s} {'confident':>9s} {'acc_ref':>7s} {'acc_abs':>7s}",
    ]
    for name, f in rows.items():
        lines.append(
            f"  {name[:32]:32s} {f['relative_ok']:4d}/{f['relative_n']:<4d}{f['relative_recovery']:5.1%}"
            f" {f['zero_within_2']:3d}/{f['clips']:<4d} {f['confident_share']:9.1%}"
            f" {f['confident_acc_ref']:7.1%} {f['confident_acc_abs']:7.1%}"
        )
    return "\n".join(lines)


def report(name: str, records: list[dict], reference: dict[str, int]) -> dict:
    """Print and return the figures of one meter."""
    clean = [r for r in records if r["condition"] == "clean"]
    result = {
        "overall_clean": figures(clean, reference),
        "by_condition": grouped(records, "condition", reference),
        "by_language_clean": grouped(clean, "language", reference),
        "by_clip_clean": grouped(clean, "clip", reference),
    }
    print(table(f"\n== {name}: by condition", result["by_condition"]))
    print(table(f"== {name}: clean, by language", result["by_language_clean"]))
    print(table(f"== {name}: clean, by clip", result["by_clip_clean"]))
    return result


def correction_check(clean: list[Clip], synth: list[Clip]) -> dict:
    """Generation's default post-correction on every clean clip and shift (leave-one-clip-out projection):
    how often it shifts the audio, and whether each shift moved the offset toward 0, as re-measured and
    as it truly is (k + the clip's own reading d_ref, which the shift should cancel)."""
    from generation.config import PostprocessConfig
    from generation.correction import advance_audio, correct_offset
    from pipeline.offset import estimate_offset

    cfg = PostprocessConfig()
    rows = []
    for held in clean:
        projection = fit([c for c in clean if c.name != held.name] + synth)

        def reading(pcm: np.ndarray, shift: int, lips=held.lips, projection=projection):  # noqa: ANN001, ANN202
            mouth, audio = advance_audio(lips, pcm, SAMPLE_RATE, FPS, shift)
            return estimate_offset(mouth, audio, SAMPLE_RATE, FPS, cfg.max_lag, projection=projection)

        ref = reading(held.pcm, 0).offset_frames
        for k in SHIFTS:
            pcm = shifted(held.pcm, k)
            fix = correct_offset(lambda shift, pcm=pcm: reading(pcm, shift), len(held.lips), FPS, cfg)
            true_before, true_after = k + ref, k + ref - fix.shift_frames
            rows.append(
                {
                    "clip": held.name,
                    "k": k,
                    "before": fix.before.offset_frames,
                    "confident": fix.before.confident,
                    "shift": fix.shift_frames,
                    "after": fix.after.offset_frames,
                    "true_before": true_before,
                    "true_after": true_after,
                }
            )
    applied = [r for r in rows if r["shift"]]
    result = {
        "cases": len(rows),
        "applied": len(applied),
        "applied_unconfident": sum(not r["confident"] for r in applied),
        "applied_toward_zero_measured": sum(abs(r["after"]) < abs(r["before"]) for r in applied),
        "applied_toward_zero_true": sum(abs(r["true_after"]) < abs(r["true_before"]) for r in applied),
        "applied_within_1_true": sum(abs(r["true_after"]) <= 1 for r in applied),
        "rows": rows,
    }
    print(
        f"\n== generation's post-correction (defaults) on {len(rows)} clean cases: applied {len(applied)},"
        f" {result['applied_unconfident']} of them unconfident; toward 0 as re-measured"
        f" {result['applied_toward_zero_measured']}/{len(applied)}, truly"
        f" {result['applied_toward_zero_true']}/{len(applied)}, truly within ±1 after"
        f" {result['applied_within_1_true']}/{len(applied)}"
    )
    return result


def synth_check(work: Path) -> dict:
    """Synth clips made with --offset-frames K, K in -8..8 (3 languages): share read as K +- 1."""
    from pipeline.landmarks import FaceMeshTracker, lip_shape, smooth_landmarks
    from pipeline.media import read_audio, read_frames
    from pipeline.offset import estimate_offset
    from pipeline.synth import SynthConfig, run

    tracker = FaceMeshTracker(max_faces=1)
    rows = []
    for k in range(-8, 9):
        for i, language in enumerate(("en", "es", "hi")):
            out = work / f"synth_k{k}_{language}"
            if not (out / "manifest.csv").exists():
                cfg = SynthConfig(languages=(language,), speakers=1, clips_per_speaker=1, offset_frames=k)
                run(SynthConfig(**{**cfg.__dict__, "seed": 100 + 3 * k + i}), str(out))
            video = out / next(csv.DictReader((out / "manifest.csv").open()))["video"]
            track = tracker.track(read_frames(video, FPS), fps=FPS)
            lips = lip_shape(smooth_landmarks(track.landmarks, track.found))
            est = estimate_offset(lips, read_audio(video, SAMPLE_RATE), SAMPLE_RATE, FPS)
            rows.append({"k": k, "language": language, "d": est.offset_frames, "confident": est.confident})
    within = [abs(r["d"] - r["k"]) <= 1 for r in rows]
    print(f"\n== synth clips, K in -8..8: K±1 for {sum(within)}/{len(within)} ({np.mean(within):.1%})")
    return {"within_1": round(float(np.mean(within)), 4), "n": len(rows), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--media", default=str(REPO.parent / "shared" / "media"))
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "offset_bench"))
    parser.add_argument("--conditions", default=",".join(CONDITIONS))
    parser.add_argument("--baseline-rev", default="521ed4a", help="git revision of today's meter")
    parser.add_argument("--windows", action="store_true", help="also every 5 s piece of every clip")
    parser.add_argument("--synth", action="store_true", help="also synth clips with --offset-frames K")
    parser.add_argument("--write-projection", help="fit on all clean clips and write the projection here")
    parser.add_argument("--out", default=str(RESULTS / "offset.json"))
    args = parser.parse_args()

    media, work = Path(args.media), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    conditions = tuple(args.conditions.split(","))
    start = time.perf_counter()
    clips = load_clips(media, work, conditions)
    clean = clips["clean"]
    synth = synth_training_clips(work)
    if args.write_projection:
        Path(args.write_projection).write_text(json.dumps(fit(clean + synth).to_json()) + "\n")
        print(f"wrote {args.write_projection}", file=sys.stderr)

    loo = loo_meters(clean, synth)
    meters: dict[str, Callable[[Clip], Meter]] = {
        "landmarks (leave-one-clip-out)": lambda c: loo[c.name.split("@")[0]]
    }
    baseline = baseline_meter(args.baseline_rev)
    if baseline is not None:
        meters[f"today's meter ({args.baseline_rev})"] = lambda c: baseline
    result: dict = {
        "clips": [c.name for c in clean],
        "shifts": SHIFTS,
        "conditions": conditions,
        "meters": {},
    }
    for name, meter_of in meters.items():
        records = [r for cond in conditions for r in measure(clips[cond], meter_of, cond)]
        reference = {r["clip"]: r["d"] for r in records if r["condition"] == "clean" and r["k"] == 0}
        entry = report(name, records, reference)
        entry["loo_thresholds"] = loo_thresholds(records, reference) if "leave" in name else {}
        if args.windows:
            pieces = [r for cond in conditions for r in measure(windows(clips[cond]), meter_of, cond)]
            entry["windows_5s_by_condition"] = grouped(pieces, "condition", reference)
            print(table(f"== {name}: 5 s pieces, by condition", entry["windows_5s_by_condition"]))
        entry["records"] = records
        result["meters"][name] = entry
    thresholds = result["meters"]["landmarks (leave-one-clip-out)"]["loo_thresholds"]
    print(f"\nleave-one-clip-out confidence thresholds for 99 % accuracy: {thresholds}")
    if "clean" in clips:
        result["correction"] = correction_check(clean, synth)
    if args.synth:
        result["synth"] = synth_check(work)
    result["seconds"] = round(time.perf_counter() - start, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out} ({result['seconds']} s)", file=sys.stderr)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
