"""The `lipsync` command: parses arguments, loads config and calls each stage's `run(config)`.

Exit codes: 0 done, 2 bad input or usage (one line naming what is wrong), 1 anything else (a run that stalled:
one line naming the stage and what it waited for).
With --json the last line on stdout is one JSON object; progress and human output go to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import traceback
from collections.abc import Callable
from typing import Any

from core.errors import BadInput, Stalled

Handler = Callable[[argparse.Namespace], dict[str, Any]]


class _Parser(argparse.ArgumentParser):
    """argparse that raises BadInput (exit 2, one line) instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise BadInput(f"{self.prog}: {message}")


def _common(p: argparse.ArgumentParser, ray: bool = False) -> None:
    p.add_argument("--config", help="YAML config file (defaults are used for missing keys)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout as the last line")
    if ray:
        p.add_argument("--address", help="Ray cluster address (default: start a local embedded Ray)")


def _flags(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """Config overrides from the command line flags of the same names (None: not given, the config's)."""
    return {name: getattr(args, name) for name in names}


def _synth(args: argparse.Namespace) -> dict[str, Any]:
    from core.config import load_config
    from pipeline.synth import SynthConfig, run

    names = ("languages", "speakers", "clips_per_speaker", "seconds", "offset_frames", "seed", "emotions")
    cfg = load_config(SynthConfig, args.config, _flags(args, *names))
    return run(cfg, args.out, address=args.address)


def _preprocess(args: argparse.Namespace) -> dict[str, Any]:
    from core.config import load_config
    from pipeline.preprocess import run
    from pipeline.preprocess_config import PreprocessConfig

    overrides = {"resources.workers": args.workers, "resources.cpus_per_worker": args.cpus_per_worker}
    return run(
        load_config(PreprocessConfig, args.config, overrides), args.input, args.out, address=args.address
    )


def _offset(args: argparse.Namespace) -> dict[str, Any]:
    from core.config import load_config
    from pipeline.meters import MeterConfig, build_meter
    from pipeline.offset import offset_of_video

    overrides = {"meter": args.meter, "weights": args.weights, "min_confidence": args.min_confidence}
    meter = build_meter(load_config(MeterConfig, args.config, overrides))
    return {
        "video": args.video,
        **offset_of_video(args.video, max_lag=args.max_lag, meter=meter).to_dict(curve=True),
    }


def _demo(args: argparse.Namespace) -> dict[str, Any]:
    from lipsync.demo import run

    return run(args.out, config_path=args.config, address=args.address)


def train_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config keys `lipsync train`'s flags set (None: not given, load_config skips it)."""
    return {
        "workers": args.workers,
        "cpus_per_worker": args.cpus_per_worker,
        "gpu": True if args.gpu else None,
        "steps": args.steps,
        "data.languages": args.languages,
        "data.speakers": args.speakers,
        "mlflow_tracking_uri": args.mlflow_uri,
        "focus.manifest": args.focus,
    }


def _train(args: argparse.Namespace) -> dict[str, Any]:
    from core.config import load_config

    overrides = train_overrides(args)
    if args.model == "syncnet":
        from training.syncnet_job import SyncNetConfig, run

        cfg = load_config(SyncNetConfig, args.config, overrides)
        return run(cfg, args.data, args.out, address=args.address, init_from=args.init_from)
    from training.wav2lip_job import Wav2LipConfig
    from training.wav2lip_job import run as run_wav2lip

    cfg = load_config(Wav2LipConfig, args.config, overrides)
    if args.allow_weak_expert:
        cfg = dataclasses.replace(cfg, expert_max_val_loss=None)
    return run_wav2lip(cfg, args.data, args.out, args.syncnet, address=args.address, init_from=args.init_from)


def _train_parser(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="train the expert SyncNet or the Wav2Lip generator on Ray Train")
    models = train.add_subparsers(dest="model", required=True, parser_class=_Parser)
    for model, text in (("syncnet", "the expert lip-sync discriminator"), ("wav2lip", "the generator")):
        p = models.add_parser(model, help=f"train {text} (resumes from the latest checkpoint in OUT)")
        p.add_argument("data", help="a preprocess OUT (clips.parquet + shards/), local or s3://")
        p.add_argument("out", help="checkpoints, Ray Train state and MLflow runs (local or s3://)")
        if model == "wav2lip":
            p.add_argument(
                "--syncnet", required=True, help="expert SyncNet checkpoint (dir, model.pt or OUT)"
            )
            p.add_argument(
                "--allow-weak-expert",
                action="store_true",
                help="use an expert whose val loss is above expert_max_val_loss (0.75, the reference's gate)",
            )
        p.add_argument("--workers", type=int, help="data-parallel workers (global batch is split over them)")
        p.add_argument("--cpus-per-worker", type=float, help="CPUs each worker reserves (default: fitted)")
        p.add_argument("--gpu", action="store_true", help="one GPU per worker: NCCL, AMP, pinned memory")
        p.add_argument("--steps", type=int, help="train until this global step")
        p.add_argument("--languages", help="comma-separated languages to train on (default: all)")
        p.add_argument("--speakers", help="comma-separated speakers to train on (default: all)")
        p.add_argument("--init-from", help="start from this checkpoint's weights (per-language fine-tuning)")
        p.add_argument(
            "--focus", metavar="MANIFEST", help="up-weight the clips of this manifest (from `lipsync select`)"
        )
        p.add_argument("--mlflow-uri", help="MLflow tracking URI (default: a file store under OUT)")
        _common(p, ray=True)
        p.set_defaults(handler=_train)


def _tune(args: argparse.Namespace) -> dict[str, Any]:
    from core.config import load_config
    from tuning.sweep import SweepConfig, run

    overrides = {"trials": args.trials, "steps": args.steps, "syncnet": args.syncnet}
    cfg = load_config(SweepConfig, args.config, overrides)
    return run(cfg, args.data, args.out, resume=args.resume, address=args.address)


def _tune_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="hyperparameter sweep of a training recipe on Ray Tune (ASHA, Optuna)")
    p.add_argument("data", help="a preprocess OUT (clips.parquet + shards/), local or s3://")
    p.add_argument("out", help="trials.parquet, best.yaml, metric_vs_step.png, Tune state (local or s3://)")
    p.add_argument("--trials", type=int, help="samples drawn from the search space")
    p.add_argument("--steps", type=int, help="training steps per trial (unless the space tunes steps)")
    p.add_argument("--syncnet", help="wav2lip sweeps: the expert SyncNet checkpoint")
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep in OUT")
    _common(p, ray=True)
    p.set_defaults(handler=_tune)


