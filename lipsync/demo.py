"""`lipsync demo OUT`: the whole seed pipeline on a generated en/es/hi corpus and a local embedded Ray.

synth → preprocess → train SyncNet → train Wav2Lip → a 2-trial tune → generate lip-synced videos for new
speech in each language → score → report. Each step is the same `run(config)` the individual commands
call; the demo only chains them with demo-sized settings (configs/demo.yaml) and says where things went,
and what the next iteration would run (`lipsync select` of its scores, then `lipsync train wav2lip --focus`
on the selected clips), in its result and at the end of the report; it does not run them.
The models it trains are demo-sized: minutes of CPU, not the days of GPU a real model needs.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from scipy.io import wavfile

from core.config import load_config, to_dict
from core.errors import BadInput
from generation.config import GenerateConfig
from generation.config import validate as validate_generation
from pipeline.phonemes import VoiceStyle
from pipeline.preprocess_config import PreprocessConfig
from pipeline.synth import SynthConfig
from training.syncnet_job import SyncNetConfig
from training.wav2lip_job import Wav2LipConfig
from tuning.sweep import SweepConfig

log = logging.getLogger("lipsync.demo")

NEW_SPEECH_VOICE = VoiceStyle(variant="f4", rate_wpm=150)  # the demo corpus (seed 0: m1 f2 m3 f3) lacks it
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
DEMO_NOTE = (
    "Demo-sized models: trained for a few minutes on 2 CPU cores on a generated corpus of a few dozen "
    "clips. The numbers show that every stage runs end to end, not what a real model reaches."
)


@dataclass(frozen=True)
class DemoConfig:
    """Demo-sized settings of every stage."""

    synth: SynthConfig = field(default_factory=lambda: SynthConfig(speakers=2, clips_per_speaker=3))
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    syncnet: SyncNetConfig = field(default_factory=lambda: SyncNetConfig(steps=60, batch_size=16))
    wav2lip: Wav2LipConfig = field(default_factory=lambda: Wav2LipConfig(steps=20, batch_size=4))
    tune: SweepConfig = field(default_factory=lambda: SweepConfig(trials=2, steps=10))
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    pairs_per_language: int = 1
    new_speech_sentences: int = 3  # sentences of new speech per pair, joined into one utterance
    new_speech_seed: int = 1000


def _step(name: str, timings: dict[str, float], fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    start = time.perf_counter()
    log.info("demo: %s ...", name)
    result = fn(*args, **kwargs)
    timings[name] = round(time.perf_counter() - start, 1)
    log.info("demo: %s done in %.1f s", name, timings[name])
    return result


def check(cfg: DemoConfig) -> None:
    """BadInput naming the first bad demo-level setting. Run before the first stage: the new speech and
    the generation settings are only used after ~10 minutes of training, too late to find a typo."""
    if cfg.new_speech_sentences < 1:
        raise BadInput(f"new_speech_sentences must be >= 1, not {cfg.new_speech_sentences}")
    validate_generation(cfg.generate)


def new_speech_text(language: str, count: int, rng: np.random.Generator) -> str:
    """`count` held-out sentences of `language` in order, or, where it has none, `count` of the sentences the
    generated corpus speaks, drawn with `rng`."""
    from pipeline.sentences import HELD_OUT_SENTENCES, SENTENCES

    if language in HELD_OUT_SENTENCES:
        return " ".join(HELD_OUT_SENTENCES[language][:count])
    sentences = SENTENCES[language]
    picked = rng.choice(len(sentences), min(count, len(sentences)), replace=False)
    return " ".join(sentences[int(k)] for k in picked)


def new_speech_pairs(corpus: Path, clips_parquet: Path, out: Path, cfg: DemoConfig) -> Path:
    """A pairs manifest: a val-split face video per language with new espeak-ng speech in that language
    (`new_speech_sentences` sentences: one sentence is about 3 s, too short for the landmark meter to be
    confident and under generation's `post.min_seconds`). The sentences are the language's first
    held-out ones, which the generated corpus never speaks; a language without them draws from the
    corpus's own sentences."""
    import pandas as pd

    from pipeline import phonemes

    check(cfg)
    clips = pd.read_parquet(clips_parquet)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    rng = np.random.default_rng(cfg.new_speech_seed)
    for language in cfg.synth.languages:
        # the first val source by path: the face is chosen by what the corpus holds, not by an id's hash
        mine = clips[clips["language"] == language].sort_values(["source", "clip_id"])
        preferred = mine[mine["split"] == "val"] if (mine["split"] == "val").any() else mine
        for i, source in enumerate(preferred["source"].drop_duplicates().head(cfg.pairs_per_language)):
            text = new_speech_text(language, cfg.new_speech_sentences, rng)
            speech = phonemes.synthesize(text, language, NEW_SPEECH_VOICE)
            wav = out / f"{language}-{i}.wav"
            wavfile.write(wav, speech.sample_rate, speech.pcm)
            rows.append(
                {
                    "id": f"{language}-{i}",
                    "video": source,
                    "audio": str(wav),
                    "language": language,
                    "transcript": text,
                }
            )
    manifest = out / "pairs.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["id", "video", "audio", "language", "transcript"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def next_iteration(root: Path, cfg: DemoConfig, syncnet: str, wav2lip: str) -> list[str]:
    """The next iteration's two command lines on this demo's outputs: `lipsync select` of its scores, then
    the fine-tune of its generator on the selected clips (its demo-sized settings written to
    ROOT/finetune_wav2lip.yaml, so that --init-from loads into a network of the same width)."""
    from evaluation.select import next_command, select_command

    settings = root / "finetune_wav2lip.yaml"
    settings.write_text(yaml.safe_dump(to_dict(cfg.wav2lip), sort_keys=False))
    selection = root / "select"
    return [
        select_command(str(root / "scores"), str(selection)),
        next_command(
            str(selection / "manifest.csv"),
            data=str(root / "preprocessed"),
            train_out=str(root / "wav2lip_focus"),
            syncnet=syncnet,
            init_from=wav2lip,
            extra=("--config", str(settings)),
        ),
    ]


def run(out: str, config_path: str | None = None, address: str | None = None) -> dict[str, Any]:
    """Run every stage in order into `out`; returns the paths written (the report last)."""
    from core.ray import ensure_ray
    from evaluation.report import run as report
    from evaluation.score import run as score
    from evaluation.score_config import ScoreConfig
    from generation.run import run as generate
    from pipeline.preprocess import run as preprocess
    from pipeline.synth import run as synth
    from training.syncnet_job import run as train_syncnet
    from training.wav2lip_job import run as train_wav2lip
    from tuning.sweep import run as tune

    cfg = load_config(DemoConfig, config_path or DEMO_CONFIG)
    check(cfg)
    root = Path(out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    ensure_ray(address)
    corpus = root / "corpus"
    data = root / "preprocessed"
    _step("synth", timings, synth, cfg.synth, str(corpus), address=address)
    _step("preprocess", timings, preprocess, cfg.preprocess, str(corpus), str(data), address=address)
    expert = _step(
        "train syncnet",
        timings,
        train_syncnet,
        cfg.syncnet,
        str(data),
        str(root / "syncnet"),
        address=address,
    )
    generator = _step(
        "train wav2lip",
        timings,
        train_wav2lip,
        cfg.wav2lip,
        str(data),
        str(root / "wav2lip"),
        expert["checkpoint"],
        address=address,
    )
    sweep = _step("tune", timings, tune, cfg.tune, str(data), str(root / "tune"), address=address)
    pairs = new_speech_pairs(corpus, data / "clips.parquet", root / "new_speech", cfg)
    generated = _step(
        "generate",
        timings,
        generate,
        cfg.generate,
        str(pairs),
        str(root / "generated"),
        generator["checkpoint"],
        address=address,
    )
    scores = _step(
        "score",
        timings,
        score,
        replace(ScoreConfig(), system="wav2lip-demo"),
        str(root / "generated"),
        str(root / "scores"),
        syncnet=expert["checkpoint"],
        address=address,
    )
    follow = next_iteration(root, cfg, expert["checkpoint"], generator["checkpoint"])
    reported = _step(
        "report",
        timings,
        report,
        str(root / "scores"),
        str(root / "report"),
        note=DEMO_NOTE,
        next_steps="\n".join(follow),
    )
    log.info("demo: finished in %.0f s: %s", sum(timings.values()), reported["report_html"])
    log.info(
        "demo: the next iteration (select the worst outputs' clips, fine-tune on them):\n  %s",
        "\n  ".join(follow),
    )
    print(reported["report_html"])
    return {
        "corpus": str(corpus / "manifest.csv"),
        "preprocessed": str(data),
        "syncnet": expert["checkpoint"],
        "syncnet_health": expert.get("health"),
        "wav2lip": generator["checkpoint"],
        "tune": sweep.get("best", str(root / "tune")),
        "generated": generated.get("outputs", str(root / "generated")),
        "scores": scores.get("scores", str(root / "scores")),
        "seconds": timings,
        "report": reported["report_html"],
        "next": follow,
    }
