"""pipeline.media against real ffmpeg: inputs are made with lavfi sources (testsrc2 + sine)."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
from support.tools import require_tool

from pipeline import media

W, H, SECONDS = 160, 120, 2.0


def _ffmpeg(*args: str, quiet: bool = False) -> None:
    stderr = subprocess.DEVNULL if quiet else None
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", *args], check=True, stderr=stderr)


def _av(out: Path, rate: int, *extra: str, audio: bool = True) -> Path:
    """A SECONDS-long testsrc2 clip at `rate` fps (+ a 44.1 kHz sine track)."""
    inputs = ["-f", "lavfi", "-i", f"testsrc2=size={W}x{H}:rate={rate}"]
    if audio:
        inputs += ["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100"]
    codecs = ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"]
    codecs += ["-c:a", "aac"] if audio else []
    _ffmpeg(*inputs, "-t", str(SECONDS), *extra, *codecs, str(out))
    return out


def _rotate(src: Path, out: Path) -> Path:
    """Tag a 90° display rotation without re-encoding (ffmpeg >= 6: -display_rotation; 5.x: rotate tag)."""
    try:
        _ffmpeg("-display_rotation", "90", "-i", str(src), "-c", "copy", str(out), quiet=True)
    except subprocess.CalledProcessError:
        _ffmpeg("-i", str(src), "-c", "copy", "-metadata:s:v:0", "rotate=90", str(out))
    return out


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    require_tool("ffmpeg")
    d = tmp_path_factory.mktemp("media")
    c: dict[str, Path] = {}
    c["v30"] = _av(d / "v30.mp4", 30)
    c["v60"] = _av(d / "v60.mp4", 60)
    c["silent"] = _av(d / "silent.mp4", 25, audio=False)
    # VFR: drop every third frame of a 30 fps source and keep the timestamps (avg 20 fps, r 30 fps)
    c["vfr"] = _av(d / "vfr.mp4", 30, "-vf", r"select='not(eq(mod(n\,3)\,1))'", "-fps_mode", "vfr")
    c["rotated"] = _rotate(c["v30"], d / "rotated.mp4")
    c["faststart"] = _av(d / "faststart.mp4", 30, "-movflags", "+faststart", audio=False)
    # audio that starts 0.5 s after the video (an edit list in the mp4)
    c["late_audio"] = d / "late.mp4"
    _ffmpeg(
        *("-f", "lavfi", "-i", f"testsrc2=size={W}x{H}:rate=25", "-itsoffset", "0.5"),
        *("-f", "lavfi", "-i", "sine=frequency=440:sample_rate=16000", "-t", str(SECONDS)),
        *("-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac"),
        str(c["late_audio"]),
    )
    c["stereo8k"] = d / "stereo8k.wav"  # both channels carry the same 1/8-amplitude sine
    _ffmpeg(
        *("-f", "lavfi", "-i", "sine=frequency=440:sample_rate=8000", "-t", "1.5"),
        *("-af", "pan=stereo|c0=c0|c1=c0", "-c:a", "pcm_s16le", str(c["stereo8k"])),
    )
    c["m4a"] = d / "speech.m4a"
    _ffmpeg(
        "-f", "lavfi", "-i", "sine=frequency=300:sample_rate=22050", "-t", "1", "-c:a", "aac", str(c["m4a"])
    )
    c["empty"] = d / "empty.mp4"
    c["empty"].write_bytes(b"")
    c["text"] = d / "text.mp4"
    c["text"].write_text("this is not a video\n")
    c["truncated"] = d / "truncated.mp4"  # moov atom is at the end: cut off
    c["truncated"].write_bytes(c["v30"].read_bytes()[: c["v30"].stat().st_size // 3])
    c["truncated_faststart"] = d / "truncated_faststart.mp4"  # header intact, most frames missing
    data = c["faststart"].read_bytes()
    c["truncated_faststart"].write_bytes(data[: len(data) // 3])
    return c


# --- probe ------------------------------------------------------------------------------------------


def test_probe_reports_streams(clips: dict[str, Path]) -> None:
    info = media.probe(clips["v30"])
    assert (info.width, info.height, info.rotation) == (W, H, 0)
    assert info.fps == pytest.approx(30.0) and info.r_fps == pytest.approx(30.0)
    assert info.duration_s == pytest.approx(SECONDS, abs=0.05)
    assert info.n_frames == 60 and not info.is_vfr
    assert info.has_video and info.has_audio and info.video_codec == "h264"
    assert (info.audio_sample_rate, info.audio_channels) == (44100, 1)
    assert info.uri == str(clips["v30"])


def test_probe_flags_vfr(clips: dict[str, Path]) -> None:
    info = media.probe(clips["vfr"])
    assert info.is_vfr
    assert info.fps == pytest.approx(20.0, rel=0.05) and info.r_fps == pytest.approx(30.0)


def test_probe_rotated_reports_display_size(clips: dict[str, Path]) -> None:
    info = media.probe(clips["rotated"])
    assert info.rotation in (90, 270)
    assert (info.width, info.height) == (H, W)


@pytest.mark.parametrize("name", ["empty", "text", "truncated"])
def test_probe_unreadable(clips: dict[str, Path], name: str) -> None:
    with pytest.raises(media.MediaError) as err:
        media.probe(clips[name])
    assert err.value.reason == "unreadable"
    assert str(clips[name]) in str(err.value) and err.value.detail


def test_probe_audio_only(clips: dict[str, Path]) -> None:
    with pytest.raises(media.MediaError) as err:
        media.probe(clips["m4a"])
    assert err.value.reason == "no_video_stream"
    info = media.probe(clips["m4a"], require_video=False)
    assert info.has_audio and not info.has_video and info.duration_s == pytest.approx(1.0, abs=0.05)


def test_media_error_survives_pickling() -> None:
    err = pickle.loads(pickle.dumps(media.MediaError("unreadable", "s3://b/x.mp4", "moov atom not found")))
    assert (err.reason, err.uri, err.detail) == ("unreadable", "s3://b/x.mp4", "moov atom not found")
    assert str(err) == "s3://b/x.mp4: unreadable (moov atom not found)"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(media.MediaError) as err:
        media.probe(tmp_path / "nope.mp4")
    assert err.value.reason == "not_found"


# --- frames -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["v30", "v60", "vfr"])
def test_read_frames_resamples_to_constant_25fps(clips: dict[str, Path], name: str) -> None:
    frames = media.read_frames(clips[name], fps=25.0)
    assert frames.dtype == np.uint8 and frames.shape[1:] == (H, W, 3)
    assert abs(len(frames) - SECONDS * 25) <= 1


def test_read_frames_source_rate_keeps_every_decoded_frame(clips: dict[str, Path]) -> None:
    assert len(media.read_frames(clips["v30"], fps=None)) == 60
    assert len(media.read_frames(clips["vfr"], fps=None)) == 40  # no duplicates filled into the gaps


def test_read_frames_applies_rotation(clips: dict[str, Path]) -> None:
    frames = media.read_frames(clips["rotated"], fps=25.0)
    assert frames.shape[1:] == (W, H, 3)


def test_read_frames_scales(clips: dict[str, Path]) -> None:
    assert media.read_frames(clips["v30"], size=(80, -1)).shape[1:] == (60, 80, 3)
    assert media.read_frames(clips["v30"], size=(96, 96)).shape[1:] == (96, 96, 3)


def test_iter_frames_matches_read_frames(clips: dict[str, Path]) -> None:
    chunks = list(media.iter_frames(clips["v30"], fps=25.0, chunk=7))
    assert all(len(c) <= 7 for c in chunks) and len(chunks) == 8
    np.testing.assert_array_equal(np.concatenate(chunks), media.read_frames(clips["v30"], fps=25.0))


def test_iter_frames_can_stop_early(clips: dict[str, Path]) -> None:
    frames = media.iter_frames(clips["v60"], chunk=4)
    assert next(frames).shape == (4, H, W, 3)
    frames.close()  # kills ffmpeg instead of waiting on a full pipe


def _processes() -> list[tuple[int, int, list[bytes]]]:
    """(pid, parent pid, argv) of every live (not zombie) process."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():  # self, thread-self, sys, ...
            continue
        try:
            state, ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if state != "Z":
            found.append((int(entry.name), int(ppid), argv))
    return found


