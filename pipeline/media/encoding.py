"""Encoding: H.264 from RGB or I420 frames, and the final mux of encoded parts with (shifted) audio,
optionally stabilised."""

from __future__ import annotations

import contextlib
import itertools
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from fractions import Fraction

import ffmpeg
import numpy as np
from scipy.io import wavfile

from pipeline.media.probing import probe
from pipeline.media.tools import (
    FfmpegProcess,
    MediaError,
    _output_path,
    _stderr_reason,
    check_exit,
    ffmpeg_filters,
    local_path,
    run_ffmpeg,
)


def x264_mp4(crf: int, preset: str, threads: int) -> dict[str, object]:
    """ffmpeg output options of every H.264 file we write: mp4, yuv420p (plays everywhere)."""
    return {
        "format": "mp4",
        "vcodec": "libx264",
        "pix_fmt": "yuv420p",
        "crf": crf,
        "preset": preset,
        "threads": threads,
    }


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
        **x264_mp4(crf, preset, threads),
        r=rate,
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


STABILISERS = ("off", "auto", "vidstab", "deshake")


def write_i420(uri: str, frames: np.ndarray, fps: float, crf: int, preset: str, threads: int = 2) -> str:
    """Encode (T, H * 3 / 2, W) I420 frames to an H.264 mp4 without any colour conversion.

    Frames that were not touched keep their decoded YUV values, so they only pay x264's quantisation
    (an RGB round trip alone costs about as much as crf 0 allows: ~46 dB). No B-frames: decode and
    presentation order agree in every chunk, so chunks of any length concatenate on the frame grid.
    """
    height, width = frames.shape[1] * 2 // 3, frames.shape[2]
    with _output_path(uri) as out:
        source = ffmpeg.input(
            "pipe:", format="rawvideo", pix_fmt="yuv420p", s=f"{width}x{height}", framerate=_fraction(fps)
        )
        graph = source.output(out, **x264_mp4(crf, preset, threads), bf=0).overwrite_output()
        run_ffmpeg(graph, uri, "encode_failed", stdin=memoryview(np.ascontiguousarray(frames)).cast("B"))
    return uri


def resolve_stabiliser(mode: str) -> str:
    """ "off", "vidstab" or "deshake" for a configured mode; "auto" prefers vidstab when available."""
    if mode not in STABILISERS:
        raise ValueError(f"stabilise must be one of {STABILISERS}, got {mode!r}")
    has_vidstab = {"vidstabdetect", "vidstabtransform"} <= ffmpeg_filters()
    if mode == "auto":
        return "vidstab" if has_vidstab else "deshake"
    if mode == "vidstab" and not has_vidstab:
        return "deshake"
    return mode


def _concat_list(parts: Sequence[str], durations: Sequence[float], directory: str) -> str:
    """A concat-demuxer list; explicit durations keep the joined timestamps on the frame grid."""
    listing = os.path.join(directory, "parts.txt")
    with open(listing, "w") as fh:
        for part, seconds in zip(parts, durations, strict=True):
            escaped = os.path.abspath(part).replace("'", "'\\''")
            fh.write(f"file '{escaped}'\nduration {seconds:.6f}\n")
    return listing


def _audio_track(path: str, seconds: float, shift_seconds: float):
    """The first audio stream from t=0, advanced (> 0) or delayed (< 0), padded/trimmed to `seconds`."""
    info = probe(path, require_video=False)
    if not info.has_audio:
        raise MediaError("no_audio_stream", path)
    audio = ffmpeg.input(path)[str(info.audio_stream)].filter("aresample", first_pts=0)
    if shift_seconds > 0:
        audio = audio.filter("atrim", start=shift_seconds).filter("asetpts", "PTS-STARTPTS")
    elif shift_seconds < 0:
        audio = audio.filter("adelay", delays=int(round(-shift_seconds * 1000)), all=1)
    return audio.filter("apad").filter("atrim", duration=seconds)


def _stabilised(listing: str, mode: str, workdir: str, uri: str):
    video = ffmpeg.input(listing, format="concat", safe=0).video
    if mode == "deshake":
        return video.filter("deshake")
    transforms = os.path.join(workdir, "transforms.trf")
    detect = video.filter("vidstabdetect", result=transforms).output("-", format="null")
    run_ffmpeg(detect, uri, "encode_failed")
    return ffmpeg.input(listing, format="concat", safe=0).video.filter("vidstabtransform", input=transforms)


def mux_output(
    parts: Sequence[str],
    part_frames: Sequence[int],
    audio_uri: str,
    fps: float,
    out_uri: str,
    *,
    crf: int,
    preset: str,
    audio_bitrate: str,
    stabilise: str = "off",
    advance_seconds: float = 0.0,
) -> str:
    """Concatenate encoded chunk files (in order, `part_frames` frames each) with the audio into an mp4.

    H.264 + AAC. The audio is cut or padded to exactly the video's duration and advanced by `advance_seconds`
    (negative delays it); with stabilisation (`stabilise`: see `resolve_stabiliser`) the video is re-encoded
    with x264 at `crf`/`preset`, otherwise copied. Returns out_uri.
    """
    mode = resolve_stabiliser(stabilise)
    with contextlib.ExitStack() as stack:
        local_parts = [stack.enter_context(local_path(p)) for p in parts]
        audio_local = stack.enter_context(local_path(audio_uri))
        workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="lipsync-mux-"))
        out = stack.enter_context(_output_path(out_uri))
        listing = _concat_list(local_parts, [n / fps for n in part_frames], workdir)
        audio = _audio_track(audio_local, sum(part_frames) / fps, advance_seconds)
        video_args: dict = {"vcodec": "copy"}
        if mode == "off":
            video = ffmpeg.input(listing, format="concat", safe=0).video
        else:
            video = _stabilised(listing, mode, workdir, out_uri)
            video_args = {"vcodec": "libx264", "crf": crf, "preset": preset, "pix_fmt": "yuv420p"}
            video_args["r"] = _fraction(fps)
        graph = ffmpeg.output(
            video,
            audio,
            out,
            format="mp4",
            acodec="aac",
            audio_bitrate=audio_bitrate,
            movflags="+faststart",
            **video_args,
        ).overwrite_output()
        run_ffmpeg(graph, out_uri, "encode_failed")
    return out_uri


def video_with_new_audio(
    video: str, audio: str, out_uri: str, crf: int = 18, preset: str = "veryfast"
) -> str:
    """`video`'s frames (looped as long as needed) with `audio` as the sound track, cut to the audio: the
    "do nothing" baseline of a lip-sync output. H.264 + AAC mp4; returns out_uri."""
    with contextlib.ExitStack() as stack:
        video_local = stack.enter_context(local_path(video))
        audio_local = stack.enter_context(local_path(audio))
        out = stack.enter_context(_output_path(out_uri))
        seconds = probe(audio_local, require_video=False).duration_s  # an explicit length, not -shortest
        frames = ffmpeg.input(video_local, stream_loop=-1).video
        sound = ffmpeg.input(audio_local).audio
        graph = ffmpeg.output(frames, sound, out, t=seconds, acodec="aac", **x264_mp4(crf, preset, 2))
        run_ffmpeg(graph.overwrite_output(), out_uri, "encode_failed")
    return out_uri
