"""`lipsync mos create`: a blind, balanced rating study from generation outputs and real reference videos.

A *system* is one generation OUT (its `outputs.parquet`, rows with status "ok") or a corpus manifest of real
videos (`--reference`). A *stimulus* is one video of one system; its *content* is the pair id (the same id in
two systems' outputs is the same content). The study directory holds everything the server needs and nothing
else it may serve:

    STUDY_DIR/study.json       systems, stimuli (opaque id -> system, content, language, media file), raters
                               (id, secret token, the stimuli in the order that rater sees them)
    STUDY_DIR/media/<id>.mp4   copies of the assigned videos, named by opaque random ids (blind)
    STUDY_DIR/ratings.sqlite   the ratings (db.py), created here so the study id is recorded with them
    STUDY_DIR/links.txt        one rating link per rater (the tokens are secrets: mode 0600)

Balance, per rater: the K clips are split over the systems as evenly as their sizes allow, with the systems
that get one clip more rotating from rater to rater; within a system the least-rated stimulus is taken,
preferring a content that rater has not seen yet (ties broken by the seeded RNG; the greedy pass is
retried to avoid repeated content); each stimulus at most once per rater, so every stimulus of a system
is rated equally often +-1; the presentation order is shuffled per rater. Tokens and media ids come from `secrets`, not the seed.
"""

from __future__ import annotations

import json
import os
import posixpath
import random
import re
import secrets
import shutil
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec

from core.errors import BadInput
from core.manifest import read_table

FORMAT = 1
STUDY_FILE = "study.json"
DB_FILE = "ratings.sqlite"
MEDIA_DIR = "media"
LINKS_FILE = "links.txt"
CRITERIA = ("realism", "sync", "naturalness")  # every study asks these, in this order on the page
OPTIONAL_CRITERIA = ("emotion",)  # asked after them where the study enables them (`--criteria`)
MEDIA_TYPES = {".mp4": "video/mp4", ".m4v": "video/mp4", ".mov": "video/mp4", ".webm": "video/webm"}
TABLE_EXTENSIONS = (".parquet", ".csv", ".jsonl", ".json")
# The rater's own language: BCP-47 code and its name in that language; study languages are added.
RATER_LANGUAGES = {
    "en": "English",
    "es": "Español",
    "hi": "हिन्दी",
    "fr": "Français",
    "de": "Deutsch",
    "pt": "Português",
    "it": "Italiano",
    "zh": "中文",
    "ja": "日本語",
    "ko": "한국어",
    "ar": "العربية",
    "ru": "Русский",
    "bn": "বাংলা",
    "ta": "தமிழ்",
    "other": "Other",
}
_NAME = re.compile(r"^([A-Za-z0-9_.-]+)=(.+)$")


@dataclass(frozen=True)
class Source:
    """One system of the study: a generation OUT or a manifest of videos."""

    name: str
    uri: str
    reference: bool = False


@dataclass(frozen=True)
class Rater:
    rater: str  # r01, r02, ... (stored with the ratings; the token is not)
    token: str
    clips: tuple[str, ...]  # opaque stimulus ids in presentation order


def parse_source(spec: str, reference: bool = False) -> Source:
    """`name=path` or `path` (name: the directory's basename, as `lipsync score` names systems)."""
    match = _NAME.match(spec)
    if match:
        return Source(match.group(1), match.group(2), reference)
    target = spec.rstrip("/")
    if target.lower().endswith(TABLE_EXTENSIONS):
        target = posixpath.dirname(target) if "://" in target else os.path.dirname(os.path.abspath(target))
    name = "reference" if reference else posixpath.basename(target.rstrip("/"))
    if not name:
        raise BadInput(f"cannot name the system {spec!r}: use NAME=PATH")
    return Source(name, spec, reference)


def _table_of(uri: str) -> str:
    """The table file of a system: the file itself, or OUT/outputs.parquet, or a manifest in the directory."""
    if uri.lower().endswith(TABLE_EXTENSIONS):
        return uri
    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(path):
        raise BadInput(f"{uri} does not exist")
    candidates = ["outputs.parquet"] + [f"manifest{ext}" for ext in TABLE_EXTENSIONS]
    for name in candidates:
        if fs.exists(f"{path.rstrip('/')}/{name}"):
            return f"{uri.rstrip('/')}/{name}"
    raise BadInput(f"{uri} has no outputs.parquet or manifest (.parquet/.csv/.jsonl)")


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return str(value).strip()