def _generate(args: argparse.Namespace) -> dict[str, Any]:
    from core.config import load_config
    from generation.config import GenerateConfig
    from generation.run import run

    cfg = load_config(GenerateConfig, args.config, {"calibration": args.calibration})
    return run(cfg, args.pairs, args.out, args.checkpoint, address=args.address)


def _generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="lip-synced videos for a manifest of video + audio pairs (Ray Data)")
    p.add_argument("pairs", help="manifest (.csv/.jsonl/.parquet): video, audio, optional language, id")
    p.add_argument("out", help="output directory: videos/<id>.mp4 and outputs.parquet (local or s3://)")
    p.add_argument("--checkpoint", required=True, help="wav2lip checkpoint (dir, model.pt or training OUT)")
    p.add_argument("--calibration", help="per-language timing JSON (default: config's calibration)")
    _common(p, ray=True)
    p.set_defaults(handler=_generate)


def _score(args: argparse.Namespace) -> dict[str, Any]:
    from core.config import load_config
    from evaluation.score import run
    from evaluation.score_config import ScoreConfig

    overrides = {
        "resources.workers": args.workers,
        "resources.cpus_per_worker": args.cpus_per_worker,
        "system": args.system,
    }
    cfg = load_config(ScoreConfig, args.config, overrides)
    return run(
        cfg,
        args.input,
        args.out,
        syncnet=args.syncnet,
        syncnet_v2=args.syncnet_v2,
        reference=args.reference,
        calibration_out=args.calibration_out,
        address=args.address,
    )


def _report(args: argparse.Namespace) -> dict[str, Any]:
    from evaluation.report import run

    return run(args.scores, args.out, mos=args.mos, config_path=args.config)


