"""How commands reach Ray: forwarded environment variables and when a runtime_env is needed for them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from core.malloc import VARIABLES
from core.ray import DEFERRED_IMPORTS, forwarded_env, worker_runtime_env

REPO = Path(__file__).resolve().parents[3]

# In its own process: ensure_ray starts a local Ray whose workers inherit the driver's variables.
EMBEDDED = textwrap.dedent(
    """
    import os
    import ray
    from core.malloc import TUNABLES, jemalloc_loaded
    from core.ray import ensure_ray, worker_runtime_env

    os.environ["LIPSYNC_PROBE"] = "at start"
    ensure_ray(num_cpus=1)

    @ray.remote(num_cpus=0)
    def seen() -> str | None:
        return os.environ.get("LIPSYNC_PROBE")

    @ray.remote(num_cpus=0)
    def tunables() -> str | None:
        return os.environ.get("GLIBC_TUNABLES")

    @ray.remote(num_cpus=0)
    def allocates_with_jemalloc() -> bool:
        return jemalloc_loaded()

    print("worker allocator tunables:", ray.get(tunables.remote()) == TUNABLES)
    print("worker allocates with jemalloc:", ray.get(allocates_with_jemalloc.remote()))
    print("driver allocates with jemalloc:", jemalloc_loaded())
    print("driver allocator tunables:", os.environ.get("GLIBC_TUNABLES"))
    print("runtime_env at start:", worker_runtime_env())
    print("worker sees:", ray.get(seen.remote()))
    os.environ["LIPSYNC_PROBE"] = "changed"
    env = worker_runtime_env()
    print("runtime_env after a change:", env["env_vars"]["LIPSYNC_PROBE"])
    print("worker sees without it:", ray.get(seen.remote()))
    print("worker sees with it:", ray.get(seen.options(runtime_env=env).remote()))
    ray.shutdown()
    """
)


@pytest.mark.slow
def test_an_embedded_ray_needs_no_runtime_env_until_a_variable_changes() -> None:
    """Workers of the Ray that ensure_ray starts see the driver's variables without a runtime_env (which
    would cost each worker a setup_worker.py start), and the allocator settings; a variable changed since
    gets a runtime_env."""
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_USAGE_STATS_ENABLED": "0"}
    for name in VARIABLES:
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, "-c", EMBEDDED], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines == [
        "worker allocator tunables: True",  # its workers start with reuse_freed_memory's settings
        "worker allocates with jemalloc: True",  # and with jemalloc, which `make` installs
        "driver allocates with jemalloc: False",
        "driver allocator tunables: None",  # the driver's own environment is left as it was
        "runtime_env at start: None",
        "worker sees: at start",
        "runtime_env after a change: changed",
        "worker sees without it: at start",
        "worker sees with it: changed",
    ]


# In its own process: ensure_ray joins a cluster that was started without the allocator's variables.
JOINED = textwrap.dedent(
    """
    import os
    import ray
    from ray.cluster_utils import Cluster
    from core.malloc import TUNABLES, jemalloc_loaded
    from core.ray import ensure_ray

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    os.environ["LIPSYNC_PROBE"] = "joined"
    ensure_ray(address=cluster.address)

    @ray.remote(num_cpus=0)
    def worker_allocator() -> tuple:
        tunables = os.environ.get("GLIBC_TUNABLES") == TUNABLES
        return jemalloc_loaded(), tunables, os.environ.get("LIPSYNC_PROBE")

    print(*ray.get(worker_allocator.remote()))
    ray.shutdown()
    cluster.shutdown()
    """
)


@pytest.mark.slow
def test_a_joined_cluster_s_workers_get_the_allocator_through_the_runtime_env() -> None:
    """`--address`: the cluster's processes did not inherit the driver's environment, so the job's
    runtime_env carries jemalloc (LD_PRELOAD, MALLOC_CONF) and the glibc tunables to its workers."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    for name in (*VARIABLES, "RAY_ADDRESS"):
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, "-c", JOINED], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["True", "True", "joined"]


