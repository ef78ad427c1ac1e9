"""Preprocessing's configuration: alignment (the AV-sync meter and what to do with its offsets), the
actor pool's resources, and the whole `PreprocessConfig`; the state/shard layout of an output folder."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from core.errors import BadInput
from core.ray import check_poll_seconds
from pipeline import filters
from pipeline.meters import MeterConfig

STATE_DIR = "_state"


SHARD_DIR = "shards"


TOOL_RETRIES = 2  # extra attempts at an input whose ffmpeg/ffprobe was killed by a signal


# One status row per input (ClipPreprocessor's output). Calls overlap within an actor, so its time and
# CPU are summed per `worker_pid` over the span of its calls, not per input (pipeline.preprocess).
STATUS_COLUMNS = (
    "input_id",
    "accepted",
    "rejected",
    "frames",
    "worker_pid",
    "cpu_at_start",  # the worker's CPU seconds so far, its finished ffmpeg children included
    "cpu_at_finish",
    "started_at",
    "finished_at",
    "peak_rss_mb",
)


@dataclass(frozen=True)
class AlignConfig(MeterConfig):
    """Which meter measures each clip's AV offset (landmarks | syncnet_v2 | expert, with `weights` for the
    last two; `min_confidence` None: the meter's own threshold), and what to do with a confident reading:
    keep it, repair it (shift the audio to 0) or reject the clip beyond `max_abs_offset`. A reading the
    meter abstains on is never repaired; `on_abstain: reject` drops such clips (low_sync_confidence)."""

    mode: str = "keep"  # keep | repair | reject
    max_abs_offset: int = 6  # frames; `reject` drops clips beyond it, `repair` only fixes up to it
    on_abstain: str = "keep"  # keep | reject
    max_lag: int = 15

    def validate(self, key: str = "align.meter") -> None:
        super().validate(key)
        if self.mode not in ("keep", "repair", "reject"):
            raise BadInput(f"align.mode must be keep, repair or reject, not {self.mode!r}")
        if self.on_abstain not in ("keep", "reject"):
            raise BadInput(f"align.on_abstain must be keep or reject, not {self.on_abstain!r}")


DEFAULT_CPUS_PER_WORKER = 0.9
"""CPUs of a pool's actor when the config leaves them to the plan (fractional: the pool never takes every
CPU); less when the cluster cannot hold even one actor each."""


@dataclass(frozen=True)
class PoolConfig:
    """Ray sizing of an actor pool that takes one input per call (scoring's; preprocessing extends it)."""

    workers: int | None = None  # actors, each on one input at a time (None: as many as the cluster holds)
    cpus_per_worker: float | None = None  # None: DEFAULT_CPUS_PER_WORKER, less on a cluster too small
    max_restarts: int = 3  # an input whose actor was killed is retried this often, then rejected
    poll_seconds: float = 0.5  # Ray Data's driver loop interval (Ray: 0.1); an input takes seconds
    stall_seconds: float = 600.0  # no input finished for this long fails the run, naming the stage (0: never)

    def validate(self) -> None:
        """BadInput naming the first bad setting."""
        if (self.workers is not None and self.workers < 1) or (
            self.cpus_per_worker is not None and self.cpus_per_worker <= 0
        ):
            raise BadInput("resources.workers must be >= 1 and resources.cpus_per_worker > 0")
        if self.max_restarts < 0 or self.stall_seconds < 0:
            raise BadInput("resources.max_restarts and resources.stall_seconds must be >= 0")
        check_poll_seconds(self.poll_seconds)

    def planned(self, what: str, inputs: int, command: str) -> PoolConfig:
        """This pool sized for the connected cluster and `inputs` inputs (core.plan): what the config
        leaves to defaults is fitted; BadInput with the one-line plan when it cannot run."""
        from core.plan import Ask, plan

        ask = Ask(
            what,
            min(self.workers, inputs) if self.workers is not None else inputs,
            DEFAULT_CPUS_PER_WORKER if self.cpus_per_worker is None else self.cpus_per_worker,
            count_flag="--workers",
            cpus_flag="--cpus-per-worker",
            fit_cpus=self.cpus_per_worker is None,
            fit_count=None if self.workers is not None else inputs,
        )
        (ask,) = plan([ask], command)
        return replace(self, workers=ask.count, cpus_per_worker=ask.cpus)


@dataclass(frozen=True)
class ResourcesConfig(PoolConfig):
    """Ray sizing of the preprocessing actor pool."""

    # inputs an actor holds at once. One is in FaceMesh; the others download, probe and decode their
    # first second meanwhile, which would otherwise leave FaceMesh idle between inputs
    inputs_per_worker: int = 2

    def validate(self) -> None:
        super().validate()
        if self.inputs_per_worker < 1:
            raise BadInput("resources.inputs_per_worker must be >= 1")


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything `lipsync preprocess` does, with the reference numbers as defaults."""

    fps: float = 25.0
    sample_rate: int = 16000
    crop_size: int = 96
    max_side: int = 720  # frames are decoded at most this large (longer side) for landmarks and crops
    segment_seconds: float = 10.0
    scene_cut_threshold: float = 0.15  # a cut: consecutive luma histograms correlate below 1 - this
    scene_cut_content_threshold: float = 27.0  # ... or their pixels change by more (hue/sat/light, of 255)
    val_fraction: float = 0.2
    seed: int = 0
    landmarker_model: str | None = None  # a user-supplied face_landmarker.task; default: bundled FaceMesh
    filters: filters.FilterConfig = field(default_factory=filters.FilterConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
