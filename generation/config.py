"""Generation's configuration: the model, Ray resources per step, finishing (encoding, stabilisation,
AV-offset correction), and its validation."""

from __future__ import annotations

from dataclasses import dataclass, field

from core.errors import BadInput
from core.ray import (
    check_poll_seconds,
)
from generation.blend import BLEND_REGIONS, BlendConfig
from generation.extension import EXTENSION_MODES
from pipeline.media.encoding import resolve_stabiliser
from pipeline.meters import MeterConfig, build_meter

PARTS_DIR = "_parts"
REFERENCE_MODES = ("same", "shifted")


WORK_DIR = "_work"


VIDEOS_DIR = "videos"


@dataclass(frozen=True)
class ModelConfig:
    """The generator's actor pool."""

    device: str = "auto"  # auto (GPU when the cluster or this machine has one) | cpu | cuda
    actors: int = 1
    gpus_per_actor: float = 1.0
    cpus_per_actor: float | None = None  # None: 1.0, less when the cluster cannot hold every stage at once
    threads: int = 0  # torch threads of a CPU actor; 0: the node's CPUs shared among the pool's actors
    batch_size: int = 32  # frames per forward pass
    rows_per_batch: int = 1  # chunks per actor call; raise it on a GPU to fill batches
    half: bool = False  # fp16 autocast on CUDA


@dataclass(frozen=True)
class ResourcesConfig:
    """Sizing of the CPU stages and of Ray Data's buffers."""

    prepare_actors: int = 1
    prepare_cpus: float | None = None  # None: 0.5 (the CPU amounts left to defaults shrink together when
    composite_actors: int = 1  # the cluster cannot hold every stage at once; core.plan)
    composite_cpus: float | None = None  # None: 0.25
    finalize_actors: int = 1  # per-pair join + mux; started with the pipeline, so warm when a pair ends
    finalize_cpus: float | None = None  # None: 0.25
    finalize_restarts: int = 2  # a finalize actor killed mid-pair restarts and retries the pair
    object_store_mb: int = 256  # Ray Data's object-store budget for in-flight chunks (0: Ray's default)
    source_cache_files: int = 4  # remote source videos a composite actor keeps on local disk
    poll_seconds: float = 0.5  # Ray Data's driver loop interval (Ray: 0.1); chunks take seconds each
    stall_seconds: float = 600.0  # no chunk done for this long fails the run, naming the stage (0: never)


DEFAULT_CPUS = {"model": 1.0, "prepare": 0.5, "composite": 0.25, "finalize": 0.25}
"""CPUs of each stage's actors when the config leaves them to the plan (at most these)."""


@dataclass(frozen=True)
class PostprocessConfig(MeterConfig):
    """Encoding, stabilisation and AV-offset correction of the finished video.

    The output's offset is read by `meter` (landmarks | syncnet_v2 | expert with `weights`; see
    pipeline.meters) and corrected only when the meter does not abstain (`min_confidence`, None: the
    meter's own threshold) and the correction moves the re-measured offset toward 0.
    """

    crf: int = 16  # x264 quality of the chunks (and of the stabilised re-encode)
    preset: str = "veryfast"
    audio_bitrate: str = "192k"
    stabilise: str = "off"  # off | auto (vidstab when this ffmpeg has it, else deshake) | vidstab | deshake
    measure_offset: bool = True  # track the generated mouth and estimate the output's AV offset
    correct_offset: bool = True  # shift the audio when the estimate is confident and large enough
    min_seconds: float = 6.0  # shorter outputs are measured but never corrected (too few mouth movements)
    measure_seconds: float = 60.0  # only the output's first seconds are tracked for the estimate (0: all)
    min_abs_offset: int = 2  # frames; smaller measured offsets are left alone (estimator noise)
    max_abs_offset: int = 8  # frames; larger ones are not trusted
    max_lag: int = 15


@dataclass(frozen=True)
class GenerateConfig:
    """Everything `lipsync generate` does; defaults are the reference's numbers."""

    chunk_seconds: float = 2.0  # output frames per row
    track_max_side: int = 720  # frames are tracked and cropped at most this large (longer side)
    extension: str = "pingpong"  # audio longer than the video: pingpong | loop | freeze
    # The generator's reference input. same: each frame itself (the reference's inference); shifted: a frame
    # about half a chunk away in the same shot, as in training, where the reference window is never the
    # target's, so the source's own mouth (open or closed with the *source's* speech) is not copied.
    reference: str = "same"
    calibration: str | None = None  # JSON of per-language/speaker mel offsets (generation/calibration.py)
    landmarker_model: str | None = None  # a face_landmarker.task; default: mediapipe's bundled FaceMesh
    scene_cut_threshold: float = 0.15  # a shot cut restarts tracking: as preprocessing's (PreprocessConfig)
    scene_cut_content_threshold: float = 27.0
    model: ModelConfig = field(default_factory=ModelConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    blend: BlendConfig = field(default_factory=BlendConfig)
    post: PostprocessConfig = field(default_factory=PostprocessConfig)


def validate(cfg: GenerateConfig) -> None:
    """BadInput naming the first bad setting."""
    if cfg.blend.region not in BLEND_REGIONS:
        raise BadInput(f"blend.region must be one of {', '.join(BLEND_REGIONS)}, not {cfg.blend.region!r}")
    if cfg.reference not in REFERENCE_MODES:
        raise BadInput(f"reference must be one of {', '.join(REFERENCE_MODES)}, not {cfg.reference!r}")
    if cfg.extension not in EXTENSION_MODES:
        raise BadInput(f"extension must be one of {', '.join(EXTENSION_MODES)}, not {cfg.extension!r}")
    if cfg.model.device not in ("auto", "cpu", "cuda"):
        raise BadInput(f"model.device must be auto, cpu or cuda, not {cfg.model.device!r}")
    try:
        resolve_stabiliser(cfg.post.stabilise)
    except ValueError as exc:
        raise BadInput(f"post.stabilise: {exc}") from exc
    if not 0 < cfg.scene_cut_threshold < 1 or cfg.scene_cut_content_threshold <= 0:
        raise BadInput("scene_cut_threshold must be in (0, 1) and scene_cut_content_threshold > 0")
    if cfg.chunk_seconds <= 0 or cfg.track_max_side < 64:
        raise BadInput("chunk_seconds must be > 0 and track_max_side >= 64")
    counts = (cfg.model.actors, cfg.model.batch_size, cfg.model.rows_per_batch)
    res = cfg.resources
    if min(counts) < 1 or min(res.prepare_actors, res.composite_actors, res.finalize_actors) < 1:
        raise BadInput("actor counts, model.batch_size and model.rows_per_batch must be >= 1")
    post = cfg.post
    if post.measure_seconds < 0 or 0 < post.measure_seconds < post.min_seconds:
        raise BadInput(
            f"post.measure_seconds must be 0 (the whole output) or >= post.min_seconds ({post.min_seconds}),"
            f" not {post.measure_seconds}"
        )
    post.validate("post.meter")
    if post.meter != "landmarks" and post.measure_offset:
        build_meter(post)  # unreadable or wrong weights fail here, before any worker starts
    check_poll_seconds(cfg.resources.poll_seconds)
    amounts = (cfg.model.cpus_per_actor, res.prepare_cpus, res.composite_cpus, res.finalize_cpus)
    if any(a is not None and a < 0 for a in amounts) or res.stall_seconds < 0:
        raise BadInput("CPU amounts and resources.stall_seconds must be >= 0")
