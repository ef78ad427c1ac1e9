"""Generation's frame and file work around the model: extension, exact range decoding, blending, muxing.

- Extension: which source frame shows at each output frame when the audio outlasts the video
  (ping-pong by default, loop or freeze); shorter audio simply trims.
- `read_frame_range`: frames [start, stop) of a video exactly as `pipeline.media.iter_frames` numbers
  them, by seeking, so chunks can be re-read anywhere without decoding the whole file.
- Blending: a feathered mask over the mouth (from landmarks, inside the lower half of the face crop),
  colour matching of the generated crop to the frame, and pasting back through
  `pipeline.crops.paste_back_transform`, done on 4:2:0 frames (`blend_i420`) so that every sample the
  mask does not reach keeps its decoded value and only pays x264's quantisation on re-encoding.
- Finishing: concatenation of the encoded chunks with the new audio (H.264 + AAC), optional
  stabilisation (vidstab or deshake), and AV-offset correction by shifting the audio.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import tempfile
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import cv2
import ffmpeg
import numpy as np

from pipeline.crops import crop_face, paste_back_transform
from pipeline.landmarks import CHIN_POINT, LIPS_POINTS, NOSE_TIP_POINT
from pipeline.media import (
    FfmpegProcess,
    MediaError,
    ProbeInfo,
    _fraction,
    _output_path,
    check_exit,
    ffmpeg_executable,
    ffprobe_json,
    local_path,
    probe,
    read_exact,
    run_ffmpeg,
)
from pipeline.meters import MeterConfig, SyncMeter
from pipeline.offset import OffsetEstimate, estimate_offset

EXTENSION_MODES = ("pingpong", "loop", "freeze")
STABILISERS = ("off", "auto", "vidstab", "deshake")
# Mesh points the blend mask is built from, in this order: the lips, then the nose tip, then the chin.
MOUTH_POINTS: tuple[int, ...] = (*LIPS_POINTS, NOSE_TIP_POINT, CHIN_POINT)
# Containers whose seeking lands on exact frames (checked against a full decode in the tests);
# anything else (MPEG-TS, raw streams, ...) is remuxed to Matroska once before chunked decoding.
SEEKABLE_FORMATS = ("mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm")


# --- extension ----------------------------------------------------------------------------------


def source_indices(start: int, count: int, n_source: int, mode: str = "pingpong") -> np.ndarray:
    """Source frame shown at output frames start..start+count-1 of a video of `n_source` frames.

    "pingpong" plays forwards, backwards, forwards... without repeating the turning frames; "loop"
    restarts; "freeze" holds the last frame. Output frames inside the source map to themselves.
    """
    if n_source <= 0:
        raise ValueError(f"n_source must be positive, got {n_source}")
    if mode not in EXTENSION_MODES:
        raise ValueError(f"extension mode must be one of {EXTENSION_MODES}, got {mode!r}")
    j = np.arange(start, start + count, dtype=np.int64)
    if mode == "freeze":
        return np.minimum(j, n_source - 1)
    if mode == "loop" or n_source == 1:
        return j % n_source
    period = 2 * (n_source - 1)
    r = j % period
    return np.where(r < n_source, r, period - r)


def frames_for_audio(n_samples: int, sample_rate: int, fps: float) -> int:
    """Output frames for audio of `n_samples`: the audio's duration at `fps`, rounded."""
    return int(round(n_samples / sample_rate * fps))


def fit_length(pcm: np.ndarray, n_samples: int) -> np.ndarray:
    """PCM trimmed or zero-padded to exactly `n_samples`."""
    if len(pcm) >= n_samples:
        return pcm[:n_samples]
    return np.concatenate([pcm, np.zeros(n_samples - len(pcm), pcm.dtype)])


# --- exact range decoding -----------------------------------------------------------------------


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
        graph = source.output(
            out,
            format="mp4",
            vcodec="libx264",
            pix_fmt="yuv420p",
            crf=crf,
            preset=preset,
            threads=threads,
            bf=0,
        ).overwrite_output()
        run_ffmpeg(graph, uri, "encode_failed", stdin=memoryview(np.ascontiguousarray(frames)).cast("B"))
    return uri


# --- blending -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlendConfig:
    """How the generated crop goes back into the frame."""

    mouth_scale: float = 1.5  # mask half-width as a multiple of half the mouth-corner distance
    feather: float = 0.05  # Gaussian feather sigma as a fraction of the crop side
    color_match: bool = True  # match the generated mouth's LAB mean/std to the source's under the mask
    max_gain: float = 1.5  # limit on the colour match's std ratio (either way)


