"""`lipsync mos serve`: the rating page (FastAPI, server-rendered Jinja2 templates).

Routes (TOKEN is the rater's secret from the study; nothing else identifies a rater):
    GET  /rate/TOKEN[?pos=N]    the next unrated clip (or clip N, to change a rating); a thank-you page at the end
    POST /rate/TOKEN            form: clip, realism, sync, naturalness (1-5), comment, language, watched
    GET  /media/TOKEN/CLIP      the clip's video, only for a clip assigned to that rater
Refusals: an unknown token (or another study's) -> 403; no token, an unknown clip or any path that is not a
study media id (`..`, `%2e%2e`, slashes) -> 404; a score outside 1-5, a missing score, an unknown language
or an over-long comment -> 422. Media is looked up by opaque id in study.json, never by a path from the URL.
"""

from __future__ import annotations

import ipaddress
import logging
import math
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from evaluation.mos.db import RatingStore
from evaluation.mos.study import MEDIA_TYPES, Rater, Study

log = logging.getLogger(__name__)
TEMPLATES = Path(__file__).with_name("templates")
MAX_COMMENT = 2000
QUESTIONS = {
    "realism": ("Realism", "Does the face look like a real person on video?"),
    "sync": ("Lip sync", "Do the lip movements match the speech you hear?"),
    "naturalness": ("Naturalness", "Do the face and mouth move naturally (no jitter, blur or artefacts)?"),
    "emotion": ("Emotion", "Does the face keep the speaker's expression?"),
}
SCALE = {1: "Bad", 2: "Poor", 3: "Fair", 4: "Good", 5: "Excellent"}  # ITU-T P.800 ACR labels
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # the token is in the URL
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; media-src 'self'; style-src 'unsafe-inline'; "
    "script-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
}


class Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def create_app(study_dir: str | Path) -> FastAPI:
    """The rating app of one study directory."""
    study = Study(study_dir)
    store = RatingStore(study.db_path, study.study_id, study.criteria)
    templates = Jinja2Templates(directory=str(TEMPLATES))
    languages: dict[str, str] = study.doc["rater_languages"]
    app = FastAPI(title="MOS study", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.study = study
    app.state.store = store

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        if not request.url.path.startswith("/media/"):
            response.headers["Cache-Control"] = "no-store"
        return response

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused) -> Response:
        return templates.TemplateResponse(
            request,
            "message.html",
            {"title": "Not available", "message": exc.message},
            status_code=exc.status,
        )

    def rater_of(token: str) -> Rater:
        rater = study.rater(token)
        if rater is None:
            raise Refused(403, "This link is not valid for this study. Please use the link you were given.")
        return rater

    @app.get("/", response_class=HTMLResponse)
    def index(request: Request) -> Response:
        return templates.TemplateResponse(
            request,
            "message.html",
            {"title": "Video rating study", "message": "Please open the personal link you were given."},
        )

    @app.get("/rate/{token}", response_class=HTMLResponse)
    def rate_page(request: Request, token: str, pos: int | None = None) -> Response:
        rater = rater_of(token)
        done = {r["clip"]: r for r in store.ratings(rater.rater)}
        total = len(rater.clips)
        if pos is None:
            pending = [i for i, clip in enumerate(rater.clips) if clip not in done]
            if not pending:
                return templates.TemplateResponse(
                    request,
                    "done.html",
                    {"token": token, "total": total, "positions": range(1, total + 1)},
                )
            index = pending[0]
        elif 1 <= pos <= total:
            index = pos - 1
        else:
            raise Refused(404, f"There is no clip {pos}; this study has {total} clips for you.")
        clip = rater.clips[index]
        previous = done.get(clip, {})
        context = {
            "token": token,
            "clip": clip,
            "pos": index + 1,
            "total": total,
            "rated": len(done),
            "media_type": MEDIA_TYPES.get(Path(study.stimuli[clip]["file"]).suffix, "video/mp4"),
            "criteria": [(c, *QUESTIONS[c], previous.get(c)) for c in study.criteria],
            "scale": SCALE,
            "languages": languages,
            "language": store.language(rater.rater),
            "comment": previous.get("comment", ""),
            "error": None,
        }
        return templates.TemplateResponse(request, "rate.html", context)

    @app.post("/rate/{token}")
    async def submit(request: Request, token: str) -> Response:
        rater = rater_of(token)
        form = await request.form()
        clip = str(form.get("clip", ""))
        if clip not in rater.clips:
            raise Refused(404, "This clip is not part of your study.")
        scores: dict[str, int] = {}
        for criterion in study.criteria:
            raw = str(form.get(criterion, "")).strip()
            if not raw.isdigit() or not 1 <= int(raw) <= 5:
                raise Refused(422, f"Please give {QUESTIONS[criterion][0]} a score from 1 to 5.")
            scores[criterion] = int(raw)
        comment = str(form.get("comment", "")).strip()
        if len(comment) > MAX_COMMENT:
            raise Refused(422, f"The comment is longer than {MAX_COMMENT} characters.")
        language = str(form.get("language", "")).strip()
        if language and language not in languages:
            raise Refused(422, "Please choose your language from the list.")
        try:
            watched = float(str(form.get("watched", "") or "nan"))
        except ValueError:
            watched = math.nan
        store.upsert(
            rater.rater,
            clip,
            scores,
            comment=comment,
            rater_language=language,
            watched_s=watched if math.isfinite(watched) and watched >= 0 else None,
        )
        return RedirectResponse(f"/rate/{token}", status_code=303)

    @app.get("/media/{token}/{clip}")
    def media(token: str, clip: str) -> Response:
        rater = rater_of(token)
        path = study.media_path(clip) if clip in rater.clips else None
        if path is None:
            raise Refused(404, "No such video.")
        return FileResponse(
            path,
            media_type=MEDIA_TYPES.get(path.suffix, "video/mp4"),
            headers={"Cache-Control": "private, max-age=3600"},
        )

    return app


def serve(study_dir: str, host: str = "127.0.0.1", port: int = 8000) -> dict[str, Any]:
    """Run the rating server until interrupted (binds loopback unless told otherwise)."""
    import uvicorn

    app = create_app(study_dir)
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        log.warning("serving on %s: reachable from other machines; anyone with a link can rate", host)
    log.info("MOS study %s: http://%s:%d/rate/<token> (links in links.txt)", study_dir, host, port)
    # No access log: the URLs carry the raters' tokens.
    uvicorn.run(app, host=host, port=port, access_log=False, log_level="info")
    return {"study": study_dir, "host": host, "port": port}