def _select(args: argparse.Namespace) -> dict[str, Any]:
    from core.config import load_config
    from evaluation.select import SelectConfig, run

    overrides = _flags(args, "metric", "worst", "below", "above") | {"languages": args.language}
    return run(load_config(SelectConfig, args.config, overrides), args.scores, args.out)


def _select_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "select", help="the source clips of the worst outputs, as a manifest for `lipsync train --focus`"
    )
    p.add_argument("scores", help="a `lipsync score` OUT directory or its scores.parquet")
    p.add_argument("out", help="output directory: manifest.csv (one row per source video) and select.json")
    p.add_argument(
        "--worst",
        help="keep the worst N%% (e.g. 20%%) or the worst N (e.g. 15) outputs by --metric "
        "(default: 20%% unless --below/--above is given)",
    )
    p.add_argument(
        "--metric",
        help="scores column to rank and threshold by (default: landmark_offset_frames, the model-free AV "
        "offset every scored row has and the report ranks its worst clips by; |value| for offsets)",
    )
    p.add_argument("--language", help="comma-separated languages to select from (default: all)")
    p.add_argument(
        "--below",
        type=float,
        metavar="X",
        help="keep outputs whose --metric (|value| for offsets) is below X",
    )
    p.add_argument(
        "--above",
        type=float,
        metavar="X",
        help="keep outputs whose --metric (|value| for offsets) is above X",
    )
    _common(p)
    p.set_defaults(handler=_select)


def _evaluation_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="objective lip-sync and quality scores of many videos (Ray actor pool)")
    p.add_argument("input", help="videos directory, manifest (.csv/.jsonl/.parquet) or generation's outputs")
    p.add_argument("out", help="output directory: scores.parquet and summary.json (local or s3://)")
    p.add_argument("--syncnet", help="our expert SyncNet checkpoint: adds LSE-D/LSE-C (lse_*)")
    p.add_argument("--syncnet-v2", help="joonson/syncnet_python's syncnet_v2.model: standard LSE-D/LSE-C")
    p.add_argument("--reference", help="manifest of reference videos for PSNR/SSIM: id or video, reference")
    p.add_argument("--calibration-out", help="write the per-language timing calibration from these scores")
    p.add_argument("--workers", type=int, help="scoring actors (default: as many as the cluster holds)")
    p.add_argument("--cpus-per-worker", type=float, help="CPUs each scoring actor reserves (default: 0.9)")
    p.add_argument("--system", help="system name of rows without a `system` column (default: input name)")
    _common(p, ray=True)
    p.set_defaults(handler=_score)

    p = sub.add_parser("report", help="report.json and a self-contained report.html from scores")
    p.add_argument("scores", help="a `lipsync score` OUT directory or its scores.parquet")
    p.add_argument("out", help="output directory")
    p.add_argument("--mos", help="MOS results JSON (`lipsync mos results`) folded into the overall score")
    _common(p)
    p.set_defaults(handler=_report)
    _select_parser(sub)


def _mos(args: argparse.Namespace) -> dict[str, Any]:
    if args.action == "create":
        from evaluation.mos.study import run_create

        return run_create(args)
    if args.action == "serve":
        from evaluation.mos.app import serve

        return serve(args.study_dir, host=args.host, port=args.port)
    from evaluation.mos.results import run

    result = run(args.study_dir, print_json=not args.json)  # without --json: the JSON on stdout, pretty
    return result if args.json else {"results": result["path"]}


def _mos_parser(sub: argparse._SubParsersAction) -> None:
    mos = sub.add_parser("mos", help="blind MOS rating studies: create, serve the rating page, results")
    actions = mos.add_subparsers(dest="action", required=True, parser_class=_Parser)
    p = actions.add_parser("create", help="a balanced, blind study from generation outputs; prints links")
    p.add_argument("study_dir", help="new study directory (study.json, media/, ratings.sqlite, links.txt)")
    p.add_argument(
        "--from",
        dest="sources",
        nargs="+",
        default=[],
        metavar="OUTPUTS",
        help="generation OUT dirs / outputs.parquet / manifests, optionally NAME=PATH",
    )
    p.add_argument("--reference", metavar="MANIFEST", help="real videos: manifest, [NAME=]PATH")
    p.add_argument("--raters", type=int, default=5, help="number of rater links")
    p.add_argument("--clips-per-rater", type=int, help="videos per rater (default: distinct contents)")
    p.add_argument("--seed", type=int, default=0, help="seed of the assignment and order")
    p.add_argument("--host", default="127.0.0.1", help="host in the printed links")
    p.add_argument("--port", type=int, default=8000, help="port in the printed links")
    p.add_argument("--base-url", help="link prefix instead of http://HOST:PORT (e.g. behind a proxy)")
    p.add_argument(
        "--criteria",
        help="questions per video: sync,realism,naturalness (default), plus the optional emotion",
    )
    _common(p)
    p = actions.add_parser("serve", help="serve the rating page (binds loopback unless told otherwise)")
    p.add_argument("study_dir")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    _common(p)
    p = actions.add_parser("results", help="MOS, 95%% CIs, rater agreement -> STUDY_DIR/mos_results.json")
    p.add_argument("study_dir")
    _common(p)
    for p in actions.choices.values():
        p.set_defaults(handler=_mos)


