"""ffmpeg and ffprobe as processes: which executable, the one error type of media work, running a
graph, reading a pipe, and the URI ↔ local path helpers every reader and writer uses."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import ffmpeg
import fsspec

from core.errors import BadInput

_LOG_ARGS = ("-hide_banner", "-nostdin", "-loglevel", "error")


TOOL_KILLED = "tool_killed"


@functools.cache
def ffmpeg_executable() -> str:
    """The ffmpeg every call runs: $LIPSYNC_FFMPEG when set (forwarded to Ray workers), else the static
    build that the imageio-ffmpeg package ships, else `ffmpeg` on PATH.

    Preprocessing runs two ffmpeg per input. Debian's ffmpeg links ~215 shared libraries with BIND_NOW:
    `ffmpeg -version` costs ~60 ms of CPU, most of it in the dynamic loader, so two starts were ~120 of
    the ~370 ms a 4 s clip cost besides FaceMesh. The static build (imageio-ffmpeg 0.8.1: ffmpeg 9.0.2)
    starts in ~10 ms, and is the same build on every node.
    """
    chosen = os.environ.get("LIPSYNC_FFMPEG")
    if chosen:
        return chosen
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError):  # no package, or a platform it ships no binary for
        return "ffmpeg"


class MediaError(BadInput):
    """A media file that cannot be used; `reason` is a short code for reject rows.

    Reasons: "not_found", "unreadable", "no_video_stream", "no_audio_stream", "too_short",
    "truncated", "decode_failed", "encode_failed", and TOOL_KILLED: ffmpeg/ffprobe died from a signal
    (OOM killer, a job being torn down), which says nothing about the file, so callers may retry.
    Subclasses `BadInput`, so the CLI exits with code 2.
    """

    def __init__(self, reason: str, uri: str | os.PathLike, detail: str = "") -> None:
        self.reason = reason
        self.uri = str(uri)
        self.detail = detail.strip()
        message = f"{self.uri}: {reason}"
        if self.detail:
            message += f" ({self.detail})"
        super().__init__(message)

    def __reduce__(self):  # pickles across Ray workers with its fields, not just the message
        return (type(self), (self.reason, self.uri, self.detail))


def _is_local(uri: str) -> bool:
    protocol, _ = fsspec.core.split_protocol(uri)
    return protocol in (None, "file", "local")


def _strip_file_scheme(uri: str) -> str:
    return fsspec.core.split_protocol(uri)[1] if uri.startswith(("file://", "local://")) else uri


@contextlib.contextmanager
def local_path(uri: str | os.PathLike) -> Iterator[str]:
    """Yield a local filesystem path for `uri`; remote files are copied to a temp file, removed after."""
    uri = str(uri)
    if _is_local(uri):
        path = _strip_file_scheme(uri)
        if not os.path.exists(path):
            raise MediaError("not_found", uri)
        yield path
        return
    tmpdir = tempfile.mkdtemp(prefix="lipsync-media-")
    try:
        local = os.path.join(tmpdir, "input" + Path(fsspec.core.split_protocol(uri)[1]).suffix)
        try:
            with fsspec.open(uri, "rb") as src, open(local, "wb") as dst:
                shutil.copyfileobj(src, dst, length=8 * 1024 * 1024)
        except FileNotFoundError as exc:
            raise MediaError("not_found", uri) from exc
        yield local
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


@contextlib.contextmanager
def _output_path(uri: str | os.PathLike) -> Iterator[str]:
    """Yield a local path to write; removed on failure, uploaded on success for remote URIs."""
    uri = str(uri)
    if _is_local(uri):
        path = _strip_file_scheme(uri)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        try:
            yield path
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)  # never leave a half-written file behind
            raise
        return
    tmpdir = tempfile.mkdtemp(prefix="lipsync-media-")
    try:
        local = os.path.join(tmpdir, "output" + Path(fsspec.core.split_protocol(uri)[1]).suffix)
        yield local
        with open(local, "rb") as src, fsspec.open(uri, "wb") as dst:
            shutil.copyfileobj(src, dst, length=8 * 1024 * 1024)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _stderr_reason(stderr: bytes | str | None) -> str:
    """The last two distinct lines of ffmpeg's stderr, without the "[demuxer @ 0x...]" prefixes."""
    text = stderr.decode(errors="replace") if isinstance(stderr, bytes) else (stderr or "")
    lines: list[str] = []
    for line in text.strip().splitlines():
        line = re.sub(r"^\[[^\]]* @ 0x[0-9a-f]+\]\s*", "", line.strip())
        if line and line not in lines:
            lines.append(line)
    return "; ".join(lines[-2:]) if lines else "ffmpeg failed"


def check_exit(code: int, tool: str, uri: str, stderr: bytes | str | None, reason: str) -> None:
    """MediaError(`reason`) for a tool that failed on the file; MediaError(TOOL_KILLED) for one that was
    killed by a signal (negative exit code), whose failure is not the file's."""
    if code < 0:
        raise MediaError(TOOL_KILLED, uri, f"{tool} killed by signal {-code}; the file itself was not judged")
    if code:
        raise MediaError(reason, uri, _stderr_reason(stderr))


def run_ffmpeg(stream_spec, uri: str, reason: str, stdin: bytes | memoryview | None = None) -> bytes:
    """Run an ffmpeg-python graph to the end, quietly; its stdout. Failures as `check_exit` says."""
    args = ffmpeg.compile(stream_spec, cmd=ffmpeg_executable())
    done = subprocess.run([args[0], *_LOG_ARGS, *args[1:]], input=stdin, capture_output=True)
    check_exit(done.returncode, "ffmpeg", uri, done.stderr, reason)
    return done.stdout


class FfmpegProcess:
    """A running ffmpeg whose stderr is drained by a thread (a full stderr pipe would deadlock it)."""

    def __init__(self, stream_spec, pipe_stdin: bool = False, pipe_stdout: bool = False) -> None:
        args = ffmpeg.compile(stream_spec, cmd=ffmpeg_executable())
        cmd = [args[0], *_LOG_ARGS, *args[1:]]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE if pipe_stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipe_stdout else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._stderr = bytearray()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for block in iter(lambda: self.proc.stderr.read(65536), b""):
            self._stderr += block
            del self._stderr[:-65536]  # keep the tail only

    @property
    def stderr(self) -> str:
        return self._stderr.decode(errors="replace").strip()

    def wait(self) -> int:
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None and not pipe.closed:
                pipe.close()
        code = self.proc.wait()
        self._thread.join()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait()


def read_exact(stream, buffer: memoryview) -> int:
    """Fill `buffer` from a pipe; returns the number of bytes read (short only at EOF)."""
    filled = 0
    while filled < len(buffer):
        n = stream.readinto(buffer[filled:])
        if not n:
            break
        filled += n
    return filled


@lru_cache(maxsize=1)
def ffmpeg_filters() -> frozenset[str]:
    """Names of the filters this ffmpeg build has."""
    done = subprocess.run([ffmpeg_executable(), "-hide_banner", "-filters"], capture_output=True, text=True)
    names = set()
    for line in done.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and "->" in parts[2]:
            names.add(parts[1])
    return frozenset(names)
