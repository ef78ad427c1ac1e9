"""Ratings in SQLite (WAL): one row per rater x clip; submitting again replaces the row (upsert).

Every write is its own transaction committed with `synchronous=FULL`, so a rating acknowledged to the
browser survives the server being killed. A connection is opened per call (cheap for SQLite) so the store
is safe to use from the server's thread pool. The study id is recorded in `meta`, so a database is never
mixed up with another study's. Optional criteria (`emotion`) are nullable columns, NULL in studies that do
not ask them; a database made before a column existed gets it (NULL) when it is next opened.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

from core.errors import BadInput

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS ratings (
    rater TEXT NOT NULL,
    clip TEXT NOT NULL,
    realism INTEGER NOT NULL CHECK (realism BETWEEN 1 AND 5),
    sync INTEGER NOT NULL CHECK (sync BETWEEN 1 AND 5),
    naturalness INTEGER NOT NULL CHECK (naturalness BETWEEN 1 AND 5),
    emotion INTEGER CHECK (emotion BETWEEN 1 AND 5),
    comment TEXT NOT NULL DEFAULT '',
    rater_language TEXT NOT NULL DEFAULT '',
    watched_s REAL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    submissions INTEGER NOT NULL DEFAULT 1,
    UNIQUE (rater, clip)
);
CREATE TABLE IF NOT EXISTS raters (
    rater TEXT PRIMARY KEY,
    language TEXT NOT NULL DEFAULT '',
    updated_at REAL NOT NULL
);
"""

REQUIRED = ("realism", "sync", "naturalness")
OPTIONAL = ("emotion",)
UPSERT = """
INSERT INTO ratings (rater, clip, realism, sync, naturalness, emotion, comment, rater_language, watched_s,
                     created_at, updated_at)
VALUES (:rater, :clip, :realism, :sync, :naturalness, :emotion, :comment, :rater_language, :watched_s, :now,
        :now)
ON CONFLICT (rater, clip) DO UPDATE SET
    realism = excluded.realism, sync = excluded.sync, naturalness = excluded.naturalness,
    emotion = excluded.emotion, comment = excluded.comment, rater_language = excluded.rater_language,
    watched_s = coalesce(max(ratings.watched_s, excluded.watched_s), ratings.watched_s, excluded.watched_s),
    updated_at = excluded.updated_at, submissions = ratings.submissions + 1
"""


class RatingStore:
    """The study's ratings database (STUDY_DIR/ratings.sqlite)."""

    def __init__(self, path: str | Path, study_id: str, criteria: tuple[str, ...] = REQUIRED) -> None:
        self.path = Path(path)
        self.criteria = criteria
        with self._connect() as con:
            con.execute("PRAGMA journal_mode=WAL")
            con.executescript(SCHEMA)
            columns = {row["name"] for row in con.execute("PRAGMA table_info(ratings)")}
            for name in OPTIONAL:
                if name not in columns:
                    con.execute(
                        f"ALTER TABLE ratings ADD COLUMN {name} INTEGER CHECK ({name} BETWEEN 1 AND 5)"
                    )
            con.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('study_id', ?)", (study_id,))
            (stored,) = con.execute("SELECT value FROM meta WHERE key = 'study_id'").fetchone()
        if stored != study_id:
            raise BadInput(f"{self.path} belongs to another study ({stored}, not {study_id})")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        with closing(sqlite3.connect(self.path, timeout=30.0)) as con:
            con.row_factory = sqlite3.Row
            con.execute("PRAGMA busy_timeout = 30000")
            con.execute("PRAGMA synchronous = FULL")
            with con:  # one transaction: commit on success, roll back on error
                yield con

    def upsert(
        self,
        rater: str,
        clip: str,
        scores: dict[str, int],
        comment: str = "",
        rater_language: str = "",
        watched_s: float | None = None,
    ) -> None:
        """Store (or replace) the rater's rating of one clip, and remember the rater's language."""
        now = time.time()
        with self._connect() as con:
            con.execute(
                UPSERT,
                {
                    "rater": rater,
                    "clip": clip,
                    **{c: int(scores[c]) for c in REQUIRED},
                    **{c: int(scores[c]) if c in self.criteria else None for c in OPTIONAL},
                    "comment": comment,
                    "rater_language": rater_language,
                    "watched_s": watched_s,
                    "now": now,
                },
            )
            if rater_language:
                con.execute(
                    "INSERT INTO raters (rater, language, updated_at) VALUES (?, ?, ?) "
                    "ON CONFLICT (rater) DO UPDATE SET language = excluded.language, updated_at = excluded.updated_at",
                    (rater, rater_language, now),
                )

    def language(self, rater: str) -> str:
        """The language the rater chose last ('' if none yet)."""
        with self._connect() as con:
            row = con.execute("SELECT language FROM raters WHERE rater = ?", (rater,)).fetchone()
        return row["language"] if row else ""

    def ratings(self, rater: str | None = None) -> list[dict[str, Any]]:
        """All ratings (or one rater's), as plain dicts."""
        with self._connect() as con:
            if rater is None:
                rows = con.execute("SELECT * FROM ratings ORDER BY rater, clip").fetchall()
            else:
                rows = con.execute("SELECT * FROM ratings WHERE rater = ? ORDER BY clip", (rater,)).fetchall()
        return [dict(r) for r in rows]
