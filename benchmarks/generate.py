"""Generation benchmark: end-to-end output fps against the model alone, and peak memory against length.

1. A synth clip (default 20 s) and the same clip looped to a long input (default 180 s).
2. `lipsync generate` on each, as a subprocess with its own local Ray; a sampler reads /proc every 0.5 s
   for every process of the run's tree: the peak resident memory of each Ray worker (VmHWM, i.e. its
   ru_maxrss), the peak of the workers' summed RSS and of the whole tree's (driver, raylet, object store),
   the same for the workers' private memory (RssAnon: RSS without the object store's shared pages),
   and the tree's summed PSS every 4 s (each shared page split among the processes mapping it),
   and the CPU seconds each kind of process used (utime + stime; an ffmpeg/ffprobe child under its
   stage's name, e.g. CompositeStage:ffmpeg): where the cores went besides the model.
   Short-lived ffmpeg children can end between samples, so the machine's busy and idle CPU seconds
   (/proc/stat) over the run are recorded too.
3. The model's forward pass alone on the short clip's own face crops and mel windows (same checkpoint
   and batch size), timed after a warm-up, just before and just after each run, in the pool's layout
   (its actors as concurrent callers with its threads each) and as one actor on every CPU, under the
   workers' allocator (core.malloc: jemalloc when installed, else glibc tuned before any thread); the
   fps ratio divides by the faster layout's mean, since other load on the machine drifts.
Prints the figures and writes benchmarks/results/generate.json (generate_cpu.json for
--config configs/generate_cpu.yaml). A randomly initialised checkpoint costs the same as a trained one.
The machine's load average is recorded: figures are only comparable on an otherwise idle machine.
Usage: python benchmarks/generate.py [--seconds 20] [--long-seconds 180] [--checkpoint CKPT] [--work DIR]
       [--skip-long] [--config FILE] (e.g. configs/generate_cpu.yaml; post.measure_offset: false shows what
       the output's tracking costs)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO))


def make_inputs(work: Path, seconds: float, long_seconds: float) -> tuple[Path, Path]:
    """A synth talking-face clip of `seconds` and the same clip looped to `long_seconds`."""
    from pipeline.synth import SynthConfig, run

    corpus = work / "synth"
    if not (corpus / "manifest.csv").exists():
        run(
            SynthConfig(languages=("en",), speakers=1, clips_per_speaker=1, seconds=seconds, seed=0),
            str(corpus),
        )
    short = next(corpus.rglob("*.mp4"))
    long = work / "long.mp4"
    if not long.exists():
        loops = int(long_seconds // seconds) - 1
        subprocess.run(
            [
                "ffmpeg",
                "-hide_banner",
                "-loglevel",
                "error",
                "-y",
                "-stream_loop",
                str(loops),
                "-i",
                str(short),
            ]
            + ["-c", "copy", str(long)],
            check=True,
        )
    return short, long


def random_checkpoint(work: Path) -> str:
    """A wav2lip checkpoint with random weights."""
    from models.checkpoint import checkpoint_payload, save_checkpoint
    from models.registry import build_model

    return save_checkpoint(
        str(work / "ckpt"), checkpoint_payload(build_model("wav2lip", 96), "wav2lip", 96, 0)
    )


# --- memory sampling ----------------------------------------------------------------------------


def _status(pid: int) -> dict[str, int]:
    fields = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "PPid", "RssAnon"):
                fields[key] = int(value.split()[0])
    with open(f"/proc/{pid}/stat") as fh:
        stat = fh.read().rsplit(")", 1)[1].split()
    fields["cpu_ticks"] = int(stat[11]) + int(stat[12])  # utime + stime
    fields["child_ticks"] = int(stat[13]) + int(stat[14])  # cutime + cstime: children it has waited for
    return fields


def _pss_kb(pid: int) -> int:
    """Proportional set size: each shared page (object store, libraries) split among its mappers.

    The kernel walks the process's mappings for it: 20 ms of CPU per read of a model actor (0.55 ms for a
    plain 1.2 GB array), ~40 ms for a pass over a 10-process Ray tree. Every 0.5 s that took ~30 CPU-s of
    a 185 s run, 9 % of the machine, so MemorySampler reads it every PSS_EVERY samples only.
    """
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def _tree(root: int) -> dict[int, tuple[str, dict[str, int]]]:
    """pid -> (command line, status fields) for `root` and all its descendants."""
    procs: dict[int, tuple[str, dict[str, int]]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = _status(int(entry))
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        procs[int(entry)] = (cmd, status)
    children: dict[int, list[int]] = {}
    for pid, (_, status) in procs.items():
        children.setdefault(status.get("PPid", 0), []).append(pid)
    tree, stack = {}, [root]
    while stack:
        pid = stack.pop()
        if pid in procs:
            tree[pid] = procs[pid]
        stack.extend(children.get(pid, []))
    return tree


def _label(cmd: str) -> str:
    if cmd.startswith("ray::"):
        for stage in ("PrepareStage", "GenerateStage", "CompositeStage", "FinalizeStage"):
            if stage in cmd:
                return stage
        return "ray_worker"
    return "driver" if "lipsync.cli" in cmd else "ray_system"


def _name(cmd: str) -> str:
    """A finer name than `_label`: the Ray actor or task (IDLE for an idle worker), else the program."""
    if cmd.startswith("ray::"):
        name = cmd.split()[0][len("ray::") :]
        stage = _label(cmd)
        return stage if stage != "ray_worker" else name
    words = cmd.split() or ["?"]
    program = words[0]  # a Python script by its name; the raylet's arguments name setup_worker.py
    if os.path.basename(program).startswith("python"):
        program = next((w for w in words[1:] if w.endswith(".py")), program)
    return "driver" if "lipsync.cli" in cmd else os.path.basename(program)


PSS_EVERY = 8  # samples (4 s)


class MemorySampler:
    """Samples a process tree's memory in a thread until stopped."""

    def __init__(self, root: int, interval: float = 0.5) -> None:
        self.root, self.interval = root, interval
        self.hwm_kb: dict[int, int] = {}
        self.cpu_ticks: dict[int, int] = {}
        self.child_ticks: dict[int, int] = {}
        self.sampler_cpu_seconds = 0.0
        self.labels: dict[int, str] = {}
        self.names: dict[int, str] = {}
        self.workers_peak_kb = self.tree_peak_kb = self.tree_pss_peak_kb = 0
        # Private memory only: RSS also counts object-store (shared memory) pages a worker has read, so it
        # climbs towards the store's fixed budget as a long run cycles through it, whatever the length.
        self.anon_peak_kb: dict[int, int] = {}
        self.workers_anon_peak_kb = 0
        self.timeline: list[
            tuple[float, dict[str, int], int]
        ] = []  # (seconds, CPU ticks by name, machine idle)
        self._started = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            tree = _tree(self.root)
            workers = workers_anon = 0
            for pid, (cmd, status) in tree.items():
                label = _label(cmd)
                parent = tree.get(status.get("PPid", 0))
                tool = os.path.basename(cmd.split()[0]) if cmd else ""
                if tool.startswith(("ffmpeg", "ffprobe")) and parent is not None:
                    tool = tool.split("-")[0]  # imageio-ffmpeg's binary: ffmpeg-linux-x86_64-v9.0.2
                    label = f"{_label(parent[0])}:{tool}"  # e.g. CompositeStage:ffmpeg
                if label not in ("driver", "ray_system") or pid not in self.labels:
                    self.labels[pid] = label
                    self.names[pid] = _name(cmd)
                self.hwm_kb[pid] = max(self.hwm_kb.get(pid, 0), status.get("VmHWM", 0))
                self.cpu_ticks[pid] = max(self.cpu_ticks.get(pid, 0), status.get("cpu_ticks", 0))
                self.child_ticks[pid] = max(self.child_ticks.get(pid, 0), status.get("child_ticks", 0))
                if cmd.startswith("ray::"):
                    workers += status.get("VmRSS", 0)
                    workers_anon += status.get("RssAnon", 0)
                    self.anon_peak_kb[pid] = max(self.anon_peak_kb.get(pid, 0), status.get("RssAnon", 0))
            self.workers_peak_kb = max(self.workers_peak_kb, workers)
            self.workers_anon_peak_kb = max(self.workers_anon_peak_kb, workers_anon)
            elapsed = time.perf_counter() - self._started
            self.timeline.append((elapsed, self._ticks_by_name(), _machine_cpu_ticks()[1]))
            self.tree_peak_kb = max(self.tree_peak_kb, sum(s.get("VmRSS", 0) for _, s in tree.values()))
            if len(self.timeline) % PSS_EVERY == 1:
                pss = sum(_pss_kb(pid) for pid in tree)
                self.tree_pss_peak_kb = max(self.tree_pss_peak_kb, pss)
            self._stop.wait(self.interval)
        self.sampler_cpu_seconds = time.thread_time()  # this thread's own cost: not in the run's figures

    def _name_of(self, pid: int) -> str:
        return self.labels[pid] if ":" in self.labels[pid] else self.names[pid]

    def _ticks_by_name(self) -> dict[str, int]:
        ticks: dict[str, int] = {}
        for pid, count in self.cpu_ticks.items():
            ticks[self._name_of(pid)] = ticks.get(self._name_of(pid), 0) + count
        return ticks

    def report(self) -> dict[str, float]:
        per_label: dict[str, float] = {}
        for pid, kb in self.hwm_kb.items():
            label = self.labels[pid]
            per_label[label] = max(per_label.get(label, 0.0), round(kb / 1024, 1))
        worker_hwm = [  # Ray workers only: not the driver, Ray's own processes or ffmpeg children
            kb
            for pid, kb in self.hwm_kb.items()
            if self.labels[pid] not in ("driver", "ray_system") and ":" not in self.labels[pid]
        ]
        cpu: dict[str, float] = {}
        by_name: dict[str, float] = {}
        for pid, ticks in self.cpu_ticks.items():
            seconds = ticks / os.sysconf("SC_CLK_TCK")
            cpu[self.labels[pid]] = cpu.get(self.labels[pid], 0.0) + seconds
            by_name[self._name_of(pid)] = by_name.get(self._name_of(pid), 0.0) + seconds
        waited: dict[str, float] = {}
        for pid, ticks in self.child_ticks.items():
            label = self.labels[pid]
            waited[label] = waited.get(label, 0.0) + ticks / os.sysconf("SC_CLK_TCK")
        return {
            "model_phases": _phases(self.timeline),
            "sampler_cpu_seconds": round(self.sampler_cpu_seconds, 1),
            "cpu_seconds_by_process": {k: round(v, 1) for k, v in sorted(cpu.items())},
            "cpu_seconds_by_name": {
                k: round(v, 1) for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])
            },
            # CPU of the children each kind of process ran and waited for, sampled or not: short-lived
            # ffmpeg/ffprobe runs that end between samples show up here only (the driver's include Ray's
            # own processes, which it waits for when it shuts Ray down)
            "waited_children_cpu_seconds_by_process": {
                k: round(v, 1) for k, v in sorted(waited.items()) if v
            },
            "peak_rss_mb_by_process": dict(sorted(per_label.items())),
            "max_worker_peak_rss_mb": round(max(worker_hwm, default=0) / 1024, 1),
            "workers_sum_peak_rss_mb": round(self.workers_peak_kb / 1024, 1),
            "max_worker_peak_anon_mb": round(max(self.anon_peak_kb.values(), default=0) / 1024, 1),
            "workers_sum_peak_anon_mb": round(self.workers_anon_peak_kb / 1024, 1),
            "tree_sum_peak_rss_mb": round(self.tree_peak_kb / 1024, 1),
            "tree_sum_peak_pss_mb": round(self.tree_pss_peak_kb / 1024, 1),
        }


