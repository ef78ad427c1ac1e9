"""Per-language (and per-speaker) timing calibration for generation, written by scoring, read by generate.

The file is JSON::

    {
      "format": 1,
      "default_offset_frames": 0,
      "languages": {"en": {"offset_frames": 1, "measured_offset_frames": -1.0, "clips": 12}, ...},
      "speakers": {"en-spk00": {"offset_frames": 2}, ...},
      ... any other top-level keys (source, fps, notes) are kept as they are
    }

Only `offset_frames` (an int) is required in an entry; other keys (what scoring measured, how many clips)
are kept and ignored. `offset_frames` is added to every frame's mel window index at generation
(`pipeline.audio.mel_windows(offset_frames=...)`): with k > 0 the mouth of frame i is generated from the
audio of frame i + k, so it moves k frames *before* the sound. Lookup order: the speaker's entry, the
language's entry (exact, then its primary subtag: "en-US" -> "en"), then `default_offset_frames`.

Scoring measures the AV offset d of generated videos (DESIGN.md's sign: d > 0 means the audio lags the
mouth) and `calibration_from_offsets` turns the medians into entries with k_new = k_used - round(d).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np

from core.errors import BadInput

FORMAT = 1
_RESERVED = ("format", "default_offset_frames", "languages", "speakers")


@dataclass(frozen=True)
class Calibration:
    """Timing entries by language and by speaker; each entry is a dict with an int `offset_frames`."""

    languages: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    speakers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    default_offset_frames: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)  # other top-level keys, written back as they are

    def offset_for(self, language: str | None = None, speaker: str | None = None) -> int:
        """Mel-window offset in frames for a pair: speaker entry, language entry, primary subtag, default."""
        if speaker and speaker in self.speakers:
            return int(self.speakers[speaker]["offset_frames"])
        language = (language or "").strip()
        for key in (language, language.replace("_", "-").split("-")[0]):
            if key and key in self.languages:
                return int(self.languages[key]["offset_frames"])
        return int(self.default_offset_frames)

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (see the module docstring)."""
        return {
            **{k: v for k, v in self.extra.items() if k not in _RESERVED},
            "format": FORMAT,
            "default_offset_frames": int(self.default_offset_frames),
            "languages": {k: dict(v) for k, v in sorted(self.languages.items())},
            "speakers": {k: dict(v) for k, v in sorted(self.speakers.items())},
        }


def _entries(data: dict[str, Any], section: str, uri: str) -> dict[str, dict[str, Any]]:
    raw = data.get(section) or {}
    if not isinstance(raw, dict):
        raise BadInput(f"calibration {uri}: '{section}' must be an object")
    entries = {}
    for key, entry in raw.items():
        value = entry.get("offset_frames") if isinstance(entry, dict) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise BadInput(f"calibration {uri}: {section}.{key}.offset_frames must be an integer")
        entries[str(key)] = {**entry, "offset_frames": int(value)}
    return entries


def calibration_from_dict(data: Any, uri: str = "<dict>") -> Calibration:
    """Validate a parsed calibration document; BadInput naming the bad key."""
    if not isinstance(data, dict):
        raise BadInput(f"calibration {uri}: expected a JSON object")
    if data.get("format", FORMAT) != FORMAT:
        raise BadInput(f"calibration {uri}: format {data.get('format')!r}, expected {FORMAT}")
    default = data.get("default_offset_frames", 0)
    if isinstance(default, bool) or not isinstance(default, int):
        raise BadInput(f"calibration {uri}: default_offset_frames must be an integer")
    return Calibration(
        languages=_entries(data, "languages", uri),
        speakers=_entries(data, "speakers", uri),
        default_offset_frames=default,
        extra={k: v for k, v in data.items() if k not in _RESERVED},
    )


def load_calibration(uri: str | None) -> Calibration:
    """Read a calibration file (local path or fsspec URI); None gives the empty calibration (all zero)."""
    if not uri:
        return Calibration()
    try:
        with fsspec.open(uri, "r") as fh:
            data = json.load(fh)
    except FileNotFoundError as exc:
        raise BadInput(f"calibration {uri} does not exist") from exc
    except json.JSONDecodeError as exc:
        raise BadInput(f"calibration {uri} is not valid JSON: {exc}") from exc
    return calibration_from_dict(data, uri)


def save_calibration(uri: str, calibration: Calibration | Mapping[str, Any]) -> str:
    """Write a calibration (or a document dict, validated first) as JSON to a path or URI; returns the URI."""
    if not isinstance(calibration, Calibration):
        calibration = calibration_from_dict(dict(calibration), uri)
    with fsspec.open(uri, "w") as fh:
        json.dump(calibration.to_dict(), fh, indent=1, sort_keys=True, default=str)
    return uri


def _fit(measured: Mapping[str, Sequence[float]], used: Mapping[str, int], min_clips: int) -> dict[str, Any]:
    entries = {}
    for key, values in sorted(measured.items()):
        values = [float(v) for v in values if v is not None and np.isfinite(v)]
        if len(values) < min_clips:
            continue
        median = float(np.median(values))
        entries[key] = {
            "offset_frames": int(used.get(key, 0) - round(median)),
            "measured_offset_frames": round(median, 3),
            "clips": len(values),
        }
    return entries


def calibration_from_offsets(
    by_language: Mapping[str, Sequence[float]],
    by_speaker: Mapping[str, Sequence[float]] | None = None,
    used: Calibration | None = None,
    min_clips: int = 3,
    extra: Mapping[str, Any] | None = None,
) -> Calibration:
    """Entries from AV offsets measured on generated videos (d > 0: audio lags), per language/speaker.

    `used` is the calibration the videos were generated with (default: all zero); each entry becomes
    k_used - round(median d). Keys with fewer than `min_clips` finite measurements are left out.
    """
    used = used or Calibration()
    languages = _fit(by_language, {k: used.offset_for(k) for k in by_language}, min_clips)
    speakers = _fit(by_speaker or {}, {k: used.offset_for(None, k) for k in by_speaker or {}}, min_clips)
    return Calibration(
        languages=languages,
        speakers=speakers,
        default_offset_frames=used.default_offset_frames,
        extra=dict(extra or {}),
    )
