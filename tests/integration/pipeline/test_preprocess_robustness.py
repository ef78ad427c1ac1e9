"""Robustness of `lipsync preprocess` (issue 3): bad inputs, a killed driver, a killed Ray worker, S3 in and
out, and `lipsync offset` on real clips whose audio is shifted by a known number of frames.

Everything is real: ffmpeg makes the bad files, mediapipe finds the faces, Ray runs the actors (the
session's local Ray in-process, or the CLI's own embedded Ray in a subprocess), moto serves S3 on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import preprocess
from pipeline.landmarks import LIP_GAP_POINTS
from pipeline.preprocess_config import STATE_DIR, PreprocessConfig
from pipeline.shards import decode_crops, decode_landmarks, decode_mel

LIPSYNC = [sys.executable, "-m", "lipsync.cli"]


CLIP_SECONDS = 2.0


N_CLIPS = 8  # the shared corpus: 2 languages x 2 speakers x 2 clips


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-y", *args], check=True)


def clip_keys(clips: list[dict[str, Any]], root: str) -> set[tuple[str, int, int]]:
    """(source relative to the corpus root, start frame, end frame) of each clip: a URI-free clip set."""
    return {(c["source"][len(root) :].lstrip("/"), c["start_frame"], c["end_frame"]) for c in clips}


def read_rows(path: Path | str) -> list[dict[str, Any]]:
    return pq.read_table(str(path)).to_pylist()


def _stat(pid: int) -> tuple[str, int, int, int, int] | None:
    """(state, ppid, pgid, session id, start time) of a process, None when gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], int(fields[1]), int(fields[2]), int(fields[3]), int(fields[19])


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def live_group(leader: int) -> set[int]:
    """Live (non-zombie) processes in the process group or session that `leader` started."""
    found = set()
    for pid in _pids():
        st = _stat(pid)
        if st and st[0] != "Z" and leader in (st[2], st[3]):
            found.add(pid)
    return found


def descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid in _pids():
        st = _stat(pid)
        if st:
            children.setdefault(st[1], []).append(pid)
    out, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def kill_tree(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """SIGKILL everything `proc` (started with start_new_session) left: its session/process group and
    descendants, and wait until none is alive. Processes are tracked by (pid, start time), so a pid
    reused by someone else's process is never signalled."""
    leader = proc.pid

    def identity(pid: int) -> tuple[int, int] | None:
        st = _stat(pid)
        return (pid, st[4]) if st and st[0] != "Z" else None

    def alive(members: set[tuple[int, int]]) -> set[tuple[int, int]]:
        return {m for m in members if identity(m[0]) == m}

    members: set[tuple[int, int]] = set()
    deadline = time.monotonic() + timeout
    while True:
        pids = live_group(leader)
        if proc.poll() is None:  # not reaped yet, so its pid is still ours
            pids |= {leader} | descendants(leader)
        for member, _ in alive(members):
            pids |= descendants(member)
        members |= {m for pid in pids if (m := identity(pid))}
        remaining = alive(members)
        if not remaining and proc.poll() is not None:
            return
        for pid, _ in remaining:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.5)
        assert time.monotonic() < deadline, f"processes survive SIGKILL: {sorted(remaining)}"


