"""A finished sweep's results from Tune's ResultGrid: OUT/trials.parquet, OUT/best.yaml, OUT/metric_vs_step.png.

trials.parquet has one row per trial: `trial_id`, `status` (TERMINATED: ran all its steps; EARLY_STOPPED:
stopped by the scheduler before them; ERROR), `diverged`, `steps_done`, `max_steps`, `final_<metric>` and
`best_<metric>` (with `best_step`), the last train/val metrics, the sampled parameters (`config` as JSON
and one `param_<name>` column each), `time_s`, `runs` (processes that trained it: 1 unless it was
resumed) with their `start_steps`, the trial's last `checkpoint` and its `error`.

best.yaml is the training config (the recipe's dataclass, every key) of the trial with the best final
metric, trained for the steps that trial ran: `lipsync train <target> DATA OUT --config best.yaml`.
"""

from __future__ import annotations

import io
import json
import math
from typing import Any

import pandas as pd
import pyarrow as pa
import yaml

from core.config import from_dict, to_dict
from core.storage import Store
from training.recipe import config_class
from tuning.space import METRICS, PARAMS, apply
from tuning.trial import TrialSetup

TRIALS_FILE = "trials.parquet"
BEST_FILE = "best.yaml"
PLOT_FILE = "metric_vs_step.png"
LAST_METRICS = ("train_loss", "val_loss", "val_accuracy", "val_l1", "val_sync")


def history(result: Any) -> pd.DataFrame:
    """The trial's reports in order (empty when it never reported)."""
    df = result.metrics_dataframe
    if df is None or df.empty or "step" not in df:
        return pd.DataFrame(columns=["step"])
    return df.sort_values(["step", "timestamp"] if "timestamp" in df else ["step"], kind="stable")


def trial_id(result: Any) -> str:
    """Trial directories are named by trial id (sweep.trial_dirname)."""
    return (result.metrics or {}).get("trial_id") or str(result.path).rstrip("/").rsplit("/", 1)[-1]


def trial_row(result: Any, metric: str, mode: str, default_steps: int) -> dict[str, Any]:
    """One row of trials.parquet."""
    h, last = history(result), result.metrics or {}
    params = {k: v for k, v in (result.config or {}).items() if k in PARAMS}
    steps_done = int(h["step"].max()) if len(h) else 0
    max_steps = int(params.get("steps", default_steps))
    values = h[metric].dropna() if metric in h else pd.Series(dtype=float)
    best_at = (values.idxmin() if mode == "min" else values.idxmax()) if len(values) else None
    runs = h.drop_duplicates("run_started_at") if "run_started_at" in h else h.iloc[:0]
    if result.error is not None:
        status = "ERROR"
    else:
        status = "TERMINATED" if steps_done >= max_steps else "EARLY_STOPPED"
    return {
        "trial_id": trial_id(result),
        "status": status,
        "diverged": bool(last.get("diverged", 0)),
        "steps_done": steps_done,
        "max_steps": max_steps,
        f"final_{metric}": float(values.iloc[-1]) if len(values) else math.nan,
        f"best_{metric}": float(values[best_at]) if best_at is not None else math.nan,
        "best_step": int(h.loc[best_at, "step"]) if best_at is not None else None,
        **{f"last_{k}": float(last[k]) for k in LAST_METRICS if isinstance(last.get(k), (int, float))},
        "config": json.dumps(params, sort_keys=True),
        **{f"param_{k}": v for k, v in params.items()},
        "time_s": float(last.get("time_total_s", math.nan)),
        "runs": len(runs),
        "start_steps": [int(s) for s in runs["start_step"]] if len(runs) else [],
        "checkpoint": result.checkpoint.path if result.checkpoint is not None else None,
        "error": str(result.error).strip().splitlines()[-1][:500] if result.error is not None else None,
    }


def trial_table(grid: Any, metric: str, mode: str, default_steps: int) -> pd.DataFrame:
    """trials.parquet's rows, by trial id."""
    rows = [trial_row(r, metric, mode, default_steps) for r in grid]
    return pd.DataFrame(rows).sort_values("trial_id", ignore_index=True)


