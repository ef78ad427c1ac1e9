"""Chunk rows: what travels between the steps (one chunk of one pair per row), and failure rows."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pyarrow as pa

ROW_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("status", pa.string()),  # ok | failed
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("message", pa.string()),
        ("start", pa.int64()),  # first output frame of the chunk
        ("n_frames", pa.int64()),
        ("n_out", pa.int64()),  # output frames of the whole pair
        ("n_source", pa.int64()),  # source frames decoded so far (exact once the source ended)
        ("fps", pa.float64()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("mel_offset", pa.int64()),
        ("source", pa.string()),  # seekable video the composite stage re-reads frames from
        ("faces", pa.int64()),
        ("seconds", pa.float64()),  # compute time spent on this chunk so far
        ("crops", pa.binary()),  # packed arrays (np.save) ...
        ("mels", pa.binary()),
        ("boxes", pa.binary()),
        ("points", pa.binary()),
        ("source_index", pa.binary()),
        # per face crop, the position (among the chunk's crops) of the crop shown to the generator as reference
        ("references", pa.binary()),
        ("generated", pa.binary()),
        ("lips", pa.binary()),  # the output's lip shape per frame (pipeline.landmarks.lip_shape)
        ("part", pa.string()),  # the chunk's encoded file
    ]
)


_HEAVY = ("crops", "mels", "boxes", "points", "source_index", "references", "generated")


def pack(array: np.ndarray) -> bytes:
    """An array as .npy bytes (dtype and shape included)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def unpack(blob: bytes) -> np.ndarray:
    """The array `pack` stored."""
    return np.load(io.BytesIO(blob), allow_pickle=False)


def new_row(pair_id: str, **fields: Any) -> dict[str, Any]:
    """A chunk row with every ROW_SCHEMA column (empty defaults)."""
    row: dict[str, Any] = {}
    for f in ROW_SCHEMA:
        row[f.name] = (
            b""
            if f.type == pa.binary()
            else ""
            if f.type == pa.string()
            else 0.0
            if f.type == pa.float64()
            else 0
        )
    row.update(pair_id=pair_id, status="ok")
    row.update(fields)
    return row


def failure_row(pair_id: str, stage: str, reason: str, message: str) -> dict[str, Any]:
    """The row that marks a pair as failed."""
    return new_row(pair_id, status="failed", stage=stage, reason=reason, message=message)


def to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows as a pyarrow table with ROW_SCHEMA."""
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
