"""Training step rate, generation throughput and learning speed on one GPU (issue 30), driving the recipes.

Needs torch, numpy and pyarrow (no Ray, mediapipe or ffmpeg): the recipes (`SyncNetRecipe`, `Wav2LipRecipe`)
are stepped by a plain loop on synthetic batches of the recipes' shapes (`gpu_inputs`), or on a
preprocessed corpus given with --shards (make one here: `python benchmarks/train_input.py` caches a synth
corpus under /tmp/lipsync-bench-train-corpus/preprocessed; its shards/ and clips.parquet are ~10 MiB).
Every figure is the median of repeated timed runs after warm-up (CUDA events on GPU, perf_counter on CPU):
- training samples/s: SyncNet and Wav2Lip (generator + discriminator, GAN on) for fp32 and bf16 autocast,
  reference batches (64 / 16) and the largest that fits, channels_last on/off, torch.compile on/off
  (compile time apart); MFU = counted FLOPs/sample × samples/s ÷ the bf16 matmul rate measured here (on a CPU whose
  bf16 matmul is slower, the fp32 rate);
- generator inference frames/s at batch 128 and 512 in bf16;
- input path: a step fed by shard-reader threads (decode, window, collate, pin, copy) ÷ fed on-device tensors;
- bf16 vs fp32 loss curves of the first N steps (same seed, same batches), gap and tolerance;
- learning speed: the full-size expert and generator for a fixed time each: val loss curves, minutes to
  expert val loss < 0.5.
Writes one JSON (device name inside; after every section, so a cut-off run keeps what it measured) and
prints a table. Sections not reached within --budget-s are listed under "skipped".

CPU (CI): python benchmarks/gpu.py --device cpu --quick --out /tmp/gpu.json   (tiny sizes, seconds)
H100 (one run, ≤ 8 min; device tool timeout_s=480):
  timeout 470 python benchmarks/gpu.py --device cuda --budget-s 400 --out benchmarks/results/gpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import gpu_inputs  # noqa: E402

from core.config import from_dict  # noqa: E402
from models.checkpoint import checkpoint_payload, save_checkpoint  # noqa: E402
from models.registry import build_model  # noqa: E402
from training.devices import Amp  # noqa: E402
from training.recipe import Recipe, recipe_class  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
REF_BATCH = {"syncnet": 64, "wav2lip": 16}
BF16 = Amp(enabled=True, dtype=torch.bfloat16)
FP32 = Amp(enabled=False)
LOSS_KEY = {"syncnet": "train_loss", "wav2lip": "train_l1"}


def sizes(args: argparse.Namespace) -> dict[str, Any]:
    """What each section runs: the reference on a GPU, tiny with --quick."""
    if args.quick:
        return {"width": 0.125, "batch": {"syncnet": 2, "wav2lip": 2}, "steps": 1, "repeats": 2, "warmup": 1,
                "infer": (4, 8), "matmul": 256, "curve": 3, "learn_s": 2.0, "eval_every_s": 0.5,
                "largest": {"syncnet": 4, "wav2lip": 4}, "compile_cl": (False,), "input_workers": 1, "rows": 2, "val_batches": 1}  # fmt: skip
    return {"width": 1.0, "batch": dict(REF_BATCH), "steps": 10, "repeats": 5, "warmup": 3,
            "infer": (128, 512), "matmul": 8192, "curve": 50, "learn_s": args.learn_s, "eval_every_s": 10.0,
            "largest": {"syncnet": 2048, "wav2lip": 512}, "compile_cl": (False, True), "input_workers": 6, "rows": 16, "val_batches": 4}  # fmt: skip


class Bench:
    """One run: device, sizes, the expert checkpoint the generator recipes load, results and their JSON."""

    def __init__(self, args: argparse.Namespace, tmp: str) -> None:
        self.args, self.s, self.tmp = args, sizes(args), tmp
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.started = time.perf_counter()
        self.out: dict[str, Any] = {"device": device_info(self.device), "settings": {}, "skipped": []}
        self.out["settings"] = {**self.s, "quick": args.quick, "shards": args.shards, "img_size": 96,
                                "compile_backend": args.compile_backend, "budget_s": args.budget_s}  # fmt: skip
        expert = build_model("syncnet", 96, self.s["width"])
        self.expert = save_checkpoint(f"{tmp}/expert", checkpoint_payload(expert, "syncnet", 96, 0))

    # -- plumbing
    def over_budget(self, what: str) -> bool:
        if time.perf_counter() - self.started > self.args.budget_s:
            self.out["skipped"].append(what)
            return True
        return False

    def save(self) -> None:
        Path(self.args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(self.args.out).write_text(json.dumps(self.out, indent=1, default=float))

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def recipe(self, kind: str, batch: int, amp: Amp, **extra: Any) -> Recipe:
        cls = recipe_class(kind)
        fields = {"batch_size": batch, "width": self.s["width"], "gpu": self.cuda, "eval_clips": None,
                  "shuffle_buffer": 2 * batch, "eval_windows_per_clip": 2, **extra}  # fmt: skip
        recipe = cls(from_dict(cls.config, fields), self.device, expert=self.expert)
        recipe.amp = amp  # the case's precision (the recipe picked the device's default)
        return recipe

    def on_device(
        self, batch: dict[str, torch.Tensor], channels_last: bool = False
    ) -> dict[str, torch.Tensor]:
        out = {k: v.to(self.device) for k, v in batch.items()}
        if channels_last:
            out = {
                k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v
                for k, v in out.items()
            }
        return out

    def timed(self, fn: Callable[[], Any], steps: int) -> tuple[float, list[float]]:
        """Median seconds per call over repeats of `steps` calls, after warm-up; and every repeat's."""
        for _ in range(self.s["warmup"]):
            fn()
        self.sync()
        runs = []
        for _ in range(self.s["repeats"]):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(steps):
                    fn()
                end.record()
                end.synchronize()
                runs.append(start.elapsed_time(end) / 1000 / steps)
            else:
                began = time.perf_counter()
                for _ in range(steps):
                    fn()
                runs.append((time.perf_counter() - began) / steps)
        return statistics.median(runs), runs

    # -- sections
    def matmul(self) -> None:
        """The chip's bf16 (and fp32) matrix rate, the ceiling MFU is measured against."""
        n = self.s["matmul"]
        out = {"n": n}
        for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            a = torch.randn(n, n, device=self.device, dtype=dtype)
            b = torch.randn(n, n, device=self.device, dtype=dtype)
            sec, _ = self.timed(lambda a=a, b=b: a @ b, 10)
            out[f"{name}_tflops"] = 2 * n**3 / sec / 1e12
        out["ceiling_tflops"] = max(out["bf16_tflops"], out["fp32_tflops"])  # bf16 on a GPU; CPUs may differ
        self.out["matmul"] = out

    def flops(self) -> None:
        """FLOPs per sample counted (FlopCounterMode) over one recipe step (forward + backward, every model
        the step runs) and per generated frame at inference."""
        from torch.utils.flop_counter import FlopCounterMode

        out = {}
        for kind in ("syncnet", "wav2lip"):
            b = self.s["batch"][kind]
            recipe = self.recipe(kind, b, FP32)
            batch = self.on_device(next(gpu_inputs.synthetic(kind, b, 96, 0)))
            with FlopCounterMode(display=False) as counter:
                recipe.step(batch)
            out[f"{kind}_train_per_sample"] = counter.get_total_flops() / b
        gen = build_model("wav2lip", 96, self.s["width"]).to(self.device).eval()
        mel, faces = infer_inputs(4, self.device)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            gen(mel, faces)
        out["generator_infer_per_frame"] = counter.get_total_flops() / 4
        self.out["flops"] = out

    def mfu(self, flops_per_item: float, per_s: float) -> float:
        return flops_per_item * per_s / (self.out["matmul"]["ceiling_tflops"] * 1e12)

    def train_case(
        self, kind: str, batch: int, amp: Amp, channels_last: bool, compiled: bool
    ) -> dict[str, Any]:
        recipe = self.recipe(kind, batch, amp)
        if channels_last:
            recipe.parallelize(lambda m: m.to(memory_format=torch.channels_last))
        data = self.on_device(next(gpu_inputs.synthetic(kind, batch, 96, 1)), channels_last)
        case = {"model": kind, "dtype": "bf16" if amp.enabled else "fp32", "batch": batch,
                "channels_last": channels_last, "compile": compiled}  # fmt: skip
        if compiled:
            backend = self.args.compile_backend
            recipe.parallelize(lambda m: torch.compile(m, backend=backend))
            began = time.perf_counter()
            recipe.step(data)
            self.sync()
            case["compile_s"] = time.perf_counter() - began
        sec, runs = self.timed(lambda: recipe.step(data), self.s["steps"])
        per_s = batch / sec
        flops = self.out["flops"][f"{kind}_train_per_sample"]
        return case | {
            "samples_per_s": per_s,
            "step_ms": 1000 * sec,
            "spread": spread(runs),
            "mfu": self.mfu(flops, per_s),
        }

    def training(self, compiled: bool) -> None:
        """Every model × dtype × channels_last at the reference batch (compiled: bf16 only; --quick: no
        channels_last)."""
        cases = self.out.setdefault("training", [])
        for kind in ("syncnet", "wav2lip"):
            for amp in (BF16,) if compiled else (FP32, BF16):
                for cl in self.s["compile_cl"] if compiled else (False, True):
                    name = f"train {kind} {'bf16' if amp.enabled else 'fp32'} cl={cl} compile={compiled}"
                    if not self.over_budget(name):
                        cases.append(self.train_case(kind, self.s["batch"][kind], amp, cl, compiled))
                        self.save()

    def largest(self) -> None:
        """The largest batch (doubling from the reference, bf16) whose step fits, and its samples/s."""
        out = self.out.setdefault("largest_batch", {})
        for kind in ("syncnet", "wav2lip"):
            best, b = None, self.s["batch"][kind] * 2
            while b <= self.s["largest"][kind] and not self.over_budget(f"largest {kind} {b}"):
                try:
                    best = self.train_case(kind, b, BF16, False, False)
                except torch.OutOfMemoryError:
                    break
                finally:
                    if self.cuda:
                        torch.cuda.empty_cache()
                b *= 2
            if best is not None:
                out[kind] = best
            self.save()

    def inference(self) -> None:
        """Generator frames/s, model alone, bf16 autocast, no grad."""
        gen = build_model("wav2lip", 96, self.s["width"]).to(self.device).eval()
        rows = []
        for b in self.s["infer"]:
            mel, faces = infer_inputs(b, self.device)

            def run(mel: torch.Tensor = mel, faces: torch.Tensor = faces) -> None:
                with torch.no_grad(), BF16.autocast(self.device):
                    gen(mel, faces)

            sec, runs = self.timed(run, max(2, self.s["steps"] // 2))
            fps = b / sec
            rows.append({"batch": b, "dtype": "bf16", "frames_per_s": fps, "spread": spread(runs),
                         "mfu": self.mfu(self.out["flops"]["generator_infer_per_frame"], fps)})  # fmt: skip
        self.out["inference"] = rows

    def input_path(self) -> None:
        """SyncNet's step (bf16, reference batch) fed from shard-reader threads vs from on-device tensors."""
        kind, b = "syncnet", self.s["batch"]["syncnet"]
        recipe = self.recipe(kind, b, BF16)
        rows, source = self.rows("train", recipe.cfg)
        feeder = gpu_inputs.Feeder(rows, recipe.cfg, kind, self.s["input_workers"], pin=self.cuda)
        try:
            fed, _ = self.timed(lambda: recipe.step(next(feeder)), self.s["steps"])
        finally:
            feeder.close()
        data = self.on_device(next(gpu_inputs.synthetic(kind, b, 96, 2)))
        resident, _ = self.timed(lambda: recipe.step(data), self.s["steps"])
        self.out["input_path"] = {"model": kind, "batch": b, "source": source, "workers": self.s["input_workers"],
                                  "fed_samples_per_s": b / fed, "device_samples_per_s": b / resident,
                                  "ratio": resident / fed, "target": 0.95}  # fmt: skip

    def rows(self, split: str, cfg: Any) -> tuple[list[dict], str]:
        if self.args.shards:
            return gpu_inputs.shard_split(self.args.shards, cfg, split), self.args.shards
        return gpu_inputs.synthetic_rows(
            self.s["rows"], 75, 96, seed=3 if split == "train" else 4
        ), "synthetic"

    def curves(self) -> None:
        """bf16 vs fp32: the first N steps from the same seed on the same batches; the gap between the
        curves against a tolerance of 5 % of the fp32 loss (BCE ~0.69; L1 ~0.1-0.3)."""
        out = {}
        for kind in ("syncnet", "wav2lip"):
            b, key = self.s["batch"][kind], LOSS_KEY[kind]
            batches = gpu_inputs.synthetic(kind, b, 96, 5)
            data = [self.on_device(next(batches)) for _ in range(self.s["curve"])]
            losses = {}
            for name, amp in (("fp32", FP32), ("bf16", BF16)):
                recipe = self.recipe(kind, b, amp)
                losses[name] = [recipe.step(batch)[key] for batch in data]
            gaps = [abs(x - y) for x, y in zip(losses["fp32"], losses["bf16"], strict=True)]
            tol = 0.05 * statistics.fmean(abs(x) for x in losses["fp32"])
            out[kind] = {"loss": key, "steps": len(data), **losses, "max_abs_gap": max(gaps),
                         "mean_abs_gap": statistics.fmean(gaps), "tolerance": tol, "within": max(gaps) <= tol}  # fmt: skip
        self.out["bf16_vs_fp32"] = out

    def learning(self) -> None:
        """The full-size expert, then the generator (with that expert), each for `learn_s` seconds in bf16:
        val loss every `eval_every_s`, minutes to expert val loss < 0.5."""
        out: dict[str, Any] = {}
        expert = self.recipe("syncnet", self.s["batch"]["syncnet"], BF16)
        out["expert"] = self.learn(expert, "syncnet", "val_loss")
        below = [m for m, _, loss in out["expert"]["curve"] if loss < 0.5]
        out["expert"]["minutes_to_val_loss_0_5"] = below[0] if below else None
        trained = checkpoint_payload(
            expert.model, "syncnet", 96, 0, metrics={"val_loss": out["expert"]["curve"][-1][2]}
        )
        self.expert = save_checkpoint(f"{self.tmp}/trained_expert", trained)
        gen = self.recipe("wav2lip", self.s["batch"]["wav2lip"], BF16, expert_max_val_loss=None)
        out["generator"] = self.learn(gen, "wav2lip", "val_l1")
        self.out["learning"] = out

    def learn(self, recipe: Recipe, kind: str, metric: str) -> dict[str, Any]:
        b = recipe.cfg.batch_size
        if self.args.shards:
            from training.streams import BatchStream, val_batches

            train: Iterator = BatchStream(self.rows("train", recipe.cfg)[0], recipe.cfg, kind)
            val = [self.on_device(v) for v in val_batches(self.rows("val", recipe.cfg)[0], recipe.cfg, kind)]
        else:
            train = gpu_inputs.synthetic(kind, b, 96, 6)
            held = gpu_inputs.synthetic(kind, b, 96, 7)
            val = [self.on_device(next(held)) for _ in range(self.s["val_batches"])]
        curve, step, trained_s = [[0.0, 0, recipe.evaluate(val)[metric]]], 0, 0.0
        while trained_s < self.s["learn_s"]:
            began = time.perf_counter()
            while time.perf_counter() - began < self.s["eval_every_s"]:
                recipe.step(self.on_device(next(train)))
                step += 1
            trained_s += time.perf_counter() - began
            curve.append([trained_s / 60, step, recipe.evaluate(val)[metric]])
        return {
            "metric": metric,
            "batch": b,
            "steps": step,
            "curve": curve,
            "samples_per_s": step * b / trained_s,
        }


def infer_inputs(batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One frame per item, as generation feeds the model: mel (B, 1, 80, 16), faces (B, 6, 96, 96)."""
    return torch.randn(batch, 1, 80, 16, device=device), torch.rand(batch, 6, 96, 96, device=device)


def spread(runs: list[float]) -> float:
    """(max − min) / median of the repeats: how steady the median is."""
    return (max(runs) - min(runs)) / statistics.median(runs)


def device_info(device: torch.device) -> dict[str, Any]:
    import os
    import platform

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"type": device.type, "name": name, "torch": torch.__version__, "cuda": torch.version.cuda,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}  # fmt: skip


def table(out: dict[str, Any]) -> str:
    """The short table printed at the end."""
    lines = [f"device: {out['device']['name']} ({out['device']['type']})"]
    if "matmul" in out:
        lines.append(f"matmul n={out['matmul']['n']}: bf16 {out['matmul']['bf16_tflops']:.2f} TFLOP/s, "
                     f"fp32 {out['matmul']['fp32_tflops']:.2f} TFLOP/s")  # fmt: skip
    lines.append(
        f"{'model':8} {'dtype':5} {'batch':>5} {'cl':>2} {'comp':>4} {'samples/s':>10} {'MFU':>7} {'compile_s':>9}"
    )
    rows = out.get("training", []) + [r for r in out.get("largest_batch", {}).values()]
    for r in rows:
        lines.append(f"{r['model']:8} {r['dtype']:5} {r['batch']:>5} {int(r['channels_last']):>2} "
                     f"{int(r['compile']):>4} {r['samples_per_s']:>10.1f} {r['mfu']:>7.2%} "
                     f"{r.get('compile_s', float('nan')):>9.1f}")  # fmt: skip
    for r in out.get("inference", []):
        lines.append(
            f"generator inference bf16 batch {r['batch']}: {r['frames_per_s']:.1f} frames/s (MFU {r['mfu']:.2%})"
        )
    if "input_path" in out:
        i = out["input_path"]
        lines.append(f"input path ({i['source']}): fed {i['fed_samples_per_s']:.1f} / on-device "
                     f"{i['device_samples_per_s']:.1f} samples/s = {i['ratio']:.2f} (target ≥ {i['target']})")  # fmt: skip
    for kind, c in out.get("bf16_vs_fp32", {}).items():
        lines.append(f"bf16 vs fp32 {kind} {c['loss']} over {c['steps']} steps: max gap {c['max_abs_gap']:.4f} "
                     f"(tolerance {c['tolerance']:.4f}) {'ok' if c['within'] else 'OVER'}")  # fmt: skip
    for name, c in out.get("learning", {}).items():
        mins = c.get("minutes_to_val_loss_0_5", "n/a")
        lines.append(f"learning {name}: {c['steps']} steps, {c['metric']} {c['curve'][0][2]:.3f} → "
                     f"{c['curve'][-1][2]:.3f} in {c['curve'][-1][0]:.2f} min; to val loss < 0.5: {mins}")  # fmt: skip
    if out.get("skipped"):
        lines.append(f"skipped (budget): {', '.join(out['skipped'])}")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes (implied on CPU unless --full)")
    p.add_argument("--full", action="store_true", help="reference sizes even on CPU (hours)")
    p.add_argument(
        "--shards", help="a preprocessed corpus (clips.parquet + shards/) instead of synthetic data"
    )
    p.add_argument("--out", default=str(RESULTS / "gpu.json"))
    p.add_argument(
        "--budget-s", type=float, help="sections not started by then are skipped (400; --quick: 90)"
    )
    p.add_argument(
        "--threads", type=int, help="torch CPU threads (--quick: 1, spared contention on shared cores)"
    )
    p.add_argument("--learn-s", type=float, default=75.0, help="training seconds of each learning run")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (inductor; --quick: eager)")
    args = p.parse_args(argv)
    args.quick = args.quick or (args.device == "cpu" and not args.full)
    args.compile_backend = args.compile_backend or ("eager" if args.quick else "inductor")
    args.budget_s = args.budget_s or (90.0 if args.quick else 400.0)
    args.threads = args.threads or (1 if args.quick else None)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    torch.backends.cudnn.benchmark = True
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(args, tmp)
        steps: list[tuple[str, Callable[[], None]]] = [
            ("matmul", bench.matmul), ("flops", bench.flops), ("training", lambda: bench.training(False)),
            ("inference", bench.inference), ("input_path", bench.input_path), ("bf16_vs_fp32", bench.curves),
            ("learning", bench.learning), ("training compiled", lambda: bench.training(True)),
            ("largest_batch", bench.largest),
        ]  # fmt: skip
        for name, section in steps:
            if not bench.over_budget(name):
                section()
                bench.save()
        bench.out["seconds"] = time.perf_counter() - bench.started
        bench.out["ray_imported"] = "ray" in sys.modules
        bench.out["third_party_imports"] = third_party()
        bench.save()
    print(table(bench.out))
    print(f"wrote {args.out}")
    return bench.out


def third_party() -> list[str]:
    """Top-level non-stdlib modules this run imported (what a bare torch + numpy + pyarrow node must have)."""
    ours = {"core", "models", "training", "pipeline", "gpu_inputs", "__main__", "__mp_main__"}
    names = {m.split(".")[0] for m in sys.modules if not m.startswith("_")}
    return sorted(n for n in names - ours - set(sys.stdlib_module_names) if not n.startswith("_"))


if __name__ == "__main__":
    main()
