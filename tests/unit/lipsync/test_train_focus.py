"""`lipsync train ... --focus MANIFEST` passes `lipsync select`'s manifest to training as `focus.manifest`,
and the fine-tune command `lipsync select` prints is one the real parser accepts."""

from __future__ import annotations

import shlex

import pytest

from core.config import load_config
from evaluation.select import next_command
from lipsync.cli import build_parser, train_overrides
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
