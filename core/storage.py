"""One output location (local directory or `s3://` prefix) behind fsspec, with atomic writes."""

from __future__ import annotations

import io
import json
import os
import posixpath
import uuid
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq


def read_parquet(fh: Any, columns: list[str] | None = None) -> pa.Table:
    """A Parquet table from an open (fsspec) file, its bytes first copied into memory Arrow owns.

    Arrow's dataset reader lets go of its input on a pool thread, after `read_table` has returned. When that
    input is a Python object (the file, or the bytes `fh.read()` gave), the release needs the GIL; at
    interpreter exit that thread is killed mid-destructor and the process aborts ("terminate called without
    an active exception", exit 134 after the command's own exit code was decided). A core dump of a `lipsync
    select` refusal showed exactly that (`arrow::py::PyBuffer::~PyBuffer` -> `PyGILState_Ensure` ->
    `pthread_exit`). An Arrow-owned copy has no Python object for that thread to release.
    """
    sink = pa.BufferOutputStream()
    sink.write(fh.read())
    return pq.read_table(pa.BufferReader(sink.getvalue()), columns=columns)


def is_remote(uri: str) -> bool:
    """True for URIs with a non-file scheme (s3://, gs://, memory://, ...)."""
    return "://" in uri and not uri.startswith("file://")


def join_uri(base: str, relative: str) -> str:
    """`relative` resolved against directory `base` (absolute paths and URIs are returned as they are)."""
    if is_remote(relative) or relative.startswith("/"):
        return relative
    if is_remote(base):
        scheme, rest = base.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(rest, relative))}"
    return os.path.normpath(os.path.join(base, relative))


def manifest_text(value: Any) -> str:
    """A manifest cell as text: "" for a missing value (None, or NaN from pandas), else stripped."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return str(value).strip()


def manifest_path(base: str, value: Any) -> str:
    """A manifest cell as a path resolved against the manifest's directory `base` ("" stays "")."""
    text = manifest_text(value)
    return join_uri(base, text) if text else ""


class Store:
    """Files under one root. Writes are atomic: a reader sees the old file, the new one, or none."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")
        self.fs, self.base = fsspec.core.url_to_fs(self.root)

    def uri(self, relative: str) -> str:
        """Full URI of a path under the root."""
        return f"{self.root}/{relative}"

    def path(self, relative: str) -> str:
        """Filesystem path (no scheme) of a path under the root, for self.fs calls."""
        return f"{self.base}/{relative}"

    def exists(self, relative: str) -> bool:
        self.fs.invalidate_cache(self.path(relative))
        return self.fs.exists(self.path(relative))

    def makedirs(self, relative: str = "") -> None:
        self.fs.makedirs(self.path(relative) if relative else self.base, exist_ok=True)

    def listdir(self, relative: str, suffix: str = "") -> list[str]:
        """Names (not paths) of files directly under `relative` ending with `suffix`; [] if absent.

        Always a fresh listing: s3fs caches listings per process, so files that Ray workers wrote
        since this process last listed (completion records on resume) would otherwise be missed.
        """
        self.fs.invalidate_cache(self.path(relative))
        try:
            entries = self.fs.ls(self.path(relative), detail=False)
        except FileNotFoundError:
            return []
        names = [posixpath.basename(e.rstrip("/")) for e in entries]
        return sorted(n for n in names if n.endswith(suffix) and not n.startswith("."))

    def write_bytes(self, relative: str, data: bytes) -> None:
        """Atomic write: a temp file then a rename (local); a single PUT is already atomic on object stores."""
        target = self.path(relative)
        self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
        if is_remote(self.root):
            self.fs.pipe_file(target, data)
            return
        tmp = f"{posixpath.dirname(target)}/.{posixpath.basename(target)}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)

    def read_bytes(self, relative: str) -> bytes:
        return self.fs.cat_file(self.path(relative))

    def write_json(self, relative: str, obj: Any) -> None:
        self.write_bytes(relative, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())

    def read_json(self, relative: str) -> Any:
        return json.loads(self.read_bytes(relative))

    def write_table(self, relative: str, table: pa.Table) -> None:
        """A Parquet file written atomically (zstd)."""
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        self.write_bytes(relative, buf.getvalue())

    def read_table(self, relative: str, columns: list[str] | None = None) -> pa.Table:
        with self.fs.open(self.path(relative), "rb") as fh:
            return read_parquet(fh, columns)

    def remove(self, relative: str) -> None:
        if self.exists(relative):
            self.fs.rm(self.path(relative), recursive=True)
