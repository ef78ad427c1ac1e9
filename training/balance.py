"""How many windows each training clip gives: balanced by language (or speaker, accent, emotion) to a
configured mix, and up-weighted where a `lipsync select` manifest points at clips that scored worst.

A clip's weight multiplies its `windows_per_clip`; weights average 1 over the train clips, so a run's
number of windows (and its passes, steps per epoch) stays what it was and only the mix changes.

    balance: {language: uniform}             # each language the same share of windows
    balance: {language: {en: 0.5, hi: 0.5}}  # these shares (languages not named: none)
    balance_strength: 0.5                    # halfway (geometrically) from the corpus's mix to the configured one
    focus: {manifest: select_out/manifest.csv, weight: 4.0}

With several keys, each is balanced within what the previous ones gave (the last one exactly).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pandas as pd

from core.errors import BadInput

BALANCE_KEYS = ("language", "speaker", "accent", "emotion")


@dataclass(frozen=True)
class FocusConfig:
    """Up-weight the clips behind a `lipsync select` manifest (its `video` column: the clips' sources)."""

    manifest: str | None = None
    weight: float = 4.0


def check_balance(balance: dict[str, Any], strength: float, focus: FocusConfig) -> None:
    """BadInput for a mix that cannot be applied."""
    for key, target in balance.items():
        if key not in BALANCE_KEYS:
            raise BadInput(f"balance: unknown key {key!r}; known: {', '.join(BALANCE_KEYS)}")
        if target != "uniform" and not (
            isinstance(target, dict) and target and all(float(v) >= 0 for v in target.values())
        ):
            raise BadInput(f"balance.{key}: 'uniform' or a mapping of {key} -> share >= 0, not {target!r}")
    if not 0 <= strength <= 1:
        raise BadInput(f"balance_strength must be in [0, 1], not {strength}")
    if focus.weight <= 0:
        raise BadInput(f"focus.weight must be > 0, not {focus.weight}")


def clip_weights(
    clips: pd.DataFrame, balance: dict[str, Any], strength: float = 1.0, focus: FocusConfig | None = None
) -> pd.Series:
    """Per-clip window multipliers (index: clip_id), mean 1 over `clips`."""
    weights = pd.Series(1.0, index=clips["clip_id"].to_numpy())
    for key, target in balance.items():
        if key not in clips:
            raise BadInput(f"balance.{key}: clips.parquet has no {key!r} column")
        groups = clips[key].fillna("").astype(str).to_numpy()
        weights *= _rebalance(weights.to_numpy(), groups, target) ** strength
    if focus is not None and focus.manifest:
        weights[clips["source"].isin(focus_sources(focus.manifest)).to_numpy()] *= focus.weight
    total = weights.sum()
    if total <= 0:
        raise BadInput(f"balance {balance} leaves no training windows (no clip in a group with a share > 0)")
    return weights * (len(weights) / total)


def _rebalance(weights: np.ndarray, groups: np.ndarray, target: Any) -> np.ndarray:
    """Factors that bring each group's share of `weights` to its target share."""
    names = sorted(set(groups))
    have = {g: weights[groups == g].sum() / weights.sum() for g in names}
    want = {g: 1.0 / len(names) for g in names} if target == "uniform" else _shares(target, names)
    return np.array([want[g] / have[g] if have[g] > 0 else 0.0 for g in groups])


def _shares(target: dict[str, Any], names: list[str]) -> dict[str, float]:
    """Configured shares of the groups present, normalised over them (groups not named get 0)."""
    raw = {g: float(target.get(g, 0.0)) for g in names}
    total = sum(raw.values())
    if total <= 0:
        raise BadInput(f"balance {target}: none of the corpus's groups ({', '.join(names)}) has a share > 0")
    return {g: v / total for g, v in raw.items()}


def focus_sources(manifest: str) -> set[str]:
    """The source videos a `lipsync select` manifest lists (its `video` column)."""
    fs, path = fsspec.core.url_to_fs(manifest)
    if not fs.exists(path):
        raise BadInput(f"focus manifest {manifest} does not exist")
    with fsspec.open(manifest, "r") as fh:
        table = pd.read_csv(fh)
    if "video" not in table:
        raise BadInput(f"focus manifest {manifest} has no `video` column")
    return set(table["video"].astype(str))


def window_counts(weights: np.ndarray, per_clip: int, rng: np.random.Generator) -> np.ndarray:
    """Windows per clip: `per_clip` x weight, rounded up or down at random so the expectation is exact."""
    expected = np.asarray(weights, float) * per_clip
    floor = np.floor(expected)
    return (floor + (rng.random(len(expected)) < expected - floor)).astype(int)


def mix_card(
    clips: pd.DataFrame, weights: pd.Series, keys: tuple[str, ...] = ("language",)
) -> dict[str, Any]:
    """Per group of each key: clips, and share of windows before and after the weights (the run's data card)."""
    card: dict[str, Any] = {}
    w = weights.reindex(clips["clip_id"]).to_numpy()
    for key in keys:
        if key not in clips:
            continue
        groups = clips[key].fillna("").astype(str).to_numpy()
        card[key] = {
            g: {
                "clips": int((groups == g).sum()),
                "corpus_share": round(float((groups == g).mean()), 4),
                "window_share": round(float(w[groups == g].sum() / w.sum()), 4),
            }
            for g in sorted(set(groups))
        }
    return card
