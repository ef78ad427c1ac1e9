"""How closed a scored video's lips get at bilabials, against how closed they get in pauses.

Viseme agreement (evaluation/sync.py) counts a p/b/m as closed when the least open frame it overlaps is at
most 0.35 on the clip's own openness scale: 0 at the clip's 5th percentile, 1 at its 95th. A video whose
mouth presses tighter in pauses than it ever closes while talking has its 5th percentile set by the pauses,
and then fails bilabials its lips close on as far as they close anywhere in speech. This prints, per scored
row of a `lipsync score` output (e.g. a demo's `scores/`): raw openness (inner-lip gap over inter-ocular
distance) at the 5th percentile of the whole clip, its median over pause frames (no phoneme of the timeline
overlaps them, each phoneme looked for MOUTH_LEAD_MS early as scoring does) and over speech frames' 5th
percentile, the median of each bilabial's least open frame, and the share of bilabials counted closed on the
whole clip's scale (what scoring reports, printed beside it as a check) and on the speech frames' scale
(a diagnostic, not the bar).

Usage: python benchmarks/closure_depth.py SCORES_DIR [--pairs PAIRS_CSV] (default: SCORES_DIR/../new_speech/
pairs.csv, where a demo keeps its transcripts). Writes benchmarks/results/closure_depth.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"


def shifted_spans(timeline: list, n: int, fps: float) -> list[tuple[str, int, int]]:
    """(viseme, first frame, end frame) of each phoneme, looked for MOUTH_LEAD_MS before it sounds."""
    from evaluation.sync import frame_span
    from pipeline import phonemes as ph

    return [(p.viseme, *frame_span(p, n, fps)) for p in ph.shift_timeline(timeline, -ph.MOUTH_LEAD_MS)]


def closed_share(bilabial_minima: np.ndarray, low: float, high: float, closed_below: float) -> float:
    """Share of bilabials whose least open frame is at most `closed_below` on the [low, high] scale."""
    if not len(bilabial_minima):
        return float("nan")
    return float(np.mean((bilabial_minima - low) / max(high - low, 1e-9) <= closed_below))


def depth(openness: np.ndarray, spans: list[tuple[str, int, int]], closed_below: float) -> dict[str, Any]:
    """The figures of one clip from its raw openness and phoneme spans."""
    speech = np.zeros(len(openness), bool)
    for _, a, b in spans:
        speech[a:b] = True
    minima = np.array([np.nanmin(openness[a:b]) for v, a, b in spans if v == "bilabial" and b > a])
    low, high = np.nanpercentile(openness, [5, 95])
    speech_low = float(np.nanpercentile(openness[speech], 5))
    pause = openness[~speech]
    return {
        "clip_p5": float(low),
        "clip_p95": float(high),
        "pause_share": float(np.mean(~speech)),
        "pause_median": float(np.nanmedian(pause)) if np.isfinite(pause).any() else float("nan"),
        "speech_p5": speech_low,
        "bilabial_min_median": float(np.median(minima)) if len(minima) else float("nan"),
        "n_bilabial": int(len(minima)),
        "closed_clip_scale": closed_share(minima, low, high, closed_below),
        "closed_speech_scale": closed_share(minima, speech_low, high, closed_below),
    }


def measure(row: dict[str, Any], pair: dict[str, str], scorer: Any) -> dict[str, Any]:
    """Track one scored video (with the audio muxed into it) as scoring does, unsmoothed landmarks, and
    measure its closure depth."""
    from evaluation.clip_scorer import decode
    from pipeline.landmarks import fill_gaps, mouth_openness

    cfg = scorer.cfg
    frames, pcm = decode(row["video"], cfg)
    track = scorer.tracker.track(frames, fps=cfg.fps)
    openness = mouth_openness(fill_gaps(track.landmarks, track.found)[0])
    source = {"phonemes": "", "timeline": pair.get("timeline", ""), "transcript": pair.get("transcript", "")}
    timeline, _ = scorer.timeline({**row, **source, "language": pair["language"]}, pcm)
    return depth(openness, shifted_spans(timeline, len(openness), cfg.fps), cfg.closed_below)


def _shown(value: float | None) -> str:
    return "  -  " if value is None else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("scores")
    parser.add_argument("--pairs", default=None)
    args = parser.parse_args()
    import pyarrow.parquet as pq

    from evaluation.clip_scorer import ClipScorer
    from evaluation.score_config import ScoreConfig

    scores = Path(args.scores)
    pairs_csv = Path(args.pairs) if args.pairs else scores.parent / "new_speech" / "pairs.csv"
    with open(pairs_csv, newline="", encoding="utf-8") as fh:
        pairs = {p["id"]: p for p in csv.DictReader(fh)}
    scorer = ClipScorer(ScoreConfig())
    out = []
    print(
        "system        id     clip p5  pause med  speech p5  bilabial min  closed: scored, clip scale, speech scale"
    )
    for row in pq.read_table(scores / "scores.parquet").to_pylist():
        if row["status"] != "ok" or row["id"] not in pairs:
            continue
        figures = {"system": row["system"], "id": row["id"], "scored_closed": row.get("bilabial_closed")}
        figures |= measure(row, pairs[row["id"]], scorer)
        out.append(figures)
        print(
            f"{row['system']:<13} {row['id']:<6} {figures['clip_p5']:7.3f} {figures['pause_median']:10.3f} "
            f"{figures['speech_p5']:10.3f} {figures['bilabial_min_median']:13.3f}  "
            f"{_shown(figures['scored_closed'])} {figures['closed_clip_scale']:.2f} "
            f"{figures['closed_speech_scale']:.2f}"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "closure_depth.json").write_text(json.dumps({"scores": str(scores), "rows": out}, indent=1))
    print(f"wrote {RESULTS / 'closure_depth.json'}")


if __name__ == "__main__":
    main()
