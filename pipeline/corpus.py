"""Corpus inputs: a directory (local or s3://) scanned recursively, or a manifest (CSV, JSONL, Parquet).

Every input becomes one dict with DESIGN.md's manifest columns, an absolute `video` URI and a stable
`input_id`: a hash of the video's path *within the corpus* (relative to the scanned directory or to the
manifest's folder; the whole URI only for a video outside it), so the same corpus gets the same ids wherever
it lies (another output folder, a copy on S3) and a seeded training on it draws the same windows. Extra
manifest columns are kept as a JSON string in `extra`.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from typing import Any

import fsspec
import pandas as pd

from core.errors import BadInput
from core.manifest import MANIFEST_EXTENSIONS, read_table
from core.storage import is_remote, join_uri

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".ts")
OPTIONAL_COLUMNS = ("audio", "language", "speaker", "transcript", "accent", "emotion", "split")


def input_id(key: str) -> str:
    """Stable id of a source file: a hash of its key (its path within the corpus, or a URI)."""
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def corpus_key(video: str, base: str) -> str:
    """`video`'s path relative to the corpus folder `base` when it lies under it, else the whole URI."""
    prefix = base.rstrip("/") + "/"
    return video[len(prefix) :] if video.startswith(prefix) else video


def _row(video: str, key: str, **fields: Any) -> dict[str, Any]:
    row = {"video": video, "input_id": input_id(key), "extra": "{}"}
    for col in OPTIONAL_COLUMNS:
        value = fields.get(col)
        row[col] = "" if value is None or (isinstance(value, float) and pd.isna(value)) else str(value)
    row["language"] = row["language"] or "und"
    return row


def _scan_directory(root: str) -> list[dict[str, Any]]:
    fs, base = fsspec.core.url_to_fs(root)
    prefix = root.split("://", 1)[0] + "://" if is_remote(root) else ""
    rows = []
    for path in sorted(fs.find(base)):
        if not path.lower().endswith(VIDEO_EXTENSIONS):
            continue
        relative = posixpath.relpath(path, base)
        parts = relative.split("/")
        language, speaker = (parts[-3], parts[-2]) if len(parts) >= 3 else ("und", "")
        rows.append(_row(prefix + path if prefix else path, relative, language=language, speaker=speaker))
    return rows


def _from_manifest(uri: str) -> list[dict[str, Any]]:
    frame = read_table(uri)
    if "video" not in frame.columns:
        raise BadInput(
            f"manifest {uri} has no 'video' column (columns: {', '.join(map(str, frame.columns))})"
        )
    base = posixpath.dirname(uri) if is_remote(uri) else str(fsspec.core.url_to_fs(uri)[1]).rsplit("/", 1)[0]
    known = {"video", *OPTIONAL_COLUMNS}
    rows = []
    for record in frame.to_dict(orient="records"):
        video = str(record["video"]).strip()
        if not video:
            continue
        fields = {k: record.get(k) for k in OPTIONAL_COLUMNS}
        if fields.get("audio"):
            fields["audio"] = join_uri(base, str(fields["audio"]))
        uri = join_uri(base, video)
        row = _row(uri, corpus_key(uri, base), **fields)
        extra = {k: v for k, v in record.items() if k not in known and v is not None and v == v}
        row["extra"] = json.dumps(extra, sort_keys=True, default=str)
        rows.append(row)
    return rows


def discover(source: str) -> list[dict[str, Any]]:
    """Inputs of a corpus: a manifest file, or every video file under a directory / prefix."""
    fs, path = fsspec.core.url_to_fs(source)
    if source.lower().endswith(MANIFEST_EXTENSIONS):
        if not fs.exists(path):
            raise BadInput(f"manifest {source} does not exist")
        rows = _from_manifest(source)
    elif fs.isdir(path):
        inner = [
            m for m in (f"{path.rstrip('/')}/manifest{ext}" for ext in MANIFEST_EXTENSIONS) if fs.exists(m)
        ]
        if inner:  # a corpus directory that carries its own manifest (e.g. `lipsync synth` output)
            rows = _from_manifest(source.rstrip("/") + "/" + inner[0].rsplit("/", 1)[1])
        else:
            rows = _scan_directory(source)
    elif fs.exists(path) and source.lower().endswith(VIDEO_EXTENSIONS):
        rows = [_row(source, posixpath.basename(source))]
    else:
        raise BadInput(
            f"input {source} is neither a directory, a manifest (.csv/.jsonl/.parquet) nor a video"
        )
    if not rows:
        raise BadInput(f"input {source} holds no video files ({', '.join(VIDEO_EXTENSIONS)})")
    seen: set[str] = set()
    unique = []
    for row in rows:
        if row["input_id"] not in seen:
            seen.add(row["input_id"])
            unique.append(row)
    return unique