def build_parser() -> argparse.ArgumentParser:
    """The full command-line grammar (DESIGN.md's contract)."""
    parser = _Parser(prog="lipsync", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("synth", help="generate a multilingual talking-face corpus with known timing")
    p.add_argument("out", help="output directory")
    p.add_argument("--languages", help="comma-separated espeak-ng languages, e.g. en,es,hi")
    p.add_argument("--speakers", type=int, help="speakers per language")
    p.add_argument("--clips-per-speaker", type=int)
    p.add_argument("--seconds", type=float, help="clip length in seconds")
    p.add_argument("--offset-frames", type=int, help="delay (K>0) or advance (K<0) the audio by K frames")
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--emotions", help="base expressions given to the clips in turn: neutral,happy,sad,surprised"
    )
    _common(p, ray=True)
    p.set_defaults(handler=_synth)

    p = sub.add_parser("preprocess", help="corpus -> aligned Parquet shards on Ray Data (resumable)")
    p.add_argument("input", help="directory, manifest (.csv/.jsonl/.parquet) or s3:// prefix")
    p.add_argument("out", help="output directory or s3:// prefix")
    p.add_argument("--workers", type=int, help="preprocessing actors (default: as many as the cluster holds)")
    p.add_argument("--cpus-per-worker", type=float, help="CPUs each actor reserves (default: 0.9)")
    _common(p, ray=True)
    p.set_defaults(handler=_preprocess)

    p = sub.add_parser("offset", help="AV offset of one video (frames; > 0: audio lags), or an abstention")
    p.add_argument("video")
    p.add_argument("--max-lag", type=int, default=15, help="search offsets within +-N frames")
    p.add_argument("--meter", help="landmarks (default, model-free) | syncnet_v2 | expert")
    p.add_argument("--weights", help="syncnet_v2.model file, or a `lipsync train syncnet` checkpoint")
    p.add_argument("--min-confidence", type=float, help="abstain below this (default: the meter's own)")
    _common(p)
    p.set_defaults(handler=_offset)

    p = sub.add_parser("demo", help="the whole pipeline on a generated corpus and a local Ray")
    p.add_argument("out", help="output directory")
    _common(p, ray=True)
    p.set_defaults(handler=_demo)

    _train_parser(sub)
    _tune_parser(sub)
    _generate_parser(sub)
    _evaluation_parsers(sub)
    _mos_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lipsync` console script."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    want_json = "--json" in (argv if argv is not None else sys.argv[1:])
    try:
        args = build_parser().parse_args(argv)
        result = args.handler(args)
    except BadInput as exc:
        print(f"lipsync: error: {exc}", file=sys.stderr)
        if want_json:
            print(json.dumps({"error": str(exc), "exit_code": 2}))
        return 2
    except Stalled as exc:
        print(f"lipsync: stalled: {exc}", file=sys.stderr)
        if want_json:
            print(json.dumps({"error": f"stalled: {exc}", "exit_code": 1}))
        return 1
    except KeyboardInterrupt:
        print("lipsync: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence: report and exit 1
        traceback.print_exc(file=sys.stderr)
        if want_json:
            print(json.dumps({"error": f"{type(exc).__name__}: {exc}", "exit_code": 1}))
        return 1
    if want_json:
        print(json.dumps(result, default=str))
    else:
        for key, value in result.items():
            print(f"{key}: {value}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
