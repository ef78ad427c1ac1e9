"""Video and audio I/O through ffmpeg pipes: probe, decode frames and PCM, encode mp4, shift audio.

Written once and imported by preprocessing, generation and scoring. Every ffmpeg/ffprobe call goes
through ffmpeg-python; frames travel as raw RGB24 on a pipe and audio as float32 PCM on a pipe, so no
intermediate files are written except the temporary wav that `write_video` muxes.

Timeline conventions (what makes frame `i` and PCM sample `j` line up):
- ffmpeg shifts every file so that its earliest stream starts at t=0;
- `read_frames(fps=...)` resamples to a constant rate starting at t=0 (`fps=...:start_time=0`), so frame
  `i` shows time `i / fps` even when the video stream starts late;
- `read_audio` pads a late audio start with silence (`aresample=first_pts=0`), so sample `j` plays at
  `j / sample_rate`.
Paths may be local or any fsspec URI (`s3://...`); remote inputs are copied to a temporary file per call,
so wrap several calls on the same remote file in one `local_path`.

Which ffmpeg: `ffmpeg_executable()`. ffprobe is the system's.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import queue
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import ffmpeg
import fsspec
import numpy as np
from scipy.io import wavfile

from core.errors import BadInput

_LOG_ARGS = ("-hide_banner", "-nostdin", "-loglevel", "error")
_VFR_TOLERANCE = 0.01  # relative difference between r_frame_rate and avg_frame_rate
_TRUNCATION_RATIO = 0.9  # fewer decoded frames than this share of the expected count means truncated


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


@dataclass
class ProbeInfo:
    """What ffprobe says about a media file (the first video and first audio stream)."""

    uri: str
    duration_s: float  # video stream duration (container duration when the stream has none)
    fps: float  # average frame rate (avg_frame_rate)
    r_fps: float  # ffprobe's r_frame_rate (lowest rate that represents every timestamp)
    width: int  # display width: after rotation
    height: int  # display height: after rotation
    rotation: int  # degrees in [0, 360), ffprobe's display-matrix convention
    n_frames: int  # estimated: nb_frames when the container stores it, else duration * fps
    has_video: bool
    has_audio: bool
    audio_sample_rate: int | None
    audio_channels: int | None
    video_codec: str | None
    is_vfr: bool
    video_stream: int | None = None  # ffmpeg stream index of the video stream used
    audio_stream: int | None = None  # ffmpeg stream index of the audio stream used


# --- paths ------------------------------------------------------------------------------------------


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


# --- probe ------------------------------------------------------------------------------------------


def _rate(text: str | None) -> float:
    """Parse an ffprobe rational like "30000/1001"; 0 for missing or "0/0"."""
    if not text:
        return 0.0
    num, _, den = text.partition("/")
    try:
        return float(Fraction(int(num), int(den or 1)))
    except (ValueError, ZeroDivisionError):
        return 0.0


def _float(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0.0


def _stderr_reason(stderr: bytes | str | None) -> str:
    """The last two distinct lines of ffmpeg's stderr, without the "[demuxer @ 0x...]" prefixes."""
    text = stderr.decode(errors="replace") if isinstance(stderr, bytes) else (stderr or "")
    lines: list[str] = []
    for line in text.strip().splitlines():
        line = re.sub(r"^\[[^\]]* @ 0x[0-9a-f]+\]\s*", "", line.strip())
        if line and line not in lines:
            lines.append(line)
    return "; ".join(lines[-2:]) if lines else "ffmpeg failed"


def _rotation(stream: dict) -> int:
    """Rotation from the display-matrix side data (or the legacy `rotate` tag), normalised to [0, 360)."""
    for side in stream.get("side_data_list", []) or []:
        if "rotation" in side:
            return int(round(_float(side["rotation"]))) % 360
    return int(round(_float(stream.get("tags", {}).get("rotate", 0)))) % 360