def mouth_mask(points: np.ndarray, size: int, cfg: BlendConfig) -> np.ndarray:
    """(size, size) float32 mask in [0, 1]: a feathered ellipse from below the nose to the chin.

    `points` are MOUTH_POINTS in crop pixels (lips, nose tip, chin). The mask is exactly 0 in the upper
    half of the crop and near the crop's sides, so only the mouth region Wav2Lip redraws is touched.
    """
    lips, nose, chin = points[: len(LIPS_POINTS), :2], points[-2, :2], points[-1, :2]
    sigma = max(cfg.feather * size, 0.5)
    margin = 2.0 * sigma
    half_w = 0.5 * (lips[:, 0].max() - lips[:, 0].min()) * cfg.mouth_scale
    cx = float(np.clip(lips[:, 0].mean(), margin, size - margin))
    half_w = min(half_w, cx - margin, size - margin - cx)
    top = max(0.5 * (nose[1] + lips[:, 1].min()), size / 2 + margin)
    bottom = min(max(chin[1], lips[:, 1].max()), size - margin)
    mask = np.zeros((size, size), np.float32)
    if half_w <= 1 or bottom - top <= 2 or not np.isfinite([cx, half_w, top, bottom]).all():
        return mask
    centre = (int(round(cx * 16)), int(round((top + bottom) / 2 * 16)))
    axes = (int(round(half_w * 16)), int(round((bottom - top) / 2 * 16)))
    cv2.ellipse(mask, centre, axes, 0, 0, 360, 1.0, -1, lineType=cv2.LINE_AA, shift=4)
    mask = cv2.GaussianBlur(mask, (0, 0), sigma)
    mask[: size // 2] = 0.0
    mask[mask < 1e-3] = 0.0
    return mask


def mask_support(mask: np.ndarray, margin: int = 2) -> tuple[slice, slice] | None:
    """Rows and columns of `mask`'s non-zero pixels, widened by `margin` (clipped); None when all zero.

    A bilinear warp of the crop reads at most one pixel beyond where its warped mask is non-zero (the
    default margin keeps one more), so a colour change confined to this box pastes exactly as one over
    the whole crop would.
    """
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return None
    height, width = mask.shape
    return (
        slice(max(0, rows[0] - margin), min(height, rows[-1] + 1 + margin)),
        slice(max(0, cols[0] - margin), min(width, cols[-1] + 1 + margin)),
    )


def color_match(
    generated: np.ndarray, reference: np.ndarray, mask: np.ndarray, max_gain: float
) -> np.ndarray:
    """Generated RGB crop with its LAB mean/std under `mask` moved to the reference crop's (Reinhard).

    Only the mask's support (see `mask_support`) is converted; pixels outside it keep their values.
    """
    support = mask_support(mask)
    weights = mask[support].reshape(-1) if support else None
    if weights is None or weights.sum() < 1.0:
        return generated
    w = weights / weights.sum()
    region = generated[support]
    lab_g, lab_r = _lab(region).reshape(-1, 3), _lab(reference[support]).reshape(-1, 3)
    mean_g, mean_r = w @ lab_g, w @ lab_r
    std_g = np.sqrt(w @ np.square(lab_g - mean_g)) + 1e-3
    std_r = np.sqrt(w @ np.square(lab_r - mean_r)) + 1e-3
    gain = np.clip(std_r / std_g, 1.0 / max_gain, max_gain)
    matched = ((lab_g - mean_g) * gain + mean_r).reshape(region.shape).astype(np.float32)
    rgb = cv2.cvtColor(matched, cv2.COLOR_LAB2RGB)
    out = generated.copy()
    out[support] = np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return out


def _lab(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB -> float32 CIELAB (L in 0..100)."""
    return cv2.cvtColor(rgb.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)


def paste_mouth(frame: np.ndarray, generated: np.ndarray, box: np.ndarray, mask: np.ndarray) -> None:
    """Blend a generated (size, size, 3) crop into `frame` in place through the feathered `mask`.

    Only the lower half of the face box is touched; pixels where the warped mask is 0 keep their values.
    """
    size = generated.shape[0]
    height, width = frame.shape[:2]
    x0, y0, x1, y1 = (float(v) for v in box)
    rx0, rx1 = max(0, math.floor(x0)), min(width, math.ceil(x1) + 1)
    ry0, ry1 = max(0, math.floor((y0 + y1) / 2)), min(height, math.ceil(y1) + 1)
    if rx1 <= rx0 or ry1 <= ry0:
        return
    m = paste_back_transform(box, size)
    m[0, 2] -= rx0
    m[1, 2] -= ry0
    roi_size = (rx1 - rx0, ry1 - ry0)
    warped = cv2.warpAffine(generated, m, roi_size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    alpha = cv2.warpAffine(mask, m, roi_size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    alpha = alpha[..., None]
    roi = frame[ry0:ry1, rx0:rx1]
    blended = roi.astype(np.float32) * (1.0 - alpha) + warped.astype(np.float32) * alpha
    roi[:] = np.where(alpha > 0, np.clip(blended + 0.5, 0, 255), roi).astype(np.uint8)


def _even_roi(box: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    """Even-aligned (x0, y0, x1, y1) covering a box, clipped to the frame (4:2:0 chroma stays whole)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    rx0, ry0 = max(0, math.floor(x0)) & ~1, max(0, math.floor(y0)) & ~1
    rx1, ry1 = min(width, math.ceil(x1) + 2) & ~1, min(height, math.ceil(y1) + 2) & ~1
    return rx0, ry0, rx1, ry1


def _planes(frame: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Y, U, V views of an I420 frame (H * 3 / 2, W)."""
    height, width = frame.shape[0] * 2 // 3, frame.shape[1]
    flat = frame.reshape(-1)
    quarter = (height // 2) * (width // 2)
    y = flat[: height * width].reshape(height, width)
    u = flat[height * width : height * width + quarter].reshape(height // 2, width // 2)
    v = flat[height * width + quarter :].reshape(height // 2, width // 2)
    return y, u, v


def blend_i420(
    frame: np.ndarray, generated: np.ndarray, box: np.ndarray, mask: np.ndarray, cfg: BlendConfig
) -> None:
    """Colour-match and paste a generated RGB crop into an I420 frame in place.

    Only the face box is converted to RGB and back; Y/U/V samples whose pixels the paste did not change
    keep their decoded values exactly.
    """
    y, u, v = _planes(frame)
    rx0, ry0, rx1, ry1 = _even_roi(box, y.shape[1], y.shape[0])
    if rx1 - rx0 < 2 or ry1 - ry0 < 2:
        return
    cy0, cy1, cx0, cx1 = ry0 // 2, ry1 // 2, rx0 // 2, rx1 // 2
    i420 = np.concatenate(
        [y[ry0:ry1, rx0:rx1].ravel(), u[cy0:cy1, cx0:cx1].ravel(), v[cy0:cy1, cx0:cx1].ravel()]
    )
    rgb = cv2.cvtColor(i420.reshape(-1, rx1 - rx0), cv2.COLOR_YUV2RGB_I420)
    local = np.asarray(box, np.float64) - [rx0, ry0, rx0, ry0]
    size = generated.shape[0]
    if cfg.color_match:
        generated = color_match(generated, crop_face(rgb, local, size), mask, cfg.max_gain)
    before = rgb.copy()
    paste_mouth(rgb, generated, local, mask)
    changed = (rgb != before).any(axis=2)
    if not changed.any():
        return
    ny, nu, nv = _planes(cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420))
    y[ry0:ry1, rx0:rx1][changed] = ny[changed]
    chroma = changed.reshape(changed.shape[0] // 2, 2, changed.shape[1] // 2, 2).any(axis=(1, 3))
    u[cy0:cy1, cx0:cx1][chroma] = nu[chroma]
    v[cy0:cy1, cx0:cx1][chroma] = nv[chroma]


def i420_to_rgb(frame: np.ndarray) -> np.ndarray:
    """(H * 3 / 2, W) I420 -> (H, W, 3) RGB (BT.601, as ffmpeg decodes untagged video)."""
    return cv2.cvtColor(frame, cv2.COLOR_YUV2RGB_I420)


# --- finishing ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PostprocessConfig(MeterConfig):
    """Encoding, stabilisation and AV-offset correction of the finished video.

    The output's offset is read by `meter` (landmarks | syncnet_v2 | expert with `weights`; see
    pipeline.meters) and corrected only when the meter does not abstain (`min_confidence`, None: the
    meter's own threshold) and the correction moves the re-measured offset toward 0.
    """

    crf: int = 16  # x264 quality of the chunks (and of the stabilised re-encode)
    preset: str = "veryfast"
    audio_bitrate: str = "192k"
    stabilise: str = "off"  # off | auto (vidstab when this ffmpeg has it, else deshake) | vidstab | deshake
    measure_offset: bool = True  # track the generated mouth and estimate the output's AV offset
    correct_offset: bool = True  # shift the audio when the estimate is confident and large enough
    min_seconds: float = 6.0  # shorter outputs are measured but never corrected (too few mouth movements)
    measure_seconds: float = 60.0  # only the output's first seconds are tracked for the estimate (0: all)
    min_abs_offset: int = 2  # frames; smaller measured offsets are left alone (estimator noise)
    max_abs_offset: int = 8  # frames; larger ones are not trusted
    max_lag: int = 15


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


@dataclass(frozen=True)
class OffsetCorrection:
    """The output's AV offset before and after shifting its audio by `shift_frames` (advance if > 0)."""

    before: OffsetEstimate
    after: OffsetEstimate
    shift_frames: int


def correct_offset(
    measure: Callable[[int], OffsetEstimate], n_frames: int, fps: float, cfg: PostprocessConfig
) -> OffsetCorrection:
    """Decide the audio shift that cancels the output's AV offset.

    `measure(shift)` reads the offset with the audio advanced by `shift` frames (0: as generated). The
    audio is shifted only when the first reading is confident, long enough and within the configured
    range, and only when the reading after the shift is closer to 0 than before: a correction never
    moves the measured offset away from sync.
    """
    before = measure(0)
    d = before.offset_frames
    long_enough = n_frames >= cfg.min_seconds * fps
    if not (
        cfg.correct_offset
        and before.confident
        and long_enough
        and cfg.min_abs_offset <= abs(d) <= cfg.max_abs_offset
    ):
        return OffsetCorrection(before, before, 0)
    after = measure(d)
    if abs(after.offset_frames) >= abs(d):
        return OffsetCorrection(before, after, 0)
    return OffsetCorrection(before, after, d)


def lip_shape_measure(
    lips: np.ndarray, pcm: np.ndarray, sample_rate: int, fps: float, cfg: PostprocessConfig
) -> Callable[[int], OffsetEstimate]:
    """`measure(shift)` for correct_offset from the output's lip shape (the landmark meter)."""

    def measure(shift: int) -> OffsetEstimate:
        mouth, audio = advance_audio(lips, pcm, sample_rate, fps, shift)
        return estimate_offset(mouth, audio, sample_rate, fps, cfg.max_lag, min_confidence=cfg.threshold)

    return measure


def frames_measure(
    meter: SyncMeter,
    frames: np.ndarray,
    landmarks: np.ndarray,
    pcm: np.ndarray,
    sample_rate: int,
    fps: float,
    cfg: PostprocessConfig,
) -> Callable[[int], OffsetEstimate]:
    """`measure(shift)` for correct_offset from the output's frames and landmarks (a network meter)."""

    def measure(shift: int) -> OffsetEstimate:
        index, audio = advance_audio(np.arange(len(frames)), pcm, sample_rate, fps, shift)
        return meter.measure(frames[index], landmarks[index], audio, sample_rate, fps, cfg.max_lag)

    return measure


def advance_audio(
    signal: np.ndarray, pcm: np.ndarray, sample_rate: int, fps: float, frames: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame signal and PCM with the audio advanced by `frames` (< 0 delays), both cut to the overlap.

    Cutting instead of padding keeps digital silence (log energy -inf) out of the re-estimate.
    """
    shift = int(round(abs(frames) * sample_rate / fps))
    if frames > 0:
        return signal[: len(signal) - frames], pcm[shift:]
    if frames < 0:
        return signal[-frames:], pcm[: max(0, len(pcm) - shift)]
    return signal, pcm


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
    cfg: PostprocessConfig,
    advance_seconds: float = 0.0,
) -> str:
    """Concatenate encoded chunk files (in order, `part_frames` frames each) with the audio into an mp4.

    H.264 + AAC. The audio is cut or padded to exactly the video's duration and advanced by `advance_seconds`
    (negative delays it); with stabilisation the video is re-encoded, otherwise copied. Returns out_uri.
    """
    mode = resolve_stabiliser(cfg.stabilise)
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
            video_args = {"vcodec": "libx264", "crf": cfg.crf, "preset": cfg.preset, "pix_fmt": "yuv420p"}
            video_args["r"] = _fraction(fps)
        graph = ffmpeg.output(
            video,
            audio,
            out,
            format="mp4",
            acodec="aac",
            audio_bitrate=cfg.audio_bitrate,
            movflags="+faststart",
            **video_args,
        ).overwrite_output()
        run_ffmpeg(graph, out_uri, "encode_failed")
    return out_uri