def _join(base: str, rel: str) -> str:
    if "://" in rel or os.path.isabs(rel):
        return rel
    return f"{base.rstrip('/')}/{rel}" if "://" in base else os.path.join(base, rel)


def _exists(uri: str) -> bool:
    fs, path = fsspec.core.url_to_fs(uri)
    return fs.isfile(path)


def load_system(source: Source) -> list[dict[str, Any]]:
    """The usable videos of one system: content key, pair id, language, media URI (checked to exist)."""
    table = _table_of(source.uri)
    frame = read_table(table)
    base = posixpath.dirname(table) if "://" in table else os.path.dirname(os.path.abspath(table))
    column = "output" if "output" in frame.columns else "video" if "video" in frame.columns else None
    if column is None:
        raise BadInput(f"{table} has neither an 'output' nor a 'video' column")
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for record in frame.to_dict(orient="records"):
        status = _text(record.get("status")) or "ok"
        rel = _text(record.get(column))
        if status != "ok" or not rel:
            continue
        media = _join(base, rel)
        ext = os.path.splitext(rel)[1].lower()
        if ext not in MEDIA_TYPES:
            raise BadInput(f"{source.name}: {rel} is not a browser-playable video ({', '.join(MEDIA_TYPES)})")
        if not _exists(media):
            raise BadInput(f"{source.name}: video {media} does not exist")
        pair = _text(record.get("id")) or rel
        if pair in seen:
            raise BadInput(f"{source.name}: id {pair!r} appears twice in {table}")
        seen.add(pair)
        rows.append(
            {
                "content": pair,
                "language": _text(record.get("language")) or "und",
                "media": media,
                "ext": ext,
                "checkpoint_sha256": _text(record.get("checkpoint_sha256")),
            }
        )
    if not rows:
        raise BadInput(f"{source.name}: {table} has no usable videos (status ok, with a path)")
    return rows


def _assign_once(
    pools: dict[str, list[str]], content: dict[str, str], raters: int, k: int, rng: random.Random
) -> list[list[str]]:
    systems = sorted(pools)
    exposures: Counter[str] = Counter()
    plans: list[list[str]] = []
    for r in range(raters):
        quota = dict.fromkeys(systems, 0)
        start = (r * k) % len(systems)
        order = systems[start:] + systems[:start]
        left = k
        while left:
            for name in order:
                if left and quota[name] < len(pools[name]):
                    quota[name] += 1
                    left -= 1
        slots = [name for name in systems for _ in range(quota[name])]
        rng.shuffle(slots)
        chosen: list[str] = []
        seen_content: set[str] = set()
        for name in slots:
            options = [key for key in pools[name] if key not in chosen]
            best = min((exposures[key], content[key] in seen_content) for key in options)
            pick = rng.choice(
                [key for key in options if (exposures[key], content[key] in seen_content) == best]
            )
            chosen.append(pick)
            seen_content.add(content[pick])
            exposures[pick] += 1
        rng.shuffle(chosen)
        plans.append(chosen)
    return plans


def content_repeats(plans: list[list[str]], content: dict[str, str]) -> int:
    """How many times a rater meets a content they have already seen (from another system)."""
    return sum(len(plan) - len({content[key] for key in plan}) for plan in plans)


def assign(
    pools: dict[str, list[str]],
    content: dict[str, str],
    raters: int,
    k: int,
    rng: random.Random,
    attempts: int = 30,
) -> list[list[str]]:
    """Per rater, K distinct stimulus keys balanced over systems and exposures (see the module doc).

    Exposure comes first (within a system every stimulus is rated equally often, +-1), then avoiding a
    content the rater has seen; the seeded greedy pass is repeated up to `attempts` times to find a plan
    without repeated content.
    """
    best: list[list[str]] = []
    best_repeats = -1
    for _ in range(attempts):
        plans = _assign_once(pools, content, raters, k, random.Random(rng.random()))
        repeats = content_repeats(plans, content)
        if best_repeats < 0 or repeats < best_repeats:
            best, best_repeats = plans, repeats
        if repeats == 0:
            break
    return best