def _pick(streams: list[dict], codec_type: str) -> dict | None:
    """First stream of a type; cover art (attached_pic) does not count as video."""
    for stream in streams:
        if stream.get("codec_type") != codec_type:
            continue
        if codec_type == "video" and stream.get("disposition", {}).get("attached_pic") == 1:
            continue
        return stream
    return None


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


def ffprobe_json(path: str, uri: str) -> dict:
    """ffprobe's streams and format of a local file. As ffmpeg.probe, but keeping the exit code: a killed
    ffprobe must not make a file "unreadable"."""
    cmd = ["ffprobe", "-show_format", "-show_streams", "-of", "json", path]
    proc = subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL)
    check_exit(proc.returncode, "ffprobe", uri, proc.stderr, "unreadable")
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        raise MediaError("unreadable", uri, f"ffprobe output is not JSON: {exc}") from exc


def _video_fields(video: dict, fmt: dict) -> dict:
    fps, r_fps = _rate(video.get("avg_frame_rate")), _rate(video.get("r_frame_rate"))
    fps = fps or r_fps
    duration = _float(video.get("duration")) or _float(fmt.get("duration"))
    rotation = _rotation(video)
    width, height = int(video.get("width") or 0), int(video.get("height") or 0)
    if rotation in (90, 270):
        width, height = height, width
    n_frames = int(_float(video.get("nb_frames"))) or int(round(duration * fps))
    is_vfr = bool(fps and r_fps and abs(r_fps - fps) > _VFR_TOLERANCE * r_fps)
    return dict(
        duration_s=duration,
        fps=fps,
        r_fps=r_fps,
        width=width,
        height=height,
        rotation=rotation,
        n_frames=n_frames,
        video_codec=video.get("codec_name"),
        is_vfr=is_vfr,
        video_stream=int(video["index"]),
    )


def _probe_local(path: str, uri: str, require_video: bool) -> ProbeInfo:
    data = ffprobe_json(path, uri)
    streams, fmt = data.get("streams", []), data.get("format", {})
    video, audio = _pick(streams, "video"), _pick(streams, "audio")
    if video is None and (require_video or audio is None):
        raise MediaError("no_video_stream", uri, "no audio either" if audio is None else "audio only")
    fields: dict = dict(
        duration_s=_float(fmt.get("duration")) or _float((audio or {}).get("duration")),
        fps=0.0,
        r_fps=0.0,
        width=0,
        height=0,
        rotation=0,
        n_frames=0,
        video_codec=None,
        is_vfr=False,
    )
    if video is not None:
        fields.update(_video_fields(video, fmt))
        if fields["n_frames"] <= 0 or fields["duration_s"] <= 0 or fields["fps"] <= 0:
            raise MediaError("too_short", uri, "no frames or no duration")
    return ProbeInfo(
        uri=uri,
        has_video=video is not None,
        has_audio=audio is not None,
        audio_sample_rate=int(audio["sample_rate"]) if audio and audio.get("sample_rate") else None,
        audio_channels=int(audio["channels"]) if audio and audio.get("channels") else None,
        audio_stream=int(audio["index"]) if audio else None,
        **fields,
    )


def probe(path: str | os.PathLike, require_video: bool = True) -> ProbeInfo:
    """Probe a media file; MediaError "unreadable", "no_video_stream" (unless require_video=False), "too_short"."""
    uri = str(path)
    with local_path(uri) as local:
        return _probe_local(local, uri, require_video)


# --- ffmpeg processes -------------------------------------------------------------------------------


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


# --- frames -----------------------------------------------------------------------------------------


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


# --- audio ------------------------------------------------------------------------------------------


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


# --- writing ----------------------------------------------------------------------------------------


def _fraction(fps: float) -> str:
    """A frame rate as an exact ffmpeg rational ("30000/1001" for 29.97)."""
    rate = Fraction(fps).limit_denominator(1001)
    if rate <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    return f"{rate.numerator}/{rate.denominator}"