def clip_preprocessor_pids(session: int | None = None) -> list[int]:
    """Ray worker processes running a ClipPreprocessor actor (by proctitle) in `session` (default: the
    test's own; other people's Ray on the machine is left alone)."""
    session = os.getsid(0) if session is None else session
    found = []
    for pid in _pids():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            if "ClipPreprocessor" in cmdline and os.getsid(pid) == session:
                found.append(pid)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return sorted(found)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 short synth clips (en, es; 2 speakers x 2 clips of 2 s) with their manifest.csv."""
    from pipeline.synth import SynthConfig, run

    out = tmp_path_factory.mktemp("robust_corpus")
    run(
        SynthConfig(languages=("en", "es"), speakers=2, clips_per_speaker=2, seconds=CLIP_SECONDS, seed=3),
        str(out),
    )
    assert len(list(out.rglob("*.mp4"))) == N_CLIPS
    return out


@pytest.fixture(scope="module")
def baseline(corpus: Path, ray_session, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """clips.parquet rows of one uninterrupted in-process run over `corpus`."""
    out = tmp_path_factory.mktemp("robust_baseline")
    result = preprocess.run(PreprocessConfig(), str(corpus), str(out))
    assert result["accepted_clips"] == N_CLIPS, read_rows(out / "rejects.parquet")
    return read_rows(out / "clips.parquet")


GOOD = {  # file -> (source fps, source width, source height)
    "plain.mp4": (25.0, 256, 256),
    "vfr.mp4": (None, 256, 256),  # variable (r 25, avg ~16.7 fps): checked below
    "fps60.mp4": (60.0, 256, 256),
    "stereo8k.mp4": (25.0, 256, 256),
    "rotated.mp4": (25.0, 256, 384),  # stored 384x256, displayed portrait 256x384
}


BAD = {  # file -> the exact reason code it must be rejected with
    "truncated.mp4": "truncated",
    "empty.mp4": "unreadable",
    "text.mp4": "unreadable",
    "noaudio.mp4": "no_audio_stream",
    "silent.mp4": "silent_audio",  # the audio decodes beside FaceMesh; its reject must still win
    "audioonly.mp4": "no_video_stream",
    "noface.mp4": "no_face",
    "twofaces.mp4": "multiple_faces",
    "oneframe.mp4": "too_short",
}


def make_bad_corpus(corpus: Path, out: Path) -> Path:
    """Good-but-awkward and bad files made from two synth clips (256x256, 25 fps, 2 s) with ffmpeg."""
    a = str(corpus / "en" / "en-spk00" / "clip000.mp4")
    b = str(corpus / "en" / "en-spk01" / "clip000.mp4")
    out.mkdir(parents=True)
    o = lambda name: str(out / name)  # noqa: E731
    h264 = ("-c:v", "libx264", "-pix_fmt", "yuv420p", "-preset", "veryfast")
    shutil.copy(a, o("plain.mp4"))
    data = Path(a).read_bytes()
    Path(o("truncated.mp4")).write_bytes(data[: len(data) // 2])
    Path(o("empty.mp4")).write_bytes(b"")
    Path(o("text.mp4")).write_text("this is a text file, not a video\n" * 20)
    ffmpeg("-i", a, "-c:v", "copy", "-an", o("noaudio.mp4"))
    ffmpeg("-i", a, "-vn", "-c:a", "copy", o("audioonly.mp4"))
    ffmpeg("-i", a, "-c:v", "copy", "-af", "volume=0", "-c:a", "aac", o("silent.mp4"))
    ffmpeg(
        "-f", "lavfi", "-i", f"testsrc2=size=256x256:rate=25:duration={CLIP_SECONDS}",
        "-f", "lavfi", "-i", f"sine=frequency=440:duration={CLIP_SECONDS}",
        *h264, "-c:a", "aac", "-shortest", o("noface.mp4"),
    )  # fmt: skip
    # Two faces side by side at 512x256: each stays ~20 % of the longer side, above the detector's floor.
    ffmpeg(
        "-i", a, "-i", b, "-filter_complex", "[0:v][1:v]hstack=inputs=2[v]",
        "-map", "[v]", "-map", "0:a", *h264, "-c:a", "aac", o("twofaces.mp4"),
    )  # fmt: skip
    # VFR: drop an irregular subset of frames and keep the survivors' timestamps.
    ffmpeg(
        "-i", a, "-vf", r"select='not(eq(mod(n\,5)\,2))*not(eq(mod(n\,7)\,3))'",
        "-fps_mode", "vfr", *h264, "-c:a", "copy", o("vfr.mp4"),
    )  # fmt: skip
    ffmpeg("-i", a, "-vf", "fps=60", *h264, "-c:a", "copy", o("fps60.mp4"))
    ffmpeg("-i", a, "-c:v", "copy", "-c:a", "aac", "-ar", "8000", "-ac", "2", o("stereo8k.mp4"))
    # A phone video: portrait 256x384 stored turned clockwise (384x256) with display rotation metadata.
    ffmpeg("-i", a, "-vf", "pad=256:384:0:64,transpose=1", *h264, "-c:a", "copy", o("rot_raw.mkv"))
    ffmpeg("-i", o("rot_raw.mkv"), "-c", "copy", "-metadata:s:v", "rotate=90", o("rotated.mp4"))
    os.remove(o("rot_raw.mkv"))
    ffmpeg("-i", a, "-frames:v", "1", *h264, "-c:a", "aac", "-t", "0.2", o("oneframe.mp4"))
    assert sorted(p.name for p in out.iterdir()) == sorted([*GOOD, *BAD])
    return out


@pytest.mark.slow
def test_bad_inputs_rejected_with_their_reason_good_ones_normalised(
    corpus: Path, ray_session, tmp_path: Path
) -> None:
    from pipeline.media import probe

    bad_dir = make_bad_corpus(corpus, tmp_path / "bad")
    info = probe(str(bad_dir / "rotated.mp4"))
    assert (info.rotation, info.width, info.height) in ((90, 256, 384), (270, 256, 384))
    assert probe(str(bad_dir / "vfr.mp4")).is_vfr
    assert probe(str(bad_dir / "stereo8k.mp4")).audio_sample_rate == 8000

    out = tmp_path / "out"
    result = preprocess.run(PreprocessConfig(), str(bad_dir), str(out))  # no exception = exit 0

    rejects = read_rows(out / "rejects.parquet")
    by_file = {Path(r["source"]).name: r for r in rejects}
    assert len(rejects) == len(BAD), [(r["source"], r["reason"], r["message"]) for r in rejects]
    assert {name: r["reason"] for name, r in by_file.items()} == BAD, {
        name: (r["stage"], r["reason"], r["message"]) for name, r in by_file.items()
    }
    for r in rejects:
        assert r["stage"] and r["message"]

    clips = read_rows(out / "clips.parquet")
    by_source = {Path(c["source"]).name: c for c in clips}
    assert sorted(by_source) == sorted(GOOD) and len(clips) == len(GOOD)
    for name, (source_fps, width, height) in GOOD.items():
        clip = by_source[name]
        assert clip["fps"] == 25.0
        assert abs(clip["n_frames"] - CLIP_SECONDS * 25) <= 1, (name, clip["n_frames"])
        assert abs(clip["mel_frames"] - 3.2 * clip["n_frames"]) <= 1
        assert (clip["source_width"], clip["source_height"]) == (width, height), name
        if source_fps is None:
            assert 10 < clip["source_fps"] < 24, (name, clip["source_fps"])
        else:
            assert clip["source_fps"] == pytest.approx(source_fps, abs=0.01), name
        assert clip["multi_face_fraction"] == 0.0 and clip["landmark_quality"] > 0.9, name
        shard = {r["clip_id"]: r for r in read_rows(out / clip["shard"])}[clip["clip_id"]]
        crops = decode_crops(shard)
        assert crops.shape == (clip["n_frames"], 96, 96, 3)
        assert decode_mel(shard).shape == (80, clip["mel_frames"])
        lips = decode_landmarks(shard)[:, list(LIP_GAP_POINTS), 1]
        assert np.nanmedian(lips) > 48, f"{name}: mouth not in the lower half of the crop (rotation?)"

    summary = json.loads((out / "summary.json").read_text())
    assert summary["accepted_clips"] == len(GOOD) and summary["inputs"] == len(GOOD) + len(BAD)
    assert summary["rejected_by_reason"] == {
        reason: list(BAD.values()).count(reason) for reason in set(BAD.values())
    }
    assert result["rejected"] == len(BAD)


def _cli_env() -> dict[str, str]:
    """The CLI starts its own embedded Ray: "local" stops ray.init() from joining a cluster that a
    `ray start` elsewhere on the machine registered in /tmp/ray/ray_current_cluster."""
    return {**os.environ, "RAY_ADDRESS": "local", "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
def test_killed_driver_resumes_with_the_same_clips(
    corpus: Path, baseline: list[dict[str, Any]], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    state = out / STATE_DIR
    cmd = [*LIPSYNC, "preprocess", str(corpus), str(out), "--workers", "1", "--json"]
    first_log = tmp_path / "first.log"
    with first_log.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True, env=_cli_env())
        try:
            deadline = time.monotonic() + 240
            while len(list(state.glob("*.json"))) < 2:
                assert proc.poll() is None, first_log.read_text()[-3000:]
                assert time.monotonic() < deadline, "no completion record within 240 s"
                time.sleep(0.05)
            # Its Ray worker runs in the CLI's session, so killing that session leaves nothing behind.
            assert clip_preprocessor_pids(session=proc.pid)
        finally:
            kill_tree(proc)  # the whole session: driver, GCS, raylet, workers
    finished = {p.name: p.stat().st_mtime_ns for p in state.glob("*.json")}
    assert 2 <= len(finished) < N_CLIPS, "the run must be killed part-way"
    assert not (out / "clips.parquet").exists()

    second_log = tmp_path / "second.log"
    with (tmp_path / "second.out").open("wb") as stdout, second_log.open("wb") as stderr:
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, start_new_session=True, env=_cli_env())
        try:
            assert proc.wait(timeout=300) == 0, second_log.read_text()[-3000:]
        finally:
            kill_tree(proc)  # nothing should be left; if anything is, it goes
    second_out = (tmp_path / "second.out").read_text()
    result = json.loads(second_out.strip().splitlines()[-1])
    expected = (N_CLIPS - len(finished), len(finished))  # (processed, skipped)
    assert (result["processed_inputs"], result["skipped_inputs"]) == expected
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["processed_inputs"], summary["skipped_inputs"]) == expected
    for name, mtime in finished.items():
        assert (state / name).stat().st_mtime_ns == mtime, f"{name} was reprocessed"
    assert len(list(state.glob("*.json"))) == N_CLIPS

    clips = read_rows(out / "clips.parquet")
    assert len(clips) == len({c["clip_id"] for c in clips}) == N_CLIPS  # nothing duplicated
    assert {c["clip_id"] for c in clips} == {c["clip_id"] for c in baseline}
    shard_ids = {r["clip_id"] for p in (out / "shards").glob("*.parquet") for r in read_rows(p)}
    assert shard_ids == {c["clip_id"] for c in baseline}


@pytest.mark.slow
def test_killed_worker_loses_no_clip(
    corpus: Path, baseline: list[dict[str, Any]], ray_session, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    killed: list[int] = []
    stop = threading.Event()

    def killer() -> None:
        """Once an input is finished, SIGKILL a ClipPreprocessor worker while it decodes the next one
        (it has an ffmpeg child then): the actor dies mid-input, with inputs still to come."""
        while not stop.is_set():
            done = len(list((out / STATE_DIR).glob("*.json")))
            if 1 <= done < N_CLIPS - 2:
                busy = [pid for pid in clip_preprocessor_pids() if descendants(pid)]
                if busy:
                    os.kill(busy[0], signal.SIGKILL)
                    killed.append(busy[0])
                    return
            time.sleep(0.01)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        result = preprocess.run(PreprocessConfig(), str(corpus), str(out))
    finally:
        stop.set()
        thread.join()
    assert killed, "no ClipPreprocessor worker was found and killed mid-run"
    assert result["accepted_clips"] == N_CLIPS
    clips = read_rows(out / "clips.parquet")
    assert {c["clip_id"] for c in clips} == {c["clip_id"] for c in baseline}
    assert len(clips) == N_CLIPS


@pytest.fixture
def s3_server(monkeypatch: pytest.MonkeyPatch):
    """A moto S3 server on 127.0.0.1 (free port) and the AWS_* environment pointing at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for key in list(os.environ):
        if key.startswith("AWS_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    from s3fs import S3FileSystem

    S3FileSystem.clear_instance_cache()  # no client made for another endpoint is reused
    try:
        yield endpoint
    finally:
        S3FileSystem.clear_instance_cache()
        server.stop()


def test_store_lists_what_other_processes_wrote_to_s3(s3_server: str) -> None:
    """A resuming driver lists `_state/` before and after the workers write to it: no stale listing."""
    import boto3

    from core.storage import Store

    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="listing")
    store = Store("s3://listing/out")
    s3.put_object(Bucket="listing", Key=f"out/{STATE_DIR}/a.json", Body=b"{}")
    assert store.listdir(STATE_DIR, ".json") == ["a.json"]
    s3.put_object(Bucket="listing", Key=f"out/{STATE_DIR}/b.json", Body=b"{}")  # another process
    assert store.listdir(STATE_DIR, ".json") == ["a.json", "b.json"]
    assert store.exists(f"{STATE_DIR}/b.json")
    s3.delete_object(Bucket="listing", Key=f"out/{STATE_DIR}/a.json")
    assert store.listdir(STATE_DIR, ".json") == ["b.json"]
    assert not store.exists(f"{STATE_DIR}/a.json")