def parse_criteria(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """The study's criteria in page order from `sync,realism,naturalness[,emotion]` (any order; None: the
    three every study asks). The three are required, so every study's MOS compares with every other's."""
    if spec is None:
        return CRITERIA
    names = [c.strip() for c in (spec.split(",") if isinstance(spec, str) else spec) if c.strip()]
    known = CRITERIA + OPTIONAL_CRITERIA
    unknown = [c for c in names if c not in known]
    if unknown:
        raise BadInput(f"--criteria: unknown {', '.join(unknown)}; known: {', '.join(known)}")
    missing = [c for c in CRITERIA if c not in names]
    if missing:
        raise BadInput(f"--criteria must include {', '.join(CRITERIA)} (missing {', '.join(missing)})")
    return tuple(c for c in known if c in names)


def _copy(src: str, dest: Path) -> None:
    if "://" not in src:
        shutil.copyfile(src, dest)
        return
    with fsspec.open(src, "rb") as fin, dest.open("wb") as fout:
        shutil.copyfileobj(fin, fout)


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def create(
    study_dir: str,
    sources: list[str],
    reference: str | None = None,
    raters: int = 5,
    clips_per_rater: int | None = None,
    seed: int = 0,
    base_url: str = "http://127.0.0.1:8000",
    criteria: str | Sequence[str] | None = None,
) -> dict[str, Any]:
    """Build STUDY_DIR (see the module doc); returns paths, links and balance figures. `criteria`: see
    `parse_criteria` (an optional criterion such as "emotion" is asked only in studies that enable it)."""
    from evaluation.mos.db import RatingStore

    asked = parse_criteria(criteria)
    root = Path(study_dir)
    if (root / STUDY_FILE).exists():
        raise BadInput(f"{study_dir} already holds a study ({STUDY_FILE}); use a new directory")
    if not sources and not reference:
        raise BadInput("no systems: give --from OUTPUTS (and/or --reference MANIFEST)")
    if raters < 1:
        raise BadInput(f"--raters must be at least 1, got {raters}")
    specs = [parse_source(s) for s in sources] + ([parse_source(reference, True)] if reference else [])
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise BadInput(f"two systems are named {dup!r}: name them with NAME=PATH")

    systems: dict[str, Any] = {}
    stimuli: dict[str, dict[str, Any]] = {}  # internal key "system\0content" -> row
    for spec in specs:
        rows = load_system(spec)
        sha = sorted({r["checkpoint_sha256"] for r in rows if r["checkpoint_sha256"]})
        systems[spec.name] = {"source": spec.uri, "reference": spec.reference, "checkpoint_sha256": sha}
        for row in rows:
            stimuli[f"{spec.name}\0{row['content']}"] = {"system": spec.name, **row}
    total = len(stimuli)
    k = (
        clips_per_rater
        if clips_per_rater is not None
        else min(total, len({r["content"] for r in stimuli.values()}))
    )
    if not 1 <= k <= total:
        raise BadInput(f"--clips-per-rater must be within 1..{total} (the number of videos), got {k}")

    pools: dict[str, list[str]] = {name: [] for name in systems}
    for key in sorted(stimuli):
        pools[stimuli[key]["system"]].append(key)
    plans = assign(pools, {key: s["content"] for key, s in stimuli.items()}, raters, k, random.Random(seed))

    used = sorted({key for plan in plans for key in plan})
    opaque = {key: secrets.token_hex(8) for key in used}
    root.mkdir(parents=True, exist_ok=True)
    media = root / MEDIA_DIR
    media.mkdir(exist_ok=True)
    doc_stimuli: dict[str, Any] = {}
    for key in used:
        row = stimuli[key]
        file = f"{MEDIA_DIR}/{opaque[key]}{row['ext']}"
        _copy(row["media"], root / file)
        doc_stimuli[opaque[key]] = {
            "system": row["system"],
            "content": row["content"],
            "language": row["language"],
            "file": file,
            "source": row["media"],
        }
    rater_docs = [
        {"rater": f"r{i + 1:02d}", "token": secrets.token_urlsafe(18), "clips": [opaque[key] for key in plan]}
        for i, plan in enumerate(plans)
    ]
    for name, info in systems.items():
        info["stimuli"] = sum(1 for s in doc_stimuli.values() if s["system"] == name)
    languages = sorted({s["language"] for s in doc_stimuli.values()})
    rater_languages = dict(RATER_LANGUAGES)
    for lang in languages:
        rater_languages.setdefault(lang, lang)
    doc = {
        "format": FORMAT,
        "study_id": secrets.token_hex(8),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seed": seed,
        "clips_per_rater": k,
        "criteria": list(asked),
        "languages": languages,
        "rater_languages": rater_languages,
        "systems": systems,
        "stimuli": doc_stimuli,
        "raters": rater_docs,
    }
    _write_private(root / STUDY_FILE, json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    RatingStore(root / DB_FILE, doc["study_id"], asked)
    links = [f"{base_url.rstrip('/')}/rate/{r['token']}" for r in rater_docs]
    lines = [f"{r['rater']}\t{link}\n" for r, link in zip(rater_docs, links, strict=True)]
    _write_private(root / LINKS_FILE, "".join(lines))

    exposures = Counter(key for plan in plans for key in plan)
    per_system = Counter(stimuli[key]["system"] for plan in plans for key in plan)
    repeats = content_repeats(plans, {key: s["content"] for key, s in stimuli.items()})
    return {
        "study": str(root),
        "study_json": str(root / STUDY_FILE),
        "links_file": str(root / LINKS_FILE),
        "links": links,
        "criteria": list(asked),
        "raters": raters,
        "clips_per_rater": k,
        "videos": total,
        "unassigned_videos": total - len(used),
        "ratings_per_system": dict(sorted(per_system.items())),
        "ratings_per_video": [min(exposures.values()), max(exposures.values())],
        "repeated_content_within_rater": repeats,
    }


def run_create(args: Any) -> dict[str, Any]:
    """The CLI's `mos create`: build the study, print one link per rater on stderr."""
    result = create(
        args.study_dir,
        args.sources or [],
        reference=args.reference,
        raters=args.raters,
        clips_per_rater=args.clips_per_rater,
        seed=args.seed,
        base_url=args.base_url or f"http://{args.host}:{args.port}",
        criteria=getattr(args, "criteria", None),
    )
    for i, link in enumerate(result["links"]):
        print(f"rater r{i + 1:02d}: {link}", file=sys.stderr)
    return result


class Study:
    """A loaded study directory: token and media look-ups for the server, metadata for results."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        path = self.root / STUDY_FILE
        try:
            self.doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise BadInput(
                f"{root} is not a MOS study (no {STUDY_FILE}); run `lipsync mos create` first"
            ) from exc
        except json.JSONDecodeError as exc:
            raise BadInput(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(self.doc, dict) or self.doc.get("format") != FORMAT:
            raise BadInput(f"{path} is not a format-{FORMAT} MOS study")
        self.study_id: str = self.doc["study_id"]
        self.criteria: tuple[str, ...] = parse_criteria(self.doc.get("criteria") or list(CRITERIA))
        self.stimuli: dict[str, dict[str, Any]] = self.doc["stimuli"]
        self.raters = [Rater(r["rater"], r["token"], tuple(r["clips"])) for r in self.doc["raters"]]
        self._by_token = {r.token: r for r in self.raters}
        self.media_root = (self.root / MEDIA_DIR).resolve()

    @property
    def db_path(self) -> Path:
        return self.root / DB_FILE

    def rater(self, token: str) -> Rater | None:
        """The rater holding `token`, or None (an unknown token, or another study's)."""
        return self._by_token.get(token)

    def media_path(self, clip: str) -> Path | None:
        """The media file of a stimulus id, only if it lies inside STUDY_DIR/media (defence in depth)."""
        stimulus = self.stimuli.get(clip)
        if stimulus is None:
            return None
        path = (self.root / stimulus["file"]).resolve()
        if path.parent != self.media_root or not path.is_file():
            return None
        return path
