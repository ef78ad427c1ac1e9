"""Is SyncNet training input-bound? Step rate on real shards against the same model fed in-memory tensors.

Both runs are the same Ray Train set-up (1 worker, 1 CPU, reference batch 64) and the same `train_step`;
one takes its batches from the Ray Data stream of shard windows (decode JPEGs, cut windows, shuffle,
collate), the other reuses one random batch held in memory. Target: ratio >= 0.95. The first interval
(pipeline start-up, first weights) is a warm-up and not counted.

Prints and writes benchmarks/results/train_input.json.
Usage: python benchmarks/train_input.py [DATA] [--interval 8] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
CORPUS = Path(tempfile.gettempdir()) / "lipsync-bench-train-corpus"


def corpus(data: str | None) -> str:
    """DATA, or a synth corpus (3 languages x 2 speakers x 2 clips of 4 s) preprocessed once and cached."""
    if data:
        return data
    out = CORPUS / "preprocessed"
    if not (out / "clips.parquet").exists():
        from pipeline.preprocess import run as preprocess
        from pipeline.preprocess_config import PreprocessConfig
        from pipeline.synth import SynthConfig
        from pipeline.synth import run as synth

        synth(
            SynthConfig(languages=("en", "es", "hi"), speakers=2, clips_per_speaker=2, seed=1),
            str(CORPUS / "raw"),
        )
        preprocess(PreprocessConfig(), str(CORPUS / "raw"), str(out))
    return str(out)


def in_memory_loop(config: dict[str, Any]) -> None:
    """The SyncNet recipe's step on one batch kept in memory; reports steps/s per interval."""
    import ray.train
    import ray.train.torch
    import torch

    from core.config import from_dict
    from training.devices import worker_device
    from training.distributed import global_mean
    from training.streams import Throughput
    from training.syncnet_job import SyncNetConfig, SyncNetRecipe

    cfg = from_dict(SyncNetConfig, config["cfg"])
    recipe = SyncNetRecipe(cfg, worker_device())
    recipe.parallelize(ray.train.torch.prepare_model)
    half = cfg.img_size // 2
    batch = {
        "faces": torch.randint(0, 256, (cfg.batch_size, 15, half, cfg.img_size), dtype=torch.uint8),
        "mel": torch.randn(cfg.batch_size, 1, 80, 16),
        "label": torch.randint(0, 2, (cfg.batch_size,)).float(),
    }
    stream = iter(lambda: batch, None)
    throughput, rates = Throughput(), []
    for step in range(1, cfg.steps + 1):
        loss = recipe.step(throughput.next(stream))["train_loss"]
        global_mean(loss, recipe.device)
        if step % cfg.log_every == 0:
            rates.append(throughput.read()["steps_per_s"])
    if ray.train.get_context().get_world_rank() == 0:  # Ray Train 2 keeps no metrics without a checkpoint
        Path(config["rates_file"]).write_text(json.dumps(rates))


def measure_in_memory(cfg: Any, storage: str) -> list[float]:
    from ray.train import RunConfig
    from ray.train.torch import TorchTrainer

    from core.config import to_dict
    from training.distributed import torch_config
    from training.driver import scaling_config

    trainer = TorchTrainer(
        in_memory_loop,
        train_loop_config={"cfg": to_dict(cfg), "rates_file": f"{storage}/in_memory_rates.json"},
        scaling_config=scaling_config(cfg),
        run_config=RunConfig(name="in_memory", storage_path=storage),
        torch_config=torch_config(cfg.gpu),
    )
    trainer.fit()
    return json.loads(Path(f"{storage}/in_memory_rates.json").read_text())


def measure_shards(cfg: Any, data: str, out: str) -> tuple[list[float], list[float]]:
    """(steps/s, data-wait fraction) per interval of the real job on the shards."""
    from training.metrics import metric_history
    from training.syncnet_job import run

    result = run(cfg, data, out)
    uri, run_id = result["mlflow_tracking_uri"], result["mlflow_run_id"]
    rates = [v for _, v in metric_history(uri, run_id, "steps_per_s")]
    waits = [v for _, v in metric_history(uri, run_id, "data_wait_fraction")]
    return rates, waits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", help="a preprocess OUT (default: a cached synth corpus)")
    parser.add_argument("--interval", type=int, default=8, help="steps per measured interval")
    parser.add_argument("--intervals", type=int, default=3, help="measured intervals after the warm-up")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    from core.ray import ensure_ray
    from training.config import with_defaults
    from training.data import WindowConfig
    from training.driver import plan_resources
    from training.syncnet_job import SyncNetConfig

    data = corpus(args.data)
    # As `lipsync train` does (the workers' allocator); nothing to do if preprocessing the corpus started it
    ensure_ray(num_cpus=2)
    steps = args.interval * (args.intervals + 1)
    cfg = SyncNetConfig(
        steps=steps, batch_size=args.batch_size, log_every=args.interval, checkpoint_every=steps,
        eval_clips=0, windows=WindowConfig(windows_per_clip=32),
    )  # fmt: skip
    cfg = plan_resources(with_defaults(cfg), "benchmark")  # the sizes `lipsync train` would run with
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        memory = measure_in_memory(cfg, tmp)[1:]
        shard_rates, waits = measure_shards(cfg, data, f"{tmp}/shards")
        wall = time.perf_counter() - started
    shard_rates, waits = shard_rates[1:], waits[1:]
    result = {
        "batch_size": args.batch_size,
        "steps_per_interval": args.interval,
        "in_memory_steps_per_s": memory,
        "shards_steps_per_s": shard_rates,
        "shards_data_wait_fraction": waits,
        "ratio": statistics.median(shard_rates) / statistics.median(memory),
        "target": 0.95,
        "wall_seconds": round(wall, 1),
        "data": data,
    }
    print(f"in-memory tensors: {statistics.median(memory):.3f} steps/s  (intervals {memory})")
    print(f"real shards:       {statistics.median(shard_rates):.3f} steps/s  (intervals {shard_rates})")
    print(f"data wait share on shards: {waits}")
    print(f"ratio shards / in-memory: {result['ratio']:.3f} (target >= 0.95)")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "train_input.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
