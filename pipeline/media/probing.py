"""What a media file holds (ffprobe): streams, frame rate (VFR detected), frame count, rotation, audio."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from fractions import Fraction

from pipeline.media.tools import MediaError, check_exit, local_path

_VFR_TOLERANCE = 0.01  # relative difference between r_frame_rate and avg_frame_rate


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