def _phases(timeline: list[tuple[float, dict[str, int], int]]) -> dict[str, Any]:
    """Seconds and machine idle CPU seconds before the model's first CPU use, while it runs, and after;
    and the CPU seconds each process name used while the model ran."""
    model = [t[1].get("GenerateStage", 0) for t in timeline]
    busy = [i for i in range(1, len(timeline)) if model[i] > model[i - 1]]
    if not busy:
        return {}
    first, last = busy[0] - 1, busy[-1]
    tick = os.sysconf("SC_CLK_TCK")
    spans = {"before_model": (0, first), "model": (first, last), "after_model": (last, len(timeline) - 1)}
    report: dict[str, Any] = {}
    for name, (a, b) in spans.items():
        report[f"{name}_seconds"] = round(timeline[b][0] - timeline[a][0], 1)
        report[f"{name}_machine_idle_cpu_seconds"] = round((timeline[b][2] - timeline[a][2]) / tick, 1)
    start, end = timeline[first][1], timeline[last][1]
    during = {k: (v - start.get(k, 0)) / tick for k, v in end.items()}
    report["model_cpu_seconds_by_name"] = {
        k: round(v, 1) for k, v in sorted(during.items(), key=lambda kv: -kv[1]) if v >= 0.05
    }
    return report