def pick_best(table: pd.DataFrame, metric: str, mode: str) -> pd.Series | None:
    """The trial with the best final metric among those that did not fail or diverge."""
    ok = table[(table["status"] != "ERROR") & ~table["diverged"] & table[f"final_{metric}"].notna()]
    if ok.empty:
        return None
    column = ok[f"final_{metric}"]
    return ok.loc[column.idxmin() if mode == "min" else column.idxmax()]


def best_config(setup: TrialSetup, best: pd.Series) -> dict[str, Any]:
    """The full training config of the best trial, for the steps it ran."""
    params = json.loads(best["config"])
    d = apply(setup.base, params) | {"steps": int(best["steps_done"])}
    return to_dict(from_dict(config_class(setup.target), d))


def best_yaml(cfg_dict: dict[str, Any], best: pd.Series, metric: str, target: str) -> str:
    """best.yaml's text: a header saying where it comes from, then the config."""
    header = (
        f"# best trial {best['trial_id']} of a `lipsync tune` sweep: final {metric} "
        f"{best[f'final_{metric}']:.6g} at step {best['steps_done']}\n"
        f"# lipsync train {target} DATA OUT --config best.yaml"
        + (" --syncnet CKPT" if target == "wav2lip" else "")
        + "\n"
    )
    return header + yaml.safe_dump(cfg_dict, sort_keys=False)


def plot_png(grid: Any, table: pd.DataFrame, metric: str) -> bytes:
    """The metric against the training step, one line per trial; a diverged trial's penalty values are
    left out and its divergence marked by a dotted vertical line (log scale when values span decades)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    status = dict(zip(table["trial_id"], table["status"], strict=True))
    fig, ax = plt.subplots(figsize=(8, 5))
    values: list[float] = []
    for result in grid:
        h = history(result)
        if metric not in h:
            continue
        tid = trial_id(result)
        label = f"{tid} ({status.get(tid, '?')})"
        diverged = h["diverged"].astype(bool) if "diverged" in h else pd.Series(False, index=h.index)
        ok = h[~diverged & h[metric].notna()]
        line = ax.plot(ok["step"], ok[metric], marker="o", markersize=3, label=label)[0]
        if diverged.any():
            at = h.loc[diverged, "step"].min()
            ax.axvline(at, color=line.get_color(), linestyle=":", label=f"{tid} diverged at step {at}")
        values.extend(ok[metric].tolist())
    positive = [v for v in values if v > 0]
    if positive and len(positive) == len(values) and max(positive) / min(positive) > 20:
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("training step")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per trial")
    if len(grid):
        ax.legend(fontsize=7, loc="best")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def write_results(grid: Any, cfg: Any, setup: TrialSetup, out: str) -> dict[str, Any]:
    """Write the three result files under OUT; returns their paths and the best trial."""
    mode = METRICS[cfg.target][cfg.metric]
    table = trial_table(grid, cfg.metric, mode, cfg.steps)
    store = Store(out)
    store.write_table(TRIALS_FILE, pa.Table.from_pandas(table, preserve_index=False))
    store.write_bytes(PLOT_FILE, plot_png(grid, table, cfg.metric))
    summary: dict[str, Any] = {
        "trials": store.uri(TRIALS_FILE),
        "plot": store.uri(PLOT_FILE),
        "statuses": {k: int(v) for k, v in table["status"].value_counts().items()},
    }
    best = pick_best(table, cfg.metric, mode)
    if best is None:
        return summary | {"best": None}
    cfg_dict = best_config(setup, best)
    store.write_bytes(BEST_FILE, best_yaml(cfg_dict, best, cfg.metric, cfg.target).encode())
    return summary | {
        "best": store.uri(BEST_FILE),
        "best_trial": best["trial_id"],
        f"best_{cfg.metric}": float(best[f"final_{cfg.metric}"]),
        "best_params": json.loads(best["config"]),
        "best_steps": int(best["steps_done"]),
    }
