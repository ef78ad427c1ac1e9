"""`lipsync mos results`: MOS with 95 % confidence intervals per system, language and criterion; agreement.

MOS of a cell (system x criterion, optionally x clip language or x the rater's own language) is the mean of
its ratings; the 95 % CI is mean +- t(0.975, n - 1) * s / sqrt(n) with s the sample standard deviation
(ddof 1), treating the ratings as independent (raters and clips are not modelled as random effects, so with
few raters the interval is optimistic). With n = 1 there is no interval (`ci95` is null).

Rater agreement is Krippendorff's alpha per criterion, units = clips (stimuli), coders = raters, missing
ratings allowed (each rater sees a subset): `alpha` uses the ordinal metric (the 1-5 scale is ordered
categories), `alpha_interval` the interval metric; 1 is perfect agreement, 0 chance level; null when fewer
than two clips have two ratings or the ratings do not vary.

A study that asks the optional "emotion" criterion (`mos create --criteria ...,emotion`) has it as a fourth
cell per system, language and agreement, and in `mean_of_criteria`; other studies' results are unchanged.

Output (STUDY_DIR/mos_results.json, the shape `lipsync report --mos` folds into the overall score):
    {"systems": {NAME: {"sync": {"mos", "ci95": [lo, hi], "n", "std"}, "realism": {...}, "naturalness": {...},
                        "languages": {LANG: {CRITERION: {...}}}, "rater_languages": {LANG: {CRITERION: {...}}},
                        "mean_of_criteria", "n_ratings", "n_raters", "n_clips", "reference", "checkpoint_sha256"}},
     "raters": N, "raters_invited": R, "ratings": K,
     "agreement": {"method", "sync": {"alpha", "alpha_interval", "units", "values"}, ...}, "method": {...}}
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from evaluation.mos.db import RatingStore
from evaluation.mos.study import Study

CRITERIA = (
    "sync",
    "realism",
    "naturalness",
)  # a study may add "emotion" (report.py's MOS_CRITERIA has all four)
RESULTS_FILE = "mos_results.json"
METHOD = {
    "mos": "mean of the 1-5 ratings of the cell",
    "ci95": "mean +- t.ppf(0.975, n-1) * s / sqrt(n), s = sample std (ddof 1); null for n < 2",
    "agreement": "Krippendorff's alpha per criterion, units = clips, coders = raters, missing allowed; "
    "alpha = ordinal metric, alpha_interval = interval metric",
}


def _round(x: float) -> float:
    return round(float(x), 6)


def mos(values: Sequence[float]) -> dict[str, Any]:
    """{"mos", "ci95": [lo, hi] | None, "n", "std"} of one cell's ratings (n >= 1)."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    mean = float(x.mean())
    if n < 2:
        return {"mos": _round(mean), "ci95": None, "n": n, "std": None}
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    return {
        "mos": _round(mean),
        "ci95": [_round(mean - half), _round(mean + half)],
        "n": n,
        "std": _round(std),
    }


def krippendorff_alpha(units: Iterable[Sequence[float]], level: str = "ordinal") -> float | None:
    """Krippendorff's alpha of reliability data given as the values each unit received (any coders).

    Computed by the `krippendorff` package from each unit's value counts; units with fewer than two values
    are not pairable and are dropped. level: "ordinal" or "interval". None when undefined: no pairable
    unit, or no variation among the values.
    """
    import krippendorff

    if level not in ("ordinal", "interval"):
        raise ValueError(f"unknown level {level!r}")
    pairable = [list(u) for u in units if len(u) >= 2]
    domain = sorted({v for u in pairable for v in u})
    if not pairable or len(domain) < 2:
        return None
    counts = np.array([[unit.count(v) for v in domain] for unit in pairable], dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):  # no disagreement expected: 0/0, undefined
        alpha = krippendorff.alpha(value_counts=counts, value_domain=domain, level_of_measurement=level)
    return float(alpha) if np.isfinite(alpha) else None


def _cells(rows: list[dict[str, Any]], criteria: Sequence[str]) -> dict[str, Any]:
    return {c: mos([r[c] for r in rows]) for c in criteria} if rows else {}


def compute(study_dir: str | Path) -> dict[str, Any]:
    """The results document of a study (see the module doc)."""
    study = Study(study_dir)
    criteria = [c for c in CRITERIA if c in study.criteria] + [c for c in study.criteria if c not in CRITERIA]
    ratings = RatingStore(study.db_path, study.study_id, study.criteria).ratings()
    rows = []
    for rating in ratings:
        stimulus = study.stimuli.get(rating["clip"])
        if stimulus is not None:
            rows.append({**rating, "system": stimulus["system"], "language": stimulus["language"]})

    systems: dict[str, Any] = {}
    for name, info in study.doc["systems"].items():
        mine = [r for r in rows if r["system"] == name]
        by_lang: dict[str, list] = defaultdict(list)
        by_rater_lang: dict[str, list] = defaultdict(list)
        for r in mine:
            by_lang[r["language"]].append(r)
            by_rater_lang[r["rater_language"] or "unspecified"].append(r)
        cells = _cells(mine, criteria)
        systems[name] = {
            **cells,
            "languages": {lang: _cells(v, criteria) for lang, v in sorted(by_lang.items())},
            "rater_languages": {lang: _cells(v, criteria) for lang, v in sorted(by_rater_lang.items())},
            "mean_of_criteria": _round(np.mean([cells[c]["mos"] for c in criteria])) if cells else None,
            "n_ratings": len(mine),
            "n_raters": len({r["rater"] for r in mine}),
            "n_clips": len({r["clip"] for r in mine}),
            "reference": bool(info.get("reference")),
            "checkpoint_sha256": info.get("checkpoint_sha256", []),
        }

    agreement: dict[str, Any] = {"method": "krippendorff_alpha_ordinal"}
    for criterion in criteria:
        units: dict[str, list[float]] = defaultdict(list)
        for r in rows:
            units[r["clip"]].append(r[criterion])
        ordinal = krippendorff_alpha(units.values(), "ordinal")
        interval = krippendorff_alpha(units.values(), "interval")
        pairable = [u for u in units.values() if len(u) >= 2]
        agreement[criterion] = {
            "alpha": None if ordinal is None else _round(ordinal),
            "alpha_interval": None if interval is None else _round(interval),
            "units": len(pairable),
            "values": sum(len(u) for u in pairable),
        }
    return {
        "study_id": study.study_id,
        "generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "scale": [1, 5],
        "criteria": criteria,
        "systems": systems,
        "raters": len({r["rater"] for r in rows}),
        "raters_invited": len(study.raters),
        "ratings": len(rows),
        "agreement": agreement,
        "method": METHOD,
    }


def run(study_dir: str, print_json: bool = True) -> dict[str, Any]:
    """Compute, write STUDY_DIR/mos_results.json atomically, print it (pretty) on stdout if asked."""
    doc = compute(study_dir)
    path = Path(study_dir) / RESULTS_FILE
    tmp = path.with_name(path.name + ".tmp")
    text = json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    if print_json:
        sys.stdout.write(text)
    return {**doc, "path": str(path)}