def _ffmpeg_children() -> list[int]:
    """PIDs of this process's live ffmpeg children."""
    return [pid for pid, ppid, argv in _processes() if ppid == os.getpid() and argv[0].endswith(b"ffmpeg")]


def test_read_ahead_gives_the_same_chunks_and_the_error_where_it_happened(clips: dict[str, Path]) -> None:
    with media.ReadAhead(media.iter_frames(clips["v30"], fps=25.0, chunk=7)) as chunks:
        ahead = list(chunks)
    np.testing.assert_array_equal(np.concatenate(ahead), media.read_frames(clips["v30"], fps=25.0))
    got = []
    truncated = media.ReadAhead(media.iter_frames(clips["truncated_faststart"], chunk=5))
    with pytest.raises(media.MediaError) as err, truncated:
        for chunk in truncated:
            got.append(chunk)
    assert err.value.reason == "truncated" and got  # the frames before the end still arrived


def test_read_ahead_works_one_item_ahead_and_no_further() -> None:
    made: list[int] = []
    produced = threading.Condition()

    def source():
        for i in range(5):
            with produced:
                made.append(i)
                produced.notify_all()
            yield i

    def wait_for(count: int) -> None:
        with produced:
            assert produced.wait_for(lambda: len(made) >= count, timeout=10)

    with media.ReadAhead(source()) as items:
        wait_for(1)  # started before anyone asked
        assert next(items) == 0
        wait_for(2)  # the next one is made while the caller holds item 0
        time.sleep(0.2)
        assert made == [0, 1]  # but not more than one ahead
        assert list(items) == [1, 2, 3, 4]