@pytest.mark.slow
def test_s3_corpus_to_s3_output_gives_the_same_clips(
    corpus: Path, baseline: list[dict[str, Any]], ray_session, s3_server: str
) -> None:
    import boto3

    # The session's Ray started before these variables were set: its workers only see them through the
    # runtime_env that preprocess forwards (core.ray.forwarded_env).
    @ray_session.remote(num_cpus=0)
    def endpoint_in_worker() -> str | None:
        return os.environ.get("AWS_ENDPOINT_URL")

    assert ray_session.get(endpoint_in_worker.remote()) != s3_server

    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="lipsync")
    for path in sorted(corpus.rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), "lipsync", f"corpus/{path.relative_to(corpus).as_posix()}")

    result = preprocess.run(PreprocessConfig(), "s3://lipsync/corpus", "s3://lipsync/out")
    assert result["accepted_clips"] == N_CLIPS

    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="lipsync", Prefix="out/")["Contents"]}
    for name in ("clips.parquet", "rejects.parquet", "summary.json"):
        assert f"out/{name}" in keys
    shards = sorted(k for k in keys if k.startswith("out/shards/") and k.endswith(".parquet"))
    assert len(shards) == N_CLIPS
    assert len([k for k in keys if k.startswith(f"out/{STATE_DIR}/")]) == N_CLIPS

    import io

    body = s3.get_object(Bucket="lipsync", Key="out/clips.parquet")["Body"].read()
    clips = pq.read_table(io.BytesIO(body)).to_pylist()
    assert clip_keys(clips, "s3://lipsync/corpus") == clip_keys(baseline, str(corpus))
    # Ids hash the path within the corpus, not the URI: the copy on S3 has the local corpus's ids.
    assert {c["clip_id"] for c in clips} == {c["clip_id"] for c in baseline}
    summary = json.loads(s3.get_object(Bucket="lipsync", Key="out/summary.json")["Body"].read())
    assert summary["accepted_clips"] == N_CLIPS and summary["source"] == "s3://lipsync/corpus"
    shard = pq.read_table(
        io.BytesIO(s3.get_object(Bucket="lipsync", Key=shards[0])["Body"].read())
    ).to_pylist()[0]
    assert decode_crops(shard).shape[1:] == (96, 96, 3)
