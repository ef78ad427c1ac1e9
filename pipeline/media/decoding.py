"""Decoding: frames as RGB24 on a pipe (whole files, chunks read ahead, or an exact frame range by
seeking), and PCM audio from t=0."""

from __future__ import annotations

import os
import queue
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import ffmpeg
import numpy as np

from pipeline.media.encoding import _fraction
from pipeline.media.probing import ProbeInfo, _probe_local, ffprobe_json, probe
from pipeline.media.tools import (
    FfmpegProcess,
    MediaError,
    _stderr_reason,
    check_exit,
    local_path,
    read_exact,
    run_ffmpeg,
)

_TRUNCATION_RATIO = 0.9  # fewer decoded frames than this share of the expected count means truncated


def _output_size(info: ProbeInfo, size: tuple[int, int] | None) -> tuple[int, int]:
    """(width, height) of decoded frames; -1 in `size` keeps the aspect ratio."""
    if size is None:
        return info.width, info.height
    width, height = size
    if width <= 0 and height <= 0:
        raise ValueError(f"size needs at least one positive side, got {size}")
    if width <= 0:
        width = max(1, round(height * info.width / info.height))
    if height <= 0:
        height = max(1, round(width * info.height / info.width))
    return int(width), int(height)


def _frames_graph(path: str, info: ProbeInfo, fps: float | None, size: tuple[int, int]):
    stream = ffmpeg.input(path)[str(info.video_stream)]
    if fps is not None:
        stream = stream.filter("fps", fps=_fraction(fps), start_time=0)
    if size != (info.width, info.height):
        stream = stream.filter("scale", size[0], size[1], flags="bicubic")
    # passthrough: the fps filter alone decides which frames exist; never dup/drop after it
    return stream.output("pipe:", format="rawvideo", pix_fmt="rgb24", fps_mode="passthrough")


def _expected_frames(info: ProbeInfo, fps: float | None) -> float:
    return info.duration_s * fps if fps is not None else float(info.n_frames)


def _frame_chunks(
    path: str, info: ProbeInfo, fps: float | None, size: tuple[int, int], chunk: int
) -> Iterator[np.ndarray]:
    width, height = size
    frame_bytes = width * height * 3
    proc = FfmpegProcess(_frames_graph(path, info, fps, size), pipe_stdout=True)
    assert proc.proc.stdout is not None
    total, finished = 0, False
    try:
        while True:
            buffer = np.empty((chunk, height, width, 3), dtype=np.uint8)
            got = read_exact(proc.proc.stdout, memoryview(buffer).cast("B")) // frame_bytes
            if got:
                total += got
                yield buffer[:got]
            if got < chunk:
                break
        finished = True
    finally:
        if not finished:  # the consumer stopped early (or failed): do not leave ffmpeg running
            proc.kill()
    check_exit(proc.wait(), "ffmpeg", info.uri, proc.stderr, "decode_failed")
    expected = _expected_frames(info, fps)
    if total < _TRUNCATION_RATIO * expected - 2:
        detail = f"decoded {total} of ~{expected:.0f} frames; {_stderr_reason(proc.stderr)}"
        raise MediaError("truncated" if total else "decode_failed", info.uri, detail)


def iter_frames(
    path: str | os.PathLike,
    fps: float | None = None,
    chunk: int = 64,
    size: tuple[int, int] | None = None,
    info: ProbeInfo | None = None,
) -> Iterator[np.ndarray]:
    """Yield (T_chunk, H, W, 3) uint8 RGB chunks, read incrementally from one ffmpeg pipe.

    `fps` resamples to a constant rate (None keeps every decoded frame); `size` is (width, height)
    after rotation, -1 for one side keeps the aspect ratio. `info` is this file's own probe when the
    caller has one (saves an ffprobe run). Raises MediaError("truncated") at the end when far fewer
    frames decoded than the probe promised.
    """
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    uri = str(path)
    with local_path(uri) as local:
        info = info or _probe_local(local, uri, require_video=True)
        yield from _frame_chunks(local, info, fps, _output_size(info, size), chunk)