def test_a_ray_started_elsewhere_gets_the_variables_passed(
    ray_session, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tests' Ray was not started by ensure_ray: its workers may lack the driver's variables."""
    for name in forwarded_env():
        monkeypatch.delenv(name)
    assert worker_runtime_env() is None
    monkeypatch.setenv("LIPSYNC_PROBE", "1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("UNRELATED", "x")
    assert worker_runtime_env() == {
        "env_vars": {"LIPSYNC_PROBE": "1", "AWS_ENDPOINT_URL": "http://127.0.0.1:1"}
    }


# In its own process (a fresh sys.modules): which modules an actor imports when built, and on its first input.
FIRST_INPUT = textwrap.dedent(
    """
    import json, sys
    from pipeline.corpus import discover
    from core.ray import DEFERRED_IMPORTS

    def loaded():
        return [m for m in DEFERRED_IMPORTS if m in sys.modules]

    kind, corpus, out = sys.argv[1:]
    row = discover(corpus)[0]  # en, with a transcript: scoring aligns it with espeak-ng and DTW
    if kind == "preprocess":
        from pipeline.clip_preprocessor import ClipPreprocessor
        from pipeline.preprocess_config import PreprocessConfig

        at_import = loaded()
        actor = ClipPreprocessor(PreprocessConfig(), out)

        def work():
            return len(actor.process(row)["clips"])
    else:
        from evaluation.clip_scorer import ClipScorer
        from evaluation.score_config import ScoreConfig

        at_import = loaded()
        actor = ClipScorer(ScoreConfig())
        fields = ("audio", "speaker", "split", "timeline", "phonemes", "source", "reference", "input_status",
                  "input_reason", "injected_offset_frames")
        row = {**dict.fromkeys(fields, ""), **row, "id": "a", "system": "test", "timeline": ""}

        def work():
            scored = actor.score(row)
            return int(scored["status"] == "ok" and scored["timeline_source"] == "espeak")
    built = loaded()
    before = set(sys.modules)
    done = work()
    print(json.dumps({"at_import": at_import, "built": built, "done": done,
                      "first_input": sorted(set(sys.modules) - before)}))
    """
)


@pytest.mark.parametrize("kind", ["preprocess", "score"])
def test_actors_import_deferred_modules_when_built_not_on_their_first_input(
    kind: str, synth_corpus: Path, tmp_path: Path
) -> None:
    """The per-clip code imports scipy.signal and librosa's features (~1.5 s of CPU) on first use, so that
    the command line starts without them; an actor imports them when it is built, so its first input
    neither waits for them nor counts them as its work."""
    done = subprocess.run(
        [sys.executable, "-c", FIRST_INPUT, kind, str(synth_corpus), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if kind == "preprocess":  # evaluation.score's own imports (evaluation.quality) load scipy.signal
        assert result["at_import"] == []
    assert result["built"] == list(DEFERRED_IMPORTS)
    assert result["done"] >= 1
    heavy = [m for m in result["first_input"] if m.split(".")[0] in ("scipy", "librosa", "numba", "llvmlite")]
    assert heavy == []


def test_an_input_that_kills_its_actor_every_time_is_given_up_not_the_run(ray_session) -> None:  # noqa: ANN001
    """Ray Data restarts a killed pool actor and retries its input without bound (and Ray 2.60 deprecates
    the map_batches options that bounded it); the ledger gives the input up after max_restarts + 1 starts."""
    import warnings

    from core.ray import run_on_actor_pool

    class Fragile:
        """Dies (the whole worker process) on the input "poison"; defined here, as workers cannot import tests."""

        def __call__(self, batch: dict) -> dict:
            if batch["id"][0] == "poison":
                os._exit(1)
            return {"id": list(batch["id"]), "status": ["ok"]}

        def given_up(self, row: dict, attempts: int) -> dict:
            return {"id": [row["id"]], "status": [f"given up after {attempts}"]}

    rows = [{"id": name} for name in ("a", "poison", "b", "c")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = run_on_actor_pool(rows, Fragile, {}, actors=1, cpus_per_actor=0.25, max_restarts=2, key="id")
    assert sorted((r["id"], r["status"]) for r in out) == [
        ("a", "ok"), ("b", "ok"), ("c", "ok"), ("poison", "given up after 3"),
    ]  # fmt: skip
    assert not [w for w in caught if "ray_remote_args" in str(w.message)]  # the deprecated options are gone
