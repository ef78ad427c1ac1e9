"""Corpus inputs and their ids: the same corpus gets the same ids wherever it lies (no media decoded here)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from core.storage import Store
from pipeline.clip_preprocessor import clip_id_of
from pipeline.corpus import discover
from pipeline.preprocess import finished_inputs
from pipeline.preprocess_config import STATE_DIR

FILES = ("en/spk0/a.mp4", "en/spk1/b.mp4", "es/spk2/a.mp4")


def make_corpus(root: Path, manifest: bool) -> Path:
    for name in FILES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"not decoded here")
    if manifest:
        rows = "\n".join(f"{name},{name.split('/')[0]}" for name in FILES)
        (root / "manifest.csv").write_text(f"video,language\n{rows}\n")
    return root


def ids(source: Path | str) -> dict[str, str]:
    """Path within the corpus -> input id."""
    return {r["video"].split("/corpus/", 1)[1]: r["input_id"] for r in discover(str(source))}


@pytest.mark.parametrize("manifest", [False, True], ids=["scanned directory", "manifest"])
def test_the_same_corpus_has_the_same_ids_in_any_folder(tmp_path: Path, manifest: bool) -> None:
    """Ids hash the path within the corpus, so a seeded training on it draws the same windows whatever
    folder the corpus (or the demo's output) was written to."""
    first = make_corpus(tmp_path / "one" / "corpus", manifest)
    second = tmp_path / "somewhere" / "else" / "corpus"
    shutil.copytree(first, second)
    assert ids(first) == ids(second)
    assert len(set(ids(first).values())) == len(FILES)  # a.mp4 twice, in different folders: two ids
    assert clip_id_of(ids(first)["en/spk0/a.mp4"], 0, 50) == clip_id_of(ids(second)["en/spk0/a.mp4"], 0, 50)
    assert clip_id_of(ids(first)["en/spk0/a.mp4"], 0, 50) != clip_id_of(ids(first)["en/spk0/a.mp4"], 50, 100)


def test_a_manifest_naming_videos_outside_its_folder_keeps_them_apart(tmp_path: Path) -> None:
    """Videos a manifest names by absolute path outside its own folder are keyed by that path: two
    corpora with the same layout listed in one manifest do not share ids."""
    one = make_corpus(tmp_path / "one" / "corpus", manifest=False)
    two = make_corpus(tmp_path / "two" / "corpus", manifest=False)
    manifest = tmp_path / "lists" / "all.csv"
    manifest.parent.mkdir()
    manifest.write_text("video\n" + "".join(f"{root / name}\n" for root in (one, two) for name in FILES))
    rows = discover(str(manifest))
    assert len(rows) == 2 * len(FILES)
    assert len({r["input_id"] for r in rows}) == 2 * len(FILES)


def test_a_finished_input_counts_only_for_the_same_source_file(tmp_path: Path) -> None:
    """Another corpus with the same layout (or the same one moved) written to the same output is
    processed again, not taken from the first one's completion records."""
    first = make_corpus(tmp_path / "one" / "corpus", manifest=False)
    second = tmp_path / "two" / "corpus"
    shutil.copytree(first, second)
    store = Store(str(tmp_path / "out"))
    for row in discover(str(first)):
        record = {"input_id": row["input_id"], "source": row["video"], "config_hash": "h", "clips": []}
        store.write_json(f"{STATE_DIR}/{row['input_id']}.json", record)
    assert len(finished_inputs(store, "h", discover(str(first)))) == len(FILES)
    assert finished_inputs(store, "h", discover(str(second))) == {}
    assert finished_inputs(store, "other config", discover(str(first))) == {}
