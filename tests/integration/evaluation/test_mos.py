"""`lipsync mos`: a blind MOS study rated in headless Chromium, durable ratings, refusals and the statistics."""

from __future__ import annotations

import contextlib
import csv
import http.client
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import stats

from evaluation.mos.db import RatingStore
from evaluation.mos.results import krippendorff_alpha
from evaluation.mos.study import assign, content_repeats
from lipsync.cli import main

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


# --- fixtures: two "generation outputs" and the real videos of a small synthetic corpus --------------------
@pytest.fixture(scope="module")
def systems(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Systems A (absolute output paths) and B (relative paths, one failed row) on 3 synth clips + reference."""
    from pipeline.synth import SynthConfig, run

    root = tmp_path_factory.mktemp("mos_systems")
    corpus = root / "corpus"
    run(SynthConfig(languages=("en",), speakers=1, clips_per_speaker=3, seconds=2.0), str(corpus))
    videos = [r["video"] for r in csv.DictReader((corpus / "manifest.csv").open(encoding="utf-8"))]
    for name in ("sysA", "sysB"):
        (root / name / "videos").mkdir(parents=True)
        rows = []
        for i, video in enumerate(videos):
            if name == "sysA":
                output = str(corpus / video)
            else:
                output = f"videos/pair{i}.mp4"
                shutil.copyfile(corpus / video, root / name / output)
            rows.append({"id": f"pair{i}", "output": output, "language": "en", "status": "ok"})
        rows.append({"id": "pair9", "output": "", "language": "en", "status": "failed"})
        for row in rows:
            row["checkpoint_sha256"] = name * 8
        pq.write_table(pa.Table.from_pylist(rows), root / name / "outputs.parquet")
    (root / "sysB").rename(root / "B")  # system B is named after its directory
    return {"A": root / "sysA", "B": root / "B", "reference": corpus / "manifest.csv"}


def create_study(systems: dict[str, Path], study: Path, raters: int, k: int, extra: tuple = ()) -> dict:
    argv = ["mos", "create", str(study), "--from", f"A={systems['A']}", str(systems["B"])]
    argv += ["--reference", str(systems["reference"]), "--raters", str(raters), "--clips-per-rater", str(k)]
    assert main([*argv, *extra]) == 0
    return json.loads((study / "study.json").read_text())


@pytest.fixture(scope="module")
def study(systems: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """9 videos (3 systems x 3 clips), 3 raters x 3 clips: each video rated once."""
    path = tmp_path_factory.mktemp("study") / "s1"
    create_study(systems, path, raters=3, k=3)
    return path


@pytest.fixture(scope="module")
def study4(systems: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """As `study`, with the optional fourth criterion (emotion) enabled."""
    path = tmp_path_factory.mktemp("study4") / "s4"
    doc = create_study(systems, path, raters=3, k=3, extra=("--criteria", "sync,realism,naturalness,emotion"))
    assert doc["criteria"] == ["realism", "sync", "naturalness", "emotion"]  # the page's order
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(study_dir: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """`lipsync mos serve` in a subprocess on a free loopback port; yields (base URL, process)."""
    port = free_port()
    log = (study_dir.parent / f"serve-{port}.log").open("w")
    cmd = [sys.executable, "-m", "lipsync.cli", "mos", "serve", str(study_dir), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, Path(log.name).read_text()
            with contextlib.suppress(OSError):
                if request(f"http://127.0.0.1:{port}", "GET", "/")[0] == 200:
                    break
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}", proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


@contextlib.contextmanager
def thread_server(study_dir: Path) -> Iterator[str]:
    """The same app under uvicorn in a thread of the test process (no second interpreter start-up)."""
    import uvicorn

    from evaluation.mos.app import create_app

    config = uvicorn.Config(create_app(study_dir), host="127.0.0.1", port=free_port(), log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not srv.started:
            assert thread.is_alive() and time.monotonic() < deadline, "server did not come up"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{config.port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


def request(base: str, method: str, path: str, form: dict | None = None) -> tuple[int, bytes, dict]:
    """One raw HTTP request (the path is sent exactly as given: no normalisation of `..`)."""
    host, port = urllib.parse.urlsplit(base).netloc.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    body = urllib.parse.urlencode(form) if form is not None else None
    headers = {"Content-Type": "application/x-www-form-urlencoded"} if form is not None else {}
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read(), dict(resp.getheaders())
    finally:
        conn.close()


def db_rows(study_dir: Path, rater: str) -> list[sqlite3.Row]:
    con = sqlite3.connect(study_dir / "ratings.sqlite")
    con.row_factory = sqlite3.Row
    try:
        return con.execute("SELECT * FROM ratings WHERE rater = ? ORDER BY created_at", (rater,)).fetchall()
    finally:
        con.close()


# --- (1) a rater in headless Chromium ----------------------------------------------------------------------
def test_rater_watches_and_rates_three_clips_in_chromium(study4: Path, tmp_path: Path) -> None:
    """Four criteria: the study enables the optional emotion question after the three."""
    from playwright.sync_api import sync_playwright

    study = study4
    doc = json.loads((study / "study.json").read_text())
    rater = doc["raters"][0]
    assert {doc["stimuli"][c]["system"] for c in rater["clips"]} == {"A", "B", "reference"}  # balanced
    criteria = ("realism", "sync", "naturalness", "emotion")  # the page's order
    wanted = [(4, 2, 5, 3), (3, 3, 1, 2), (5, 4, 4, 5)]  # per clip, in the page's order
    with thread_server(study) as base, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 900, "height": 1100})
        page.goto(f"{base}/rate/{rater['token']}")
        html = page.content()
        for name in doc["systems"]:  # blind: no system name and no source path on the page
            assert f">{name}<" not in html and "sysA" not in html and "corpus" not in html
        legends = page.eval_on_selector_all("fieldset.scale legend", "ls => ls.map(l => l.textContent)")
        assert legends == ["1. Realism", "2. Lip sync", "3. Naturalness", "4. Emotion"]
        assert "keep the speaker's expression" in page.text_content("#d-emotion")
        for i, scores in enumerate(wanted):
            ready = "() => { const v = document.getElementById('clip'); return v.readyState >= 2 && v.duration > 0; }"
            page.wait_for_function(ready, timeout=20_000)
            assert page.text_content("#progress") == f"{i + 1} / 3"
            media = page.eval_on_selector("#clip source", "s => s.src")
            assert media.endswith(rater["clips"][i]) and "/media/" in media
            if i == 0:  # keyboard only: P plays, digits score the focused question and move on, Enter submits
                page.keyboard.press("p")
                page.wait_for_function(
                    "() => document.getElementById('clip').currentTime > 0.3", timeout=20_000
                )
                page.keyboard.press("p")
                for key in scores:
                    page.keyboard.press(str(key))
                assert page.evaluate("document.activeElement.id") == "submit"
                page.select_option("#language", "es")
                page.fill("#comment", "mouth a bit blurry")
                page.screenshot(path=str(tmp_path / "mos_page.png"), full_page=True)
                with page.expect_navigation():
                    page.keyboard.press("Enter")
            else:  # mouse: click the labels; the language is remembered
                assert page.input_value("#language") == "es"
                for name, value in zip(criteria, scores, strict=True):
                    page.click(f"label[for={name}-{value}]")
                with page.expect_navigation():
                    page.click("#submit")
        assert "Thank you" in page.text_content("h1")
        assert "3 / 3" in page.text_content(".progress")
        browser.close()
    rows = db_rows(study, rater["rater"])
    assert [r["clip"] for r in rows] == rater["clips"]
    assert [tuple(r[c] for c in criteria) for r in rows] == wanted
    assert [r["rater_language"] for r in rows] == ["es"] * 3
    assert rows[0]["comment"] == "mouth a bit blurry" and rows[0]["watched_s"] > 0.3
    print(f"screenshot: {tmp_path / 'mos_page.png'}")


# --- (2) durability and upsert ------------------------------------------------------------------------------
def test_restart_loses_nothing_and_double_submit_leaves_one_row(study: Path) -> None:
    doc = json.loads((study / "study.json").read_text())
    rater = doc["raters"][1]
    token, clips = rater["token"], rater["clips"]
    with server(study) as (base, proc):
        for scores in ((2, 2, 2), (4, 5, 3)):  # the same clip twice: the second replaces the first
            form = {"clip": clips[0], **dict(zip(("realism", "sync", "naturalness"), scores, strict=True))}
            status, _, headers = request(base, "POST", f"/rate/{token}", form)
            assert status == 303 and headers["location"] == f"/rate/{token}"
        request(base, "POST", f"/rate/{token}", {"clip": clips[1], "realism": 1, "sync": 1, "naturalness": 1})
        proc.kill()  # SIGKILL: no clean shutdown, no checkpoint of the WAL
        proc.wait()
    rows = db_rows(study, rater["rater"])
    assert [(r["clip"], r["realism"], r["sync"], r["naturalness"]) for r in rows] == [
        (clips[0], 4, 5, 3),
        (clips[1], 1, 1, 1),
    ]
    assert rows[0]["submissions"] == 2 and rows[0]["emotion"] is None
    with server(study) as (base, _):
        status, body, _ = request(base, "GET", f"/rate/{token}")
        assert status == 200 and b"3 / 3" in body  # the next unrated clip is the third
        assert b"Emotion" not in body and b'name="emotion"' not in body  # not asked: the study has three
        status, body, _ = request(base, "GET", f"/rate/{token}?pos=1")
        assert re.search(rb'id="sync-5" name="sync" value="5" required\s+checked', body)  # shown for review
    assert len(db_rows(study, rater["rater"])) == 2


# --- (3) refusals -------------------------------------------------------------------------------------------
def test_refusals(study: Path, systems: dict[str, Path], tmp_path: Path) -> None:
    other = create_study(systems, tmp_path / "other", raters=1, k=2)
    doc = json.loads((study / "study.json").read_text())
    rater, stranger = doc["raters"][2], other["raters"][0]
    token, clip = rater["token"], rater["clips"][0]
    not_mine = doc["raters"][0]["clips"][0]
    ok = {"clip": clip, "realism": 3, "sync": 3, "naturalness": 3}
    with thread_server(study) as base:
        status, body, headers = request(base, "GET", f"/media/{token}/{clip}")
        source = study / doc["stimuli"][clip]["file"]
        assert (status, headers["content-type"], body) == (200, "video/mp4", source.read_bytes())
        cases = {
            ("GET", "/rate/"): 404,  # no token
            ("POST", "/rate/"): 404,
            ("GET", f"/media/{clip}"): 404,
            ("GET", "/rate/not-a-token"): 403,
            ("GET", f"/media/not-a-token/{clip}"): 403,
            ("GET", f"/rate/{stranger['token']}"): 403,  # another study's token
            ("GET", f"/media/{stranger['token']}/{stranger['clips'][0]}"): 403,
            ("GET", f"/media/{token}/{stranger['clips'][0]}"): 404,  # another study's media
            ("GET", f"/media/{token}/{not_mine}"): 404,  # a clip of this study, but not this rater's
            ("GET", f"/media/{token}/../study.json"): 404,  # path traversal, raw and URL-encoded
            ("GET", f"/media/{token}/../../study.json"): 404,
            ("GET", f"/media/{token}/%2e%2e%2fstudy.json"): 404,
            ("GET", f"/media/{token}/%2e%2e/study.json"): 404,
            ("GET", f"/media/{token}/%2e%2e"): 404,
            ("GET", f"/media/{token}/..%2F..%2Fratings.sqlite"): 404,
            ("GET", f"/media/{token}/{clip}%2f..%2f..%2fstudy.json"): 404,
            ("GET", f"/media/{token}/media%2f{clip}.mp4"): 404,
        }
        for (method, path), expected in cases.items():
            status, body, _ = request(base, method, path)
            assert status == expected, (method, path, status)
            assert token.encode() not in body and b'"stimuli"' not in body
        status, _, _ = request(base, "GET", "/media/../study.json")
        assert status in (403, 404)
        posts = {
            f"/rate/{stranger['token']}": (ok, 403),
            "/rate/not-a-token": (ok, 403),
            f"/rate/{token}": ({**ok, "clip": not_mine}, 404),
        }
        for bad in (0, 6, -1, "4.5", "x", ""):
            posts[f"/rate/{token}?{bad}"] = ({**ok, "sync": bad}, 422)
        posts[f"/rate/{token}?missing"] = ({"clip": clip, "realism": 3, "sync": 3}, 422)
        posts[f"/rate/{token}?lang"] = ({**ok, "language": "klingon"}, 422)
        for path, (form, expected) in posts.items():
            status, _, _ = request(base, "POST", path.split("?")[0], form)
            assert status == expected, (path, form, status)
    assert db_rows(study, rater["rater"]) == []
    assert db_rows(tmp_path / "other", stranger["rater"]) == []


# --- (4) the statistics -------------------------------------------------------------------------------------
def test_results_match_mos_and_t_intervals_computed_by_hand(
    systems: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = tmp_path / "s"
    doc = create_study(systems, study, raters=6, k=6, extra=("--seed", "3"))
    store = RatingStore(study / "ratings.sqlite", doc["study_id"])
    rng = random.Random(7)
    bias = {"A": 1, "B": 0, "reference": 2}
    written: dict[str, dict[str, list[int]]] = {}
    for rater in doc["raters"][:5]:  # the sixth rater never shows up
        lang = "hi" if rater["rater"] == "r01" else "en"
        for clip in rater["clips"]:
            system = doc["stimuli"][clip]["system"]
            scores = {
                c: min(5, max(1, 2 + bias[system] + rng.choice((-1, 0, 0, 1)))) for c in ("realism", "sync")
            }
            scores["naturalness"] = rng.randint(1, 5)
            store.upsert(rater["rater"], clip, scores, rater_language=lang)
            for criterion, value in scores.items():
                written.setdefault(system, {}).setdefault(criterion, []).append(value)
    capsys.readouterr()
    assert main(["mos", "results", str(study), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = json.loads((study / "mos_results.json").read_text())
    assert printed["systems"] == saved["systems"] and saved["raters"] == 5 and saved["ratings"] == 30
    for system, by_criterion in written.items():
        for criterion, values in by_criterion.items():
            x = np.array(values, dtype=float)
            n, mean, sd = len(x), x.mean(), x.std(ddof=1)
            half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
            cell = saved["systems"][system][criterion]
            assert cell["n"] == n and cell["mos"] == pytest.approx(mean, abs=1e-6)
            assert cell["ci95"] == pytest.approx([mean - half, mean + half], abs=1e-6)
            assert saved["systems"][system]["languages"]["en"][criterion]["n"] == n  # every clip is English
        rater_langs = saved["systems"][system]["rater_languages"]
        assert sum(v["sync"]["n"] for v in rater_langs.values()) == len(by_criterion["sync"])
    assert saved["systems"]["reference"]["reference"] is True
    assert saved["systems"]["A"]["checkpoint_sha256"] == ["sysA" * 8]
    for criterion in ("sync", "realism", "naturalness"):
        alpha = saved["agreement"][criterion]["alpha"]
        assert alpha is None or -1.0 <= alpha <= 1.0
    assert set(saved["systems"]) == {"A", "B", "reference"}
    assert main(["mos", "results", str(tmp_path / "nowhere")]) == 2


def test_emotion_criterion_in_results_and_overall_only_where_enabled(
    systems: dict[str, Path], study4: Path, tmp_path: Path
) -> None:
    doc = json.loads((study4 / "study.json").read_text())
    store = RatingStore(study4 / "ratings.sqlite", doc["study_id"], tuple(doc["criteria"]))
    for rater in doc["raters"]:
        for clip in rater["clips"]:
            store.upsert(rater["rater"], clip, {"realism": 4, "sync": 4, "naturalness": 4, "emotion": 1})
    with thread_server(study4) as base:  # the page refuses a rating without the fourth score
        form = {"clip": doc["raters"][0]["clips"][0], "realism": 3, "sync": 3, "naturalness": 3}
        status, body, _ = request(base, "POST", f"/rate/{doc['raters'][0]['token']}", form)
        assert status == 422 and b"Emotion" in body
    assert main(["mos", "results", str(study4), "--json"]) == 0
    saved = json.loads((study4 / "mos_results.json").read_text())
    assert saved["criteria"] == ["sync", "realism", "naturalness", "emotion"]
    for entry in saved["systems"].values():
        assert (
            entry["emotion"]["mos"] == 1.0 and entry["languages"]["en"]["emotion"]["n"] == entry["n_ratings"]
        )
        assert entry["mean_of_criteria"] == pytest.approx((4 + 4 + 4 + 1) / 4)  # the overall MOS counts it
    assert "emotion" in saved["agreement"]

    plain = tmp_path / "plain"  # a study without it: results as before
    doc = create_study(systems, plain, raters=1, k=3)
    assert doc["criteria"] == ["realism", "sync", "naturalness"]
    store = RatingStore(plain / "ratings.sqlite", doc["study_id"])
    for clip in doc["raters"][0]["clips"]:
        store.upsert("r01", clip, {"realism": 4, "sync": 4, "naturalness": 1})
    assert main(["mos", "results", str(plain), "--json"]) == 0
    saved = json.loads((plain / "mos_results.json").read_text())
    assert saved["criteria"] == ["sync", "realism", "naturalness"] and "emotion" not in saved["agreement"]
    for entry in saved["systems"].values():
        assert "emotion" not in entry and entry["mean_of_criteria"] == pytest.approx(3.0)


def test_krippendorff_alpha_matches_the_published_example() -> None:
    """Krippendorff (2011), 4 coders x 12 units with missing values: ordinal 0.815, interval 0.849."""
    coders = [
        [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
        [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
    ]
    units = [[v for v in unit if v is not None] for unit in zip(*coders, strict=True)]
    assert krippendorff_alpha(units, "ordinal") == pytest.approx(0.815, abs=5e-4)
    assert krippendorff_alpha(units, "interval") == pytest.approx(0.849, abs=5e-4)
    assert krippendorff_alpha([[3, 3], [3, 3]], "ordinal") is None  # no variation: undefined


def test_assignment_is_balanced_and_each_clip_once_per_rater() -> None:
    def pools_of(sizes: dict[str, int]) -> tuple[dict[str, list[str]], dict[str, str]]:
        pools = {s: [f"{s}/c{i}" for i in range(n)] for s, n in sizes.items()}
        return pools, {key: key.split("/")[1] for keys in pools.values() for key in keys}

    pools, content = pools_of({"A": 8, "B": 8, "ref": 5})  # unequal systems
    plans = assign(pools, content, raters=12, k=7, rng=random.Random(0))
    exposures = Counter(key for plan in plans for key in plan)
    for plan in plans:
        assert len(plan) == len(set(plan)) == 7
        per_system = Counter(key.split("/")[0] for key in plan)
        assert max(per_system.values()) - min(per_system.values()) <= 1
    for system, keys in pools.items():
        counts = [exposures[key] for key in keys]
        assert max(counts) - min(counts) <= 1, system
    assert assign(pools, content, 12, 7, random.Random(0)) == plans  # seeded
    assert content_repeats(plans, content) <= 6
    pools, content = pools_of({"A": 6, "B": 6, "ref": 6})  # same 6 contents: a Latin square exists
    plans = assign(pools, content, raters=9, k=6, rng=random.Random(1))
    assert content_repeats(plans, content) == 0
    assert all(Counter(key.split("/")[0] for key in plan) == {"A": 2, "B": 2, "ref": 2} for plan in plans)


def test_create_refuses_bad_input(systems: dict[str, Path], tmp_path: Path) -> None:
    base = ["mos", "create"]
    assert main([*base, str(tmp_path / "x"), "--from", str(tmp_path / "missing")]) == 2
    assert main([*base, str(tmp_path / "x"), "--from", str(systems["A"]), "--clips-per-rater", "4"]) == 2
    assert main([*base, str(tmp_path / "x"), "--from", str(systems["A"]), f"sysA={systems['B']}"]) == 2
    assert main([*base, str(tmp_path / "x"), "--from", str(systems["A"]), "--raters", "0"]) == 2
    assert main([*base, str(tmp_path / "y"), "--from", str(systems["A"])]) == 0
    assert main([*base, str(tmp_path / "y"), "--from", str(systems["A"])]) == 2  # never overwrite a study
    for criteria in ("sync,realism,naturalness,joy", "sync,emotion"):  # unknown; the three are required
        assert main([*base, str(tmp_path / "x"), "--from", str(systems["A"]), "--criteria", criteria]) == 2
    assert main(["mos", "serve", str(tmp_path / "x")]) == 2
    assert not os.path.exists(tmp_path / "x")