def test_closing_read_ahead_early_stops_ffmpeg(clips: dict[str, Path]) -> None:
    chunks = media.ReadAhead(media.iter_frames(clips["v60"], chunk=4))
    assert next(chunks).shape == (4, H, W, 3)
    chunks.close()
    assert _ffmpeg_children() == []
    with pytest.raises(StopIteration):
        next(chunks)


def test_truncated_after_header_is_reported(clips: dict[str, Path]) -> None:
    assert media.probe(clips["truncated_faststart"]).n_frames == 60  # the header still promises 2 s
    with pytest.raises(media.MediaError) as err:
        media.read_frames(clips["truncated_faststart"])
    assert err.value.reason == "truncated"


# --- audio ------------------------------------------------------------------------------------------


def test_read_audio_resamples_and_downmixes(clips: dict[str, Path]) -> None:
    pcm = media.read_audio(clips["stereo8k"])
    assert pcm.dtype == np.float32 and pcm.ndim == 1
    assert len(pcm) == pytest.approx(1.5 * 16000, abs=16)
    # channels are averaged: identical channels keep their amplitude (ffmpeg's -ac 1 would give 1/8 * 1.41)
    assert np.abs(pcm).max() == pytest.approx(1 / 8, rel=0.03)


def test_read_audio_from_video_and_sample_rate(clips: dict[str, Path]) -> None:
    pcm = media.read_audio(clips["v30"], sample_rate=22050)
    assert len(pcm) / 22050 == pytest.approx(SECONDS, abs=0.05)
    assert pcm.min() >= -1.0 and pcm.max() <= 1.0


def test_read_audio_pads_a_late_start(clips: dict[str, Path]) -> None:
    pcm = media.read_audio(clips["late_audio"])
    # the file's timeline from t=0 (the sine runs from ~0.5 s to the end of the 2 s output)
    assert len(pcm) / 16000 == pytest.approx(SECONDS, abs=0.1)
    assert np.abs(pcm[: int(0.4 * 16000)]).max() == 0.0
    assert np.abs(pcm[int(0.6 * 16000) :]).max() > 0.1


def test_read_audio_without_audio_stream(clips: dict[str, Path]) -> None:
    with pytest.raises(media.MediaError) as err:
        media.read_audio(clips["silent"])
    assert err.value.reason == "no_audio_stream"


def test_shift_audio_direction() -> None:
    pcm = np.arange(1, 11, dtype=np.float32)
    delayed = media.shift_audio(pcm, sample_rate=10, seconds=0.3)
    np.testing.assert_array_equal(delayed, [0, 0, 0, 1, 2, 3, 4, 5, 6, 7])
    advanced = media.shift_audio(pcm, sample_rate=10, seconds=-0.3)
    np.testing.assert_array_equal(advanced, [4, 5, 6, 7, 8, 9, 10, 0, 0, 0])
    np.testing.assert_array_equal(media.shift_audio(pcm, 10, 0.0), pcm)
    assert not media.shift_audio(pcm, 10, 5.0).any()
    assert delayed.dtype == np.float32 and len(advanced) == len(pcm)


# --- writing ----------------------------------------------------------------------------------------


def test_write_video_round_trip(clips: dict[str, Path], tmp_path: Path) -> None:
    frames = media.read_frames(clips["v30"], fps=25.0)
    pcm = media.read_audio(clips["v30"])
    out = tmp_path / "out" / "round.mp4"
    chunks = (frames[i : i + 16] for i in range(0, len(frames), 16))
    assert media.write_video(out, chunks, fps=25.0, audio=pcm) == str(out)
    info = media.probe(out)
    assert (info.video_codec, info.fps, info.n_frames) == ("h264", 25.0, len(frames))
    assert info.has_audio and info.audio_channels == 1
    assert len(media.read_audio(out)) / 16000 == pytest.approx(SECONDS, abs=0.05)
    back = media.read_frames(out, fps=25.0)
    assert back.shape == frames.shape
    assert np.abs(back.astype(int) - frames).mean() < 8