def _as_chunks(frames: np.ndarray | Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """Normalise an array or an iterable of chunks/single frames to (T, H, W, 3) uint8 chunks."""
    if isinstance(frames, np.ndarray):
        frames = [frames]
    for chunk in frames:
        chunk = np.asarray(chunk)
        if chunk.ndim == 3:
            chunk = chunk[None]
        if chunk.ndim != 4 or chunk.shape[-1] != 3 or chunk.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 (T, H, W, 3) RGB, got {chunk.dtype} {chunk.shape}")
        if len(chunk):
            yield np.ascontiguousarray(chunk)


def _write_wav(path: str, audio: np.ndarray, sample_rate: int) -> None:
    pcm = np.clip(np.asarray(audio, dtype=np.float32).reshape(-1), -1.0, 1.0)
    wavfile.write(path, sample_rate, pcm)


def _encode_graph(
    out: str, size: tuple[int, int], fps: float, wav: str | None, crf: int, preset: str, threads: int
):
    width, height = size
    rate = _fraction(fps)
    video = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}", framerate=rate)
    stream = video.video
    if width % 2 or height % 2:  # yuv420p needs even sides: drop the last row/column
        stream = stream.filter("crop", width - width % 2, height - height % 2, 0, 0)
    streams = [stream]
    audio_args: dict = {}
    if wav is not None:
        streams.append(ffmpeg.input(wav).audio)
        audio_args = {"acodec": "aac", "audio_bitrate": "128k", "ac": 1}
    return ffmpeg.output(
        *streams,
        out,
        format="mp4",
        vcodec="libx264",
        pix_fmt="yuv420p",
        crf=crf,
        preset=preset,
        r=rate,
        threads=threads,
        fflags="+bitexact",
        flags="+bitexact",
        map_metadata=-1,
        movflags="+faststart",
        **audio_args,
    ).overwrite_output()


def _feed(proc: FfmpegProcess, chunks: Iterable[np.ndarray], uri: str) -> None:
    """Write frames to ffmpeg's stdin; every chunk must keep the first chunk's size."""
    assert proc.proc.stdin is not None
    shape = None
    for frames in chunks:
        shape = shape or frames.shape[1:]
        if frames.shape[1:] != shape:
            raise ValueError(f"frame size changed from {shape} to {frames.shape[1:]}")
        try:
            proc.proc.stdin.write(memoryview(frames).cast("B"))
        except BrokenPipeError as exc:
            check_exit(proc.wait(), "ffmpeg", uri, proc.stderr, "encode_failed")
            raise MediaError("encode_failed", uri, _stderr_reason(proc.stderr)) from exc


def write_video(
    path: str | os.PathLike,
    frames: np.ndarray | Iterable[np.ndarray],
    fps: float,
    audio: np.ndarray | None = None,
    sample_rate: int = 16000,
    crf: int = 18,
    preset: str = "veryfast",
    threads: int = 2,
) -> str:
    """Encode RGB frames (an array or an iterable of chunks) and optional float32 mono PCM to an mp4.

    H.264 yuv420p + AAC; odd sides lose their last row/column; bit-exact flags, no metadata and a fixed
    thread count make the output byte-identical for identical input. Returns `path` as a string.
    """
    uri = str(path)
    chunks = _as_chunks(frames)
    first = next(chunks, None)
    if first is None:
        raise ValueError("write_video needs at least one frame")
    size = (first.shape[2], first.shape[1])
    with _output_path(uri) as out, tempfile.TemporaryDirectory(prefix="lipsync-wav-") as tmp:
        wav = None
        if audio is not None:
            wav = os.path.join(tmp, "audio.wav")
            _write_wav(wav, audio, sample_rate)
        proc = FfmpegProcess(_encode_graph(out, size, fps, wav, crf, preset, threads), pipe_stdin=True)
        try:
            _feed(proc, itertools.chain([first], chunks), uri)
        except BaseException:
            proc.kill()
            raise
        check_exit(proc.wait(), "ffmpeg", uri, proc.stderr, "encode_failed")
    return uri
