"""`core.storage.read_parquet`: a table read from an open file leaves no Python object in Arrow's hands.

Arrow's reader lets go of its input on a pool thread after `read_table` returns; a Python object released
there at interpreter exit aborted `lipsync select` (exit 134) in about 1 of 100 runs on CI.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from core.storage import read_parquet


class _File:
    """An open file whose `read()` hands out one bytes object we can count references to."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(self) -> bytes:
        return self.data


def test_read_parquet_keeps_no_reference_to_the_bytes_it_read(tmp_path: Path) -> None:
    table = pa.table({"id": [f"c{i}" for i in range(200)], "value": list(range(200))})
    pq.write_table(table, tmp_path / "t.parquet")
    source = _File((tmp_path / "t.parquet").read_bytes())
    before = sys.getrefcount(source.data)
    still_held = 0
    for _ in range(50):
        read = read_parquet(source, columns=["value"])
        still_held += sys.getrefcount(source.data) != before
    assert read.column("value").to_pylist() == list(range(200))
    assert still_held == 0, f"Arrow still held the Python bytes after {still_held} of 50 reads"


def test_read_parquet_reads_a_python_file_object(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    pq.write_table(pa.table({"a": [1, 2, 3]}), buffer)
    buffer.seek(0)
    assert read_parquet(buffer).column("a").to_pylist() == [1, 2, 3]