def _machine_cpu_ticks() -> tuple[int, int]:
    """(busy, idle) CPU ticks of the whole machine since boot (idle includes iowait)."""
    with open("/proc/stat") as fh:
        ticks = [int(v) for v in fh.readline().split()[1:9]]  # guest time is inside user already
    idle = ticks[3] + ticks[4]
    return sum(ticks) - idle, idle


# --- runs ---------------------------------------------------------------------------------------


def generate(video: Path, checkpoint: str, out: Path, config: str | None = None) -> dict:
    """`lipsync generate` on one video (its own audio) in a fresh process with its own Ray."""
    out.mkdir(parents=True, exist_ok=True)
    pairs = out / "pairs.csv"
    pairs.write_text(f"id,video\nclip,{video}\n")
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_USAGE_STATS_ENABLED": "0"}
    env.setdefault("RAY_agent_register_timeout_ms", "120000")
    cmd = [
        sys.executable,
        "-m",
        "lipsync.cli",
        "generate",
        str(pairs),
        str(out / "out"),
        "--checkpoint",
        checkpoint,
        *(["--config", config] if config else []),
    ]
    load = os.getloadavg()[0]
    machine = _machine_cpu_ticks()
    started = time.perf_counter()
    with open(out / "stderr.txt", "w") as err:
        proc = subprocess.Popen(
            [*cmd, "--json"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True
        )
        with MemorySampler(proc.pid) as sampler:
            stdout, _ = proc.communicate()
    busy, idle = (b - a for a, b in zip(machine, _machine_cpu_ticks(), strict=True))
    if proc.returncode:
        raise RuntimeError(f"generate failed ({proc.returncode}); see {out / 'stderr.txt'}")
    result = json.loads(stdout.strip().splitlines()[-1])
    return {
        "input": str(video),
        "frames": result["frames"],
        "pipeline_seconds": result["wall_seconds"],
        "pipeline_fps": result["frames_per_second"],
        "process_seconds": round(time.perf_counter() - started, 2),
        "load_average_before": round(load, 2),
        "load_average_after": round(os.getloadavg()[0], 2),
        "machine_busy_cpu_seconds": round(busy / os.sysconf("SC_CLK_TCK"), 1),
        "machine_idle_cpu_seconds": round(idle / os.sysconf("SC_CLK_TCK"), 1),
        **sampler.report(),
    }


def face_batch(video: Path) -> tuple:
    """The clip's face crops and mel windows, as stage 1 makes them for the model."""
    import numpy as np

    from pipeline.audio import mel_windows, melspectrogram
    from pipeline.crops import crop_boxes, crop_faces
    from pipeline.landmarks import FaceMeshTracker, smooth_landmarks
    from pipeline.media import probe, read_audio, read_frames

    fps = probe(video).fps
    frames = read_frames(video, fps=fps)
    track = FaceMeshTracker(max_faces=1).track(frames, fps)
    boxes = crop_boxes(smooth_landmarks(track.landmarks, track.found), frames.shape)
    found = np.isfinite(boxes).all(axis=1)
    crops = crop_faces(frames[found], boxes[found], 96)
    mels = mel_windows(melspectrogram(read_audio(video, 16000)), len(frames), fps)[found].astype(np.float32)
    return crops, mels


def model_alone(stage, crops, mels, actors: int, threads: int) -> dict:
    """Forward passes alone over the clip's crops, batched as the model actors run them: `actors`
    concurrent callers (threads of this process; torch releases the GIL) of `threads` torch threads each,
    each on its share of the frames."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    stage.torch.set_num_threads(threads)
    stage.infer(crops[:32], mels[:32])  # warm-up
    parts = np.array_split(np.arange(len(crops)), actors)
    load = os.getloadavg()[0]
    started = time.perf_counter()
    with ThreadPoolExecutor(actors) as pool:
        list(pool.map(lambda part: stage.infer(crops[part], mels[part]), parts))
    seconds = time.perf_counter() - started
    return {
        "frames": len(crops),
        "seconds": round(seconds, 2),
        "fps": round(len(crops) / seconds, 2),
        "actors": actors,
        "threads": threads,
        "batch_size": stage.cfg.batch_size,
        "load_average_before": round(load, 2),
        "load_average_after": round(os.getloadavg()[0], 2),
    }


def model_references(stage, crops, mels, layout: tuple[int, int]) -> dict:
    """The model alone in the pipeline's layout and, when that differs, as one actor on every CPU."""
    cpus = os.cpu_count() or 1
    refs = {"pool": model_alone(stage, crops, mels, *layout)}
    if layout != (1, cpus):
        refs["one_actor_all_cpus"] = model_alone(stage, crops, mels, 1, cpus)
    return refs


def _reference_fps(*measurements: dict) -> float:
    """Mean model-alone fps of the faster layout, over the measurements before and after a run."""
    keys = measurements[0].keys()
    return max(sum(m[k]["fps"] for m in measurements) / len(measurements) for k in keys)


def _ratio(run: dict, *measurements: dict) -> float:
    """Pipeline fps over the model alone (its faster layout), measured just before and after the run."""
    return round(run["pipeline_fps"] / _reference_fps(*measurements), 3)


def main() -> None:
    from core.malloc import allocate_as_workers_do

    # First, before any thread exists: the model alone then allocates as the model actors do (ensure_ray
    # starts them with the same allocator). With glibc's defaults two threads at batch 32 mapped and
    # unmapped every activation: 28.8 frames/s against 41.7, which flattered the pipeline's ratio.
    allocate_as_workers_do()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--long-seconds", type=float, default=180.0)
    parser.add_argument("--checkpoint", help="wav2lip checkpoint (default: random weights)")
    parser.add_argument("--work", help="working directory (default: a temporary one)")
    parser.add_argument("--skip-long", action="store_true", help="only the short input (no memory ratio)")
    parser.add_argument("--config", help="generate config YAML (default: the built-in defaults)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-generate-"))
    work.mkdir(parents=True, exist_ok=True)
    short, long = make_inputs(work, args.seconds, args.long_seconds)
    checkpoint = args.checkpoint or random_checkpoint(work)
    from core.config import load_config
    from generation.config import GenerateConfig
    from generation.infer import GenerateStage, cpu_threads

    model_cfg = (load_config(GenerateConfig, args.config) if args.config else GenerateConfig()).model
    layout = (model_cfg.actors, cpu_threads(model_cfg))
    report: dict = {"cpus": os.cpu_count(), "checkpoint": checkpoint, "config": args.config}
    report["model_layout"] = {"actors": layout[0], "threads": layout[1]}
    crops, mels = face_batch(short)
    stage = GenerateStage(checkpoint, model_cfg)
    report["model_alone_before"] = model_references(stage, crops, mels, layout)
    report["short"] = generate(short, checkpoint, work / "short", args.config)
    report["model_alone_after_short"] = model_references(stage, crops, mels, layout)
    report["fps_ratio_short"] = _ratio(
        report["short"], report["model_alone_before"], report["model_alone_after_short"]
    )
    print(json.dumps(report, indent=1), flush=True)
    if not args.skip_long:
        report["long"] = generate(long, checkpoint, work / "long", args.config)
        report["model_alone_after_long"] = model_references(stage, crops, mels, layout)
        after = report["model_alone_after_long"]
        report["fps_ratio_long"] = _ratio(report["long"], report["model_alone_after_short"], after)
        pool_only = {"pool": after["pool"]}, {"pool": report["model_alone_after_short"]["pool"]}
        report["fps_ratio_long_vs_pool_layout"] = _ratio(report["long"], *pool_only)
        cpu = report["long"]["cpu_seconds_by_process"]
        # Steadier than the fps ratio when the machine's speed drifts between runs: the model's part of
        # all the CPU time the run's processes used (1.0 would mean nothing else cost anything).
        report["model_cpu_share_long"] = round(
            cpu.get("GenerateStage", 0.0) / max(sum(cpu.values()), 1e-9), 3
        )
        for key in (
            "max_worker_peak_rss_mb",
            "workers_sum_peak_rss_mb",
            "tree_sum_peak_rss_mb",
            "max_worker_peak_anon_mb",
            "workers_sum_peak_anon_mb",
            "tree_sum_peak_pss_mb",
        ):
            report[f"memory_ratio_{key}"] = round(report["long"][key] / report["short"][key], 3)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = Path(args.config).stem if args.config else "generate"
    result = RESULTS / (f"{stem}.json" if stem.startswith("generate") else f"generate_{stem}.json")
    result.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    print(f"wrote {result}")


if __name__ == "__main__":
    main()
