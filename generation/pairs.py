"""The (video, audio) pairs a generation run makes: read from a manifest, one id per pair."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import PurePosixPath

import fsspec

from core.errors import BadInput
from core.manifest import read_table
from core.storage import is_remote, manifest_path, manifest_text


def _pair_id(video: str, audio: str) -> str:
    digest = hashlib.sha1(f"{video}\n{audio}".encode()).hexdigest()[:8]
    return f"{PurePosixPath(video).stem}-{digest}"


PASSED_THROUGH = ("system", "transcript")
"""Optional pair columns copied to outputs.parquet for `lipsync score` (with `timeline`, made absolute)."""


PAIR_COLUMNS = ("id", "video", "audio", "language", "speaker", *PASSED_THROUGH, "timeline")


def read_pairs(manifest: str) -> list[dict[str, str]]:
    """Pairs of a CSV/JSONL/Parquet manifest: id, video, audio, language, speaker (paths made absolute),
    and the optional system, transcript and timeline (phoneme-timeline JSON) that scoring reads.

    `audio` may be empty (the video's own track is used); `id` defaults to the video's stem plus a hash
    of the pair and is made file-name safe. Duplicate ids are bad input.
    """
    fs, path = fsspec.core.url_to_fs(manifest)
    if not fs.exists(path):
        raise BadInput(f"pairs manifest {manifest} does not exist")
    frame = read_table(manifest)
    if "video" not in frame.columns:
        raise BadInput(f"pairs manifest {manifest} has no 'video' column")
    base = manifest.rsplit("/", 1)[0] if is_remote(manifest) else os.path.dirname(os.path.abspath(manifest))
    pairs, seen = [], set()
    for record in frame.to_dict(orient="records"):
        video = manifest_path(base, record.get("video"))
        if not video:
            continue
        audio = manifest_path(base, record.get("audio"))
        pair_id = re.sub(r"[^A-Za-z0-9._-]+", "_", manifest_text(record.get("id")) or _pair_id(video, audio))
        if pair_id in seen:
            raise BadInput(f"pairs manifest {manifest}: duplicate id {pair_id!r}")
        seen.add(pair_id)
        language = manifest_text(record.get("language")) or "und"
        pairs.append(
            {
                "id": pair_id,
                "video": video,
                "audio": audio,
                "language": language,
                "speaker": manifest_text(record.get("speaker")),
                **{key: manifest_text(record.get(key)) for key in PASSED_THROUGH},
                "timeline": manifest_path(base, record.get("timeline")),
            }
        )
    if not pairs:
        raise BadInput(f"pairs manifest {manifest} lists no pairs")
    return pairs
