"""What `lipsync score` scores: the rows of a directory of videos, a corpus manifest or generation's
outputs.parquet, with their sources and references resolved."""

from __future__ import annotations

import json
import os
import posixpath
from typing import Any

import fsspec
import pandas as pd

from core.errors import BadInput
from core.manifest import MANIFEST_EXTENSIONS, read_table
from core.storage import is_remote, join_uri, manifest_path, manifest_text
from evaluation import baseline
from evaluation.score_config import OK_STATUSES
from pipeline.corpus import VIDEO_EXTENSIONS, discover, input_id


def _manifest_of(source: str) -> str | None:
    """The manifest behind INPUT: the file itself, or one inside a corpus directory; None for a plain dir."""
    if source.lower().endswith(MANIFEST_EXTENSIONS):
        return source
    fs, path = fsspec.core.url_to_fs(source)
    for ext in MANIFEST_EXTENSIONS:
        for name in ("manifest", "outputs"):
            if fs.exists(f"{path.rstrip('/')}/{name}{ext}"):
                return f"{source.rstrip('/')}/{name}{ext}"
    return None


def _base_of(uri: str) -> str:
    return posixpath.dirname(uri) if is_remote(uri) else os.path.dirname(os.path.abspath(uri))


def _input_row(record: dict[str, Any], base: str, system: str) -> dict[str, Any]:
    """One video to score from a manifest record (paths resolved against the manifest's directory)."""
    video, path_of = (
        manifest_path(base, record.get("video")),
        lambda key: manifest_path(base, record.get(key)),
    )
    return {
        "id": manifest_text(record.get("id")) or input_id(video or json.dumps(record, default=str)),
        "video": video,
        "audio": path_of("audio"),
        "language": manifest_text(record.get("language")) or "und",
        "speaker": manifest_text(record.get("speaker")),
        "emotion": manifest_text(record.get("emotion")),
        "system": manifest_text(record.get("system")) or system,
        "split": manifest_text(record.get("split")),
        "transcript": manifest_text(record.get("transcript")),
        "timeline": path_of("timeline"),
        "phonemes": manifest_text(record.get("phonemes")),
        "source": path_of("source"),
        "reference": path_of("reference"),
        "input_status": manifest_text(record.get("status")).lower(),
        "input_reason": manifest_text(record.get("reason")),
        "injected_offset_frames": manifest_text(record.get("injected_offset_frames")),
    }


def _generation_records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Generation's outputs table: `output` is the video to score, its `video` the source face."""
    records = []
    for record in frame.to_dict(orient="records"):
        record = dict(record)
        if "video" in record and not manifest_text(record.get("source")):
            record["source"] = record["video"]
        record["video"] = record.pop("output")  # "" for a pair generation failed: kept as skipped
        record.pop("audio", None)  # the driving audio: the output carries its own, as it was muxed
        records.append(record)
    return records


def _default_system(source: str, manifest: str | None) -> str:
    """The input's name: its directory for a manifest or a video file, else the directory itself."""
    target = manifest if manifest else source
    if target.lower().endswith((*MANIFEST_EXTENSIONS, *VIDEO_EXTENSIONS)):
        target = posixpath.dirname(target.rstrip("/")) or os.path.dirname(os.path.abspath(target))
    return posixpath.basename(target.rstrip("/")) or "default"


def discover_inputs(source: str, system: str = "") -> list[dict[str, Any]]:
    """Videos to score from a directory, a corpus manifest or generation's outputs table."""
    manifest = _manifest_of(source)
    system = system or _default_system(source, manifest)
    if manifest is None:  # a plain directory (or one video): the pipeline's scan
        base, records = source, discover(source)
    else:
        try:
            frame = read_table(manifest)
        except FileNotFoundError as exc:
            raise BadInput(f"manifest {manifest} does not exist") from exc
        except (ValueError, pd.errors.ParserError) as exc:
            raise BadInput(f"manifest {manifest} cannot be read: {exc}") from exc
        base = _base_of(manifest)
        if "output" in frame.columns:
            records = _generation_records(frame)
        elif "video" in frame.columns:
            records = frame.to_dict(orient="records")
        else:
            raise BadInput(f"manifest {manifest} has neither a 'video' nor an 'output' column")
    keep = [
        r
        for r in records
        if manifest_text(r.get("video")) or manifest_text(r.get("status")).lower() not in OK_STATUSES
    ]
    rows = [_input_row(r, base, system) for r in keep]
    if not rows:
        raise BadInput(f"input {source} holds no videos to score")
    return rows


def baseline_inputs(source: str, out: str) -> list[dict[str, Any]]:
    """The "do nothing" videos of a generation outputs table, muxed into OUT/baseline/ (evaluation.baseline)."""
    manifest = _manifest_of(source)
    if manifest is None:
        return []
    frame = read_table(manifest)
    if "output" not in frame.columns or "video" not in frame.columns or "audio" not in frame.columns:
        return []
    base = _base_of(manifest)
    return [
        _input_row(r, base, baseline.BASELINE_SYSTEM) for r in baseline.baseline_records(frame, base, out)
    ]


def attach_references(rows: list[dict[str, Any]], manifest: str) -> None:
    """Fill `reference` from a manifest with a `reference` column keyed by `id` or by `video`."""
    try:
        frame = read_table(manifest)
    except FileNotFoundError as exc:
        raise BadInput(f"reference manifest {manifest} does not exist") from exc
    if "reference" not in frame.columns or not ({"id", "video"} & set(frame.columns)):
        raise BadInput(
            f"reference manifest {manifest} needs a 'reference' column and an 'id' or 'video' column"
        )
    base = _base_of(manifest)
    by_key: dict[str, str] = {}
    for record in frame.to_dict(orient="records"):
        ref = join_uri(base, manifest_text(record["reference"]))
        if manifest_text(record.get("id")):
            by_key[manifest_text(record["id"])] = ref
        if manifest_text(record.get("video")):
            video = manifest_text(record["video"])
            by_key[join_uri(base, video)] = ref
            by_key[posixpath.basename(video)] = ref
    for row in rows:
        ref = (
            by_key.get(row["id"]) or by_key.get(row["video"]) or by_key.get(posixpath.basename(row["video"]))
        )
        if ref:
            row["reference"] = ref