class ReadAhead:
    """Iterates `chunks` in a background thread, one item ahead of the consumer.

    For frame chunks from an ffmpeg pipe: the next chunk decodes (ffmpeg on another core, the pipe read
    without the GIL) while the caller works on the current one. The thread starts at construction, so
    decoding begins before the first `next()`; it never runs more than one item ahead (the caller's and
    the next one exist). Exceptions reach the consumer at the item where they happened. `close()` (or
    the `with` block's end) stops the thread and closes `chunks`, which kills a running ffmpeg.
    """

    _END = object()

    def __init__(self, chunks: Iterator) -> None:
        self._chunks = chunks
        self._results: queue.SimpleQueue = queue.SimpleQueue()
        self._wanted = threading.Semaphore(1)  # the first item is wanted at once
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._produce, name="read-ahead", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            while self._wanted.acquire() and not self._stop.is_set():
                try:
                    item = next(self._chunks)
                except StopIteration:
                    self._results.put((self._END, None))
                    return
                self._results.put((item, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer's thread
            self._results.put((None, exc))
        finally:
            close = getattr(self._chunks, "close", None)
            if close is not None:
                close()

    def __iter__(self) -> ReadAhead:
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        item, error = self._results.get()
        if error is not None or item is self._END:
            self._done = True
            if error is not None:
                raise error
            raise StopIteration
        self._wanted.release()  # start on the next one while the caller works on this
        return item

    def close(self) -> None:
        """Stop reading ahead and close the source (idempotent)."""
        self._done = True
        self._stop.set()
        self._wanted.release()
        self._thread.join()

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_frames(
    path: str | os.PathLike, fps: float | None = 25.0, size: tuple[int, int] | None = None
) -> np.ndarray:
    """Decode the whole video to a (T, H, W, 3) uint8 RGB array at a constant `fps` (None: source rate).

    Rotation is applied (ffmpeg autorotate); `size` is (width, height), -1 keeps the aspect ratio.
    """
    uri = str(path)
    with local_path(uri) as local:
        info = _probe_local(local, uri, require_video=True)
        width, height = _output_size(info, size)
        chunks = list(_frame_chunks(local, info, fps, (width, height), chunk=256))
    if not chunks:
        return np.empty((0, height, width, 3), dtype=np.uint8)
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)


def read_audio(
    path: str | os.PathLike, sample_rate: int = 16000, info: ProbeInfo | None = None
) -> np.ndarray:
    """Decode the first audio stream to float32 mono PCM in [-1, 1] at `sample_rate`.

    Channels are averaged in numpy (ffmpeg's own `-ac 1` sums at 1/sqrt(2) and can exceed 1).
    A stream that starts late is padded with silence so sample 0 is t=0 of the file. `info` is this
    file's own probe when the caller has one (saves an ffprobe run).
    """
    uri = str(path)
    with local_path(uri) as local:
        info = info or _probe_local(local, uri, require_video=False)
        if not info.has_audio:
            raise MediaError("no_audio_stream", uri)
        channels = info.audio_channels or 1
        graph = (
            ffmpeg.input(local)[str(info.audio_stream)]
            .filter("aresample", sample_rate, first_pts=0)
            .output("pipe:", format="f32le", acodec="pcm_f32le", ar=sample_rate, ac=channels)
        )
        proc = FfmpegProcess(graph, pipe_stdout=True)
        assert proc.proc.stdout is not None
        raw = proc.proc.stdout.read()
        check_exit(proc.wait(), "ffmpeg", uri, proc.stderr, "decode_failed")
    pcm = np.frombuffer(raw, dtype=np.float32)
    pcm = pcm[: len(pcm) // channels * channels].reshape(-1, channels).mean(axis=1)  # a new float32 array
    return np.clip(pcm, -1.0, 1.0, out=pcm)  # in place: a long input's PCM is not copied twice more


def shift_audio(pcm: np.ndarray, sample_rate: int, seconds: float) -> np.ndarray:
    """Shift PCM in time keeping its length: seconds > 0 delays (silence first), < 0 advances."""
    pcm = np.asarray(pcm)
    n = int(round(abs(seconds) * sample_rate))
    out = np.zeros_like(pcm)
    if n >= len(pcm):
        return out
    if seconds > 0:
        out[n:] = pcm[: len(pcm) - n]
    elif seconds < 0:
        out[: len(pcm) - n] = pcm[n:]
    else:
        out[:] = pcm
    return out


# Containers whose seeking lands on exact frames (checked against a full decode in the tests);
# anything else (MPEG-TS, raw streams, ...) is remuxed to Matroska once before chunked decoding.
SEEKABLE_FORMATS = ("mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm")


def container_format(path: str) -> str:
    """ffprobe's format_name of a local file ("mov,mp4,m4a,3gp,3g2,mj2", "mpegts", ...)."""
    return str(ffprobe_json(path, path).get("format", {}).get("format_name", ""))


def remux_video(path: str, info: ProbeInfo, out: str) -> str:
    """Copy the video stream of `path` into a Matroska file (no re-encoding) so it seeks exactly."""
    graph = ffmpeg.input(path)[str(info.video_stream)].output(out, c="copy", format="matroska")
    run_ffmpeg(graph.overwrite_output(), info.uri, "decode_failed")
    return out


def i420_size(width: int, height: int) -> tuple[int, int]:
    """(width, height) of a video in 4:2:0: both sides rounded down to even, like the encoder's crop."""
    return width - width % 2, height - height % 2


def _range_graph(
    path: str,
    start: int,
    stop: int | None,
    fps: float,
    size: tuple[int, int] | None,
    info: ProbeInfo,
    pix_fmt: str,
    lead_seconds: float = 1.0,
) -> tuple[Any, tuple[int, ...]]:
    """The ffmpeg graph of frames [start, stop) (stop None: to the end) and the shape of one frame."""
    width, height = size or (info.width, info.height)
    pre = max(0, start - int(round(lead_seconds * fps)))
    source = ffmpeg.input(path, ss=f"{pre / fps:.6f}") if pre else ffmpeg.input(path)
    stream = source[str(info.video_stream)].filter("fps", fps=_fraction(fps), start_time=0)
    if stop is None:
        stream = stream.trim(start_frame=start - pre)
    else:
        stream = stream.trim(start_frame=start - pre, end_frame=stop - pre)
    if (width, height) != (info.width, info.height):
        stream = stream.filter("scale", width, height, flags="bicubic")
    shape: tuple[int, ...] = (height, width, 3)
    if pix_fmt == "yuv420p":
        if (width, height) != i420_size(width, height):
            width, height = i420_size(width, height)
            stream = stream.filter("crop", width, height, 0, 0)
        shape = (height * 3 // 2, width)
    return stream.output("pipe:", format="rawvideo", pix_fmt=pix_fmt, fps_mode="passthrough"), shape


def read_frame_range(
    path: str,
    start: int,
    stop: int,
    fps: float,
    size: tuple[int, int] | None = None,
    info: ProbeInfo | None = None,
    pix_fmt: str = "rgb24",
    lead_seconds: float = 1.0,
) -> np.ndarray:
    """Frames [start, stop) of a local video at constant `fps`, numbered as `iter_frames(fps=fps)` does.

    Seeks to `lead_seconds` before `start` (on the frame grid) and trims after ffmpeg's fps filter, so
    the result equals the same slice of a full decode for mp4/mov/mkv/webm (see SEEKABLE_FORMATS).
    `size` is (width, height). pix_fmt "rgb24" gives (T, H, W, 3); "yuv420p" gives OpenCV's I420 layout
    (T, H * 3 / 2, W) at even sides (`i420_size`). MediaError("truncated") when fewer frames come back.
    """
    info = info or probe(path)
    graph, shape = _range_graph(path, start, stop, fps, size, info, pix_fmt, lead_seconds)
    frame_bytes = int(np.prod(shape))
    frames = np.frombuffer(run_ffmpeg(graph, info.uri, "decode_failed"), np.uint8)
    frames = frames[: len(frames) // frame_bytes * frame_bytes].reshape(-1, *shape)
    if len(frames) != stop - start:
        raise MediaError("truncated", info.uri, f"frames {start}-{stop}: got {len(frames)}")
    return frames.copy()  # writable: frames are blended in place


class FrameRangeReader:
    """`read_frame_range` for callers whose requests mostly continue where the last one ended.

    A composite stage reads a pair's chunks in order: one ffmpeg keeps decoding from chunk to chunk, so a
    run of consecutive chunks pays one ffmpeg start-up and one seek, where a `read_frame_range` per 2 s
    chunk cost 108 ms of ffmpeg CPU (52 ms of it starting ffmpeg) on the generate benchmark's input. Any
    other request (another video, a jump back for a ping-pong extension) starts a new ffmpeg there.
    """

    def __init__(self) -> None:
        self._running: list[FfmpegProcess] = []  # 0 or 1; a dropped reader kills it (weakref.finalize)
        self._key: tuple[str, float, str] = ("", 0.0, "")
        self._next = -1
        self._shape: tuple[int, ...] = ()
        self.starts = 0  # ffmpeg processes started so far
        weakref.finalize(self, _kill_all, self._running)

    def read(self, path: str, start: int, stop: int, fps: float, info: ProbeInfo, pix_fmt: str) -> np.ndarray:
        """Frames [start, stop) as `read_frame_range(path, start, stop, fps, info=info, pix_fmt=pix_fmt)`."""
        key = (path, fps, pix_fmt)
        if not self._running or key != self._key or start != self._next:
            self.close()
            graph, self._shape = _range_graph(path, start, None, fps, None, info, pix_fmt)
            self._running.append(FfmpegProcess(graph, pipe_stdout=True))
            self._key, self.starts = key, self.starts + 1
        proc = self._running[0]
        frames = np.empty((stop - start, *self._shape), np.uint8)
        assert proc.proc.stdout is not None
        got = read_exact(proc.proc.stdout, memoryview(frames).cast("B")) // int(np.prod(self._shape))
        if got < stop - start:  # ffmpeg reached the end (or failed)
            self._running.clear()
            check_exit(proc.wait(), "ffmpeg", info.uri, proc.stderr, "decode_failed")
            raise MediaError("truncated", info.uri, f"frames {start}-{stop}: got {got}")
        self._next = stop
        return frames

    def close(self) -> None:
        """Stop the running ffmpeg, if any."""
        _kill_all(self._running)


def _kill_all(processes: list[FfmpegProcess]) -> None:
    while processes:
        processes.pop().kill()
