"""`lipsync train ... --focus MANIFEST` passes `lipsync select`'s manifest to training as `focus.manifest`,
and the follow-up commands `lipsync select` and the demo print are ones the real parser accepts."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from core.config import load_config
from evaluation.select import next_command
from lipsync.cli import build_parser, train_overrides
from lipsync.demo import DEMO_CONFIG, DemoConfig, next_iteration
from training.syncnet_job import SyncNetConfig
from training.wav2lip_job import Wav2LipConfig


@pytest.mark.parametrize("model", ["syncnet", "wav2lip"])
def test_focus_becomes_the_focus_manifest_override(model: str) -> None:
    expert = ["--syncnet", "EXPERT"] if model == "wav2lip" else []
    args = build_parser().parse_args(["train", model, "DATA", "OUT", *expert, "--focus", "/sel/manifest.csv"])
    assert train_overrides(args)["focus.manifest"] == "/sel/manifest.csv"


@pytest.mark.parametrize(("model", "cls"), [("syncnet", SyncNetConfig), ("wav2lip", Wav2LipConfig)])
def test_without_focus_no_focus_key_is_set(model: str, cls: type) -> None:
    expert = ["--syncnet", "EXPERT"] if model == "wav2lip" else []
    args = build_parser().parse_args(["train", model, "DATA", "OUT", *expert, "--steps", "7"])
    overrides = train_overrides(args)
    assert overrides["focus.manifest"] is None
    assert load_config(cls, None, overrides).steps == 7  # None overrides are skipped: the config loads


def test_the_printed_fine_tune_command_parses() -> None:
    manifest = "/runs/select it/manifest.csv"  # a space: the command line quotes it
    command = next_command(manifest)
    words = shlex.split(command)
    assert words[0] == "lipsync"
    args = build_parser().parse_args(words[1:])
    assert (args.command, args.model, args.data, args.out) == ("train", "wav2lip", "DATA", "TRAIN_OUT")
    assert (args.syncnet, args.focus, args.init_from) == ("EXPERT", manifest, "CHECKPOINT")


def test_the_demo_names_its_next_iteration_with_its_own_paths(tmp_path: Path) -> None:
    cfg = load_config(DemoConfig, DEMO_CONFIG)
    select, train = next_iteration(tmp_path, cfg, "/demo/syncnet/model.pt", "/demo/wav2lip/model.pt")
    sel = build_parser().parse_args(shlex.split(select)[1:])
    assert (sel.command, sel.scores, sel.out) == (
        "select",
        str(tmp_path / "scores"),
        str(tmp_path / "select"),
    )
    args = build_parser().parse_args(shlex.split(train)[1:])
    assert (args.model, args.data) == ("wav2lip", str(tmp_path / "preprocessed"))
    assert args.focus == str(tmp_path / "select" / "manifest.csv")  # what the select above writes
    assert (args.syncnet, args.init_from) == ("/demo/syncnet/model.pt", "/demo/wav2lip/model.pt")
    # the fine-tune runs with the demo's generator settings (its width: --init-from loads into the same net)
    assert load_config(Wav2LipConfig, args.config) == cfg.wav2lip
