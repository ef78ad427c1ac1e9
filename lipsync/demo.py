"""`lipsync demo OUT`: the whole seed pipeline on a generated en/es/hi corpus and a local embedded Ray.

Each step is the same `run(config)` the individual commands call; the demo only chains them with
demo-sized settings and prints where everything went.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from lipsync.config import load_config

log = logging.getLogger("lipsync.demo")


def _step(name: str, results: dict[str, Any], fn, *args, **kwargs) -> Any:  # noqa: ANN001
    start = time.perf_counter()
    log.info("demo: %s ...", name)
    out = fn(*args, **kwargs)
    results.setdefault("seconds", {})[name] = round(time.perf_counter() - start, 1)
    log.info("demo: %s done in %.1f s", name, results["seconds"][name])
    return out


def run(out: str, config_path: str | None = None, address: str | None = None) -> dict[str, Any]:
    """Run every stage that exists, in order, into `out`; returns the paths written."""
    from pipeline.synth import SynthConfig
    from pipeline.synth import run as synth

    root = Path(out)
    results: dict[str, Any] = {"out": str(root)}
    synth_cfg = load_config(
        SynthConfig, None, {"languages": "en,es,hi", "speakers": 2, "clips_per_speaker": 2}
    )
    corpus = _step("synth", results, synth, synth_cfg, str(root / "corpus"), address=address)
    results["corpus"] = corpus["manifest"]
    return results