def test_write_video_is_deterministic_and_even(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(10, 21, 33, 3), dtype=np.uint8)
    a, b = tmp_path / "a.mp4", tmp_path / "b.mp4"
    media.write_video(a, frames, fps=25.0)
    media.write_video(b, list(frames), fps=25.0)  # single frames are accepted too
    assert a.read_bytes() == b.read_bytes()
    info = media.probe(a)
    assert (info.width, info.height, info.n_frames, info.has_audio) == (32, 20, 10, False)


def test_write_video_rejects_float_frames(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        media.write_video(tmp_path / "x.mp4", np.zeros((2, 16, 16, 3), np.float32), fps=25.0)


# --- URIs -------------------------------------------------------------------------------------------


def test_local_path_passes_local_paths_through(clips: dict[str, Path]) -> None:
    with media.local_path(clips["v30"]) as local:
        assert local == str(clips["v30"])
    with media.local_path(f"file://{clips['v30']}") as local:
        assert local == str(clips["v30"])


def test_remote_uris_round_trip_through_a_temp_file(clips: dict[str, Path]) -> None:
    uri = f"memory://media-test-{uuid.uuid4().hex}/clip.mp4"
    fs = fsspec.filesystem("memory")
    fs.pipe(uri, clips["v30"].read_bytes())
    with media.local_path(uri) as local:
        assert local != uri and Path(local).suffix == ".mp4"
        assert Path(local).read_bytes() == clips["v30"].read_bytes()
    assert not Path(local).exists()
    assert media.probe(uri).n_frames == 60
    out = uri.replace("clip.mp4", "written.mp4")
    media.write_video(out, np.zeros((5, 16, 16, 3), np.uint8), fps=25.0)
    assert fs.exists(out) and media.probe(out).n_frames == 5
    fs.rm(uri.rsplit("/", 1)[0], recursive=True)


def test_a_killed_ffprobe_is_not_an_unreadable_file(tmp_path: Path) -> None:
    """ffprobe blocks opening a FIFO nobody writes to; SIGKILL it as an OOM killer or a torn-down job would."""
    fifo = tmp_path / "never-written.mp4"
    os.mkfifo(fifo)
    killed: list[int] = []

    def kill_the_probe() -> None:
        deadline = time.monotonic() + 30
        while not killed and time.monotonic() < deadline:
            for pid, _, argv in _processes():
                if argv[0].endswith(b"ffprobe") and str(fifo).encode() in argv:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_probe)
    killer.start()
    with pytest.raises(media.MediaError) as err:
        media.probe(fifo)
    killer.join()
    assert killed, "the probe was never seen running"
    assert err.value.reason == media.TOOL_KILLED and "signal 9" in str(err.value)
    text = tmp_path / "text.mp4"
    text.write_text("not a video")
    with pytest.raises(media.MediaError) as err:
        media.probe(text)
    assert err.value.reason == "unreadable"


def test_every_ffmpeg_run_uses_the_chosen_ffmpeg(
    clips: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """$LIPSYNC_FFMPEG picks the binary (default: imageio-ffmpeg's static build, not PATH's)."""
    import imageio_ffmpeg

    monkeypatch.delenv("LIPSYNC_FFMPEG", raising=False)  # a developer's own choice must not decide this
    media.ffmpeg_executable.cache_clear()
    assert media.ffmpeg_executable() == imageio_ffmpeg.get_ffmpeg_exe()
    calls = tmp_path / "calls"
    wrapper = tmp_path / "my-ffmpeg"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\nexec ffmpeg "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("LIPSYNC_FFMPEG", str(wrapper))
    media.ffmpeg_executable.cache_clear()
    try:
        pcm = media.read_audio(clips["v30"], 16000)
        frames = media.read_frames(clips["v30"], fps=25.0)
    finally:
        monkeypatch.undo()  # before the cache is cleared, so later tests resolve the usual binary
        media.ffmpeg_executable.cache_clear()
    assert len(pcm) == pytest.approx(SECONDS * 16000, abs=1600) and len(frames) == 50
    assert len(calls.read_text().splitlines()) == 2  # the audio decode and the frame decode
