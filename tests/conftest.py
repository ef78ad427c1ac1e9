"""Shared fixtures: one session-scoped local Ray, paths to the shared real clips, small corpora."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from filelock import FileLock

REPO = Path(__file__).resolve().parents[1]
SHARED_MEDIA = REPO.parent / "shared" / "media"

# Keep Ray quiet and small on a 2-core machine.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (2 CPUs, small object store, no dashboard).

    Its workers allocate as the commands' do (jemalloc; core.malloc), so actors are tested as they run.
    """
    import ray

    from core.malloc import allocator_env
    from core.ray import scoped_environ

    if not ray.is_initialized():
        with scoped_environ(allocator_env()):
            ray.init(
                address="local",  # never join a cluster a `ray start` on this machine left behind
                num_cpus=2,
                object_store_memory=300 * 1024 * 1024,
                include_dashboard=False,
                log_to_driver=False,
                ignore_reinit_error=True,
            )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def shared_media() -> Path:
    """The real talking-face clips beside the checkout; tests using them skip when absent."""
    if not SHARED_MEDIA.is_dir() or not (SHARED_MEDIA / "MANIFEST.tsv").is_file():
        pytest.skip("../shared/media is not present")
    return SHARED_MEDIA


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """`build(folder)` once per test run, shared by every pytest-xdist worker (`make test` runs two): the
    first worker to get here builds it under a file lock, the others wait for it and read the same files."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        out = tmp_path_factory.mktemp(name)
        build(out)
        return out
    shared = tmp_path_factory.getbasetemp().parent  # the run's folder above each worker's own
    out, done = shared / name, shared / f"{name}.done"
    with FileLock(str(shared / f"{name}.lock")):
        if not done.exists():
            out.mkdir(exist_ok=True)
            build(out)
            done.touch()
    return out


def _fingerprint(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@contextlib.contextmanager
def left_as_built(folder: Path) -> Iterator[Path]:
    """`folder`, checked unchanged when the session ends: every test (on either xdist worker, in any order)
    reads a session corpus, so a test that writes into one makes others flaky. Copy it and write the copy."""
    before = _fingerprint(folder)
    yield folder
    after = _fingerprint(folder)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"a test changed the shared session corpus {folder}: {changed[:5]}"


@pytest.fixture(scope="session")
def synth_corpus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A generated en/es/hi corpus: 2 speakers per language, 1 clip of 4 s each, offset 0."""
    from pipeline.synth import SynthConfig, run

    config = SynthConfig(languages=("en", "es", "hi"), speakers=2, clips_per_speaker=1, seconds=4.0, seed=0)
    with left_as_built(
        built_once(tmp_path_factory, "synth_corpus", lambda out: run(config, str(out)))
    ) as out:
        yield out


@pytest.fixture(scope="session")
def preprocessed_corpus(
    synth_corpus: Path,
    ray_session,  # noqa: ANN001
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Path]:
    """`synth_corpus` through `lipsync preprocess` (in-process, on the session Ray)."""
    from pipeline.preprocess import run
    from pipeline.preprocess_config import PreprocessConfig

    def build(out: Path) -> None:
        run(PreprocessConfig(), str(synth_corpus), str(out))

    with left_as_built(built_once(tmp_path_factory, "preprocessed", build)) as out:
        yield out


@pytest.fixture(scope="session")
def tracker():  # noqa: ANN201
    """One FaceMesh tracker for the session (every `track` call starts fresh)."""
    from pipeline.landmarks import FaceMeshTracker

    with FaceMeshTracker() as t:
        yield t
