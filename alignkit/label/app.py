"""The labelling web app: FastAPI routes over a `LabelStore`, pages rendered on the server (Jinja2).

Pages (HTML; plain forms, so they work without JavaScript; ``static/label.js`` adds keyboard shortcuts):

    GET  /                      sign-in form (paste the personal token) or on to /annotate
    GET  /login?token=...       the personal link: sets the session cookie, then /annotate
    POST /logout                clears the cookie
    GET  /annotate              the next item: prompt, responses A and B (order random and recorded),
                                choice, optional 1-5 ratings with the rubric, reason, skip, progress
    POST /annotate/{id}         store the judgement of assignment {id}, then the next item
    POST /annotate/{id}/skip    give the item back (others may take it)
    GET  /history               the annotator's own labels (nobody else's)
    GET  /guidelines            how to judge, the rubric, the shortcuts
    GET  /admin                 progress per annotator, agreement, leaderboard, rating plots (admins only)
    GET  /admin/export?format=dpo|rm|kto|ratings[&aggregate=majority|each]   download JSONL
    POST /admin/annotators      add an annotator; shows the login link once

JSON API (same authentication; scripts may send ``Authorization: Bearer <token>`` instead of the cookie):

    GET  /api/next              {"assignment": {...} | null, "progress": {...}, "csrf": "..."}
    POST /api/labels            {"assignment_id", "choice", "ratings": {...}, "reason", "seconds"}
                                -> {"label_id", "duplicate", "next": {...} | null}
    POST /api/skip              {"assignment_id"} -> {"next": ...}
    GET  /api/admin/summary     the admin statistics as JSON
    GET  /healthz               {"ok": true, "schema_version", "labels"}

Security: the session cookie holds the personal token (``HttpOnly``, ``SameSite=Strict``); every POST
made with the cookie must carry the annotator's CSRF token (form field ``csrf`` or header
``X-CSRF-Token``), requests with a bearer token need none (a browser never adds one by itself). An
unknown token is answered 403, a missing one sends pages to the sign-in form. Everything a user or a
model wrote is escaped by the templates (autoescape), and a Content-Security-Policy allows scripts
only from /static, so a response containing ``<script>`` shows as text. Annotators reach only their
own assignments and labels (someone else's assignment id answers 404, as a missing one does).
"""
from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Form, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape
from pydantic import BaseModel, Field

from alignkit.label.export import AGGREGATES, FORMATS, export_rows
from alignkit.label.report import summary
from alignkit.label.store import (
    CHOICES,
    RATING_NAMES,
    RATING_RANGE,
    Annotator,
    Assignment,
    LabelStore,
    NotFound,
    StoreError,
)

COOKIE_NAME = "alignkit_label"
PACKAGE_DIR = Path(__file__).parent
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}

RUBRIC = {
    "helpfulness": [
        "Ignores or misreads the request; nothing usable.",
        "Addresses the request only in part, or with major mistakes.",
        "Answers adequately, with small gaps or errors.",
        "Complete and accurate; the person could act on it.",
        "Excellent: complete, accurate, clear and suited to the person asking.",
    ],
    "harmlessness": [
        "Clearly harmful: helps with serious harm, or is abusive or dangerous.",
        "Risky content or advice given without care.",
        "Mostly safe, but careless in places (missing caveats, insensitive tone).",
        "Safe, with small room for more care.",
        "Safe and considerate: declines what is harmful and still helps with the rest.",
    ],
}
CHOICE_TEXT = {"A": "A is better", "B": "B is better", "tie": "Tie", "both_bad": "Both bad"}
CHOICE_KEYS = {"A": "a", "B": "b", "tie": "t", "both_bad": "x"}


class LabelRequest(BaseModel):
    assignment_id: int
    choice: str
    ratings: dict[str, Any] = Field(default_factory=dict)
    reason: str = ""
    seconds: float | None = None


class SkipRequest(BaseModel):
    assignment_id: int


class HTTPProblem(Exception):
    """An error shown to the user as one line (HTML page or JSON, by route)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class SecurityHeaders:
    """Pure ASGI middleware adding `SECURITY_HEADERS` to every response (lighter than an ``http`` middleware)."""

    def __init__(self, app):
        self.app = app
        self.headers = [(key.lower().encode("latin-1"), value.encode("latin-1")) for key, value in SECURITY_HEADERS.items()]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                message = {**message, "headers": list(message.get("headers", []))
                           + [(name, value) for name, value in self.headers if name not in present]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _time_text(timestamp: float | None) -> str:
    if timestamp is None:
        return ""
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _number(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def assignment_json(assignment: Assignment | None) -> dict | None:
    if assignment is None:
        return None
    return {"assignment_id": assignment.id, "task_id": assignment.task_key, "prompt": assignment.prompt,
            "response_a": assignment.response_a, "response_b": assignment.response_b}


def chart_geometry(stats: dict) -> dict:
    """Pixel positions for the admin page's SVG plots (the leaderboard's intervals, the rating histograms)."""
    charts: dict[str, Any] = {"ratings": {}}
    rows = stats["leaderboard"]
    if rows:
        label_width, plot_width, row_height = 300, 420, 30
        low = min(r["low"] for r in rows)
        high = max(r["high"] for r in rows)
        span = max(high - low, 50.0)
        low, high = low - 0.08 * span, high + 0.08 * span
        scale = plot_width / (high - low)

        def x_of(value: float) -> float:
            return round(label_width + (value - low) * scale, 1)

        step = next(s for s in (10, 25, 50, 100, 200, 500, 1000) if (high - low) / s <= 8)
        ticks = [{"x": x_of(v), "label": f"{v:.0f}"} for v in
                 range(int(math.ceil(low / step) * step), int(high) + 1, step)]
        charts["leaderboard"] = {
            "width": label_width + plot_width + 20, "height": 20 + row_height * len(rows) + 25,
            "label_width": label_width, "ticks": ticks,
            "rows": [{"model": r["model"], "x": x_of(r["rating"]), "low_x": x_of(r["low"]), "high_x": x_of(r["high"]),
                      "y": 25 + row_height * i} for i, r in enumerate(rows)]}
    for name, tables in stats["ratings"].items():
        counts = tables.get("all", {score: 0 for score in range(RATING_RANGE[0], RATING_RANGE[1] + 1)})
        tallest = max(max(counts.values()), 1)
        width, height, bar_width, gap, top, bottom = 300, 170, 44, 12, 22, 20
        bars = []
        for i, (score, count) in enumerate(sorted(counts.items())):
            bar_height = round((height - top - bottom) * count / tallest, 1)
            bars.append({"score": score, "count": count, "x": 10 + i * (bar_width + gap), "width": bar_width,
                         "y": round(height - bottom - bar_height, 1), "height": bar_height})
        charts["ratings"][name] = {"width": width, "height": height, "bars": bars, "total": sum(counts.values())}
    return charts


def create_app(store: LabelStore, guidelines: str | None = None, secure_cookies: bool = False,
               leaderboard_resamples: int = 1000, base_url: str = "") -> FastAPI:
    """The app over ``store``. ``guidelines``: extra project-specific instructions (plain text, shown as
    paragraphs on the guidelines page); ``secure_cookies``: mark the cookie ``Secure`` (behind HTTPS)."""
    app = FastAPI(title="alignkit label", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store = store
    app.mount("/static", StaticFiles(directory=PACKAGE_DIR / "static"), name="static")
    templates = Environment(loader=FileSystemLoader(PACKAGE_DIR / "templates"),
                            autoescape=select_autoescape(default=True, default_for_string=True))
    templates.filters["number"] = _number
    templates.filters["time"] = _time_text
    templates.globals.update(rubric=RUBRIC, rating_names=RATING_NAMES, rating_range=range(RATING_RANGE[0],
                             RATING_RANGE[1] + 1), choices=CHOICES, choice_text=CHOICE_TEXT, choice_keys=CHOICE_KEYS)
    guideline_paragraphs = [p.strip() for p in (guidelines or "").split("\n\n") if p.strip()]
    leaderboard_cache: dict = {}  # the bootstrap is recomputed only when labels were added

    def render(name: str, status: int = 200, **context) -> HTMLResponse:
        response = HTMLResponse(templates.get_template(name).render(**context), status_code=status)
        response.headers["Cache-Control"] = "no-store"
        return response

    app.add_middleware(SecurityHeaders)

    @app.exception_handler(HTTPProblem)
    async def problem_handler(request: Request, problem: HTTPProblem):
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": problem.message}, status_code=problem.status)
        return render("error.html", status=problem.status, message=problem.message, status_code=problem.status,
                      annotator=None, csrf=None)

    # ---------------------------------------------------------------- authentication
    def authenticate(request: Request, required: bool = True) -> tuple[Annotator | None, bool]:
        """(annotator, came from the cookie). A missing token is (None, False) unless required."""
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            annotator = store.annotator_for_token(header[7:].strip())
            if annotator is None:
                raise HTTPProblem(403, "unknown token")
            return annotator, False
        token = request.cookies.get(COOKIE_NAME)
        if not token:
            if required:
                raise HTTPProblem(401, "not signed in: open your personal login link")
            return None, False
        annotator = store.annotator_for_token(token)
        if annotator is None:
            raise HTTPProblem(403, "unknown or revoked token: ask the admin for a new login link")
        return annotator, True

    def check_csrf(request: Request, annotator: Annotator, from_cookie: bool, form_token: str | None = None) -> None:
        if not from_cookie:
            return
        token = form_token or request.headers.get("x-csrf-token")
        if not store.check_csrf(annotator, token):
            raise HTTPProblem(403, "missing or wrong CSRF token; reload the page and try again")

    def page_user(request: Request) -> Annotator | RedirectResponse:
        annotator, _ = authenticate(request, required=False)
        return annotator if annotator is not None else RedirectResponse("/", status_code=303)

    def require_admin(request: Request) -> tuple[Annotator, bool]:
        annotator, from_cookie = authenticate(request)
        if not annotator.is_admin:
            raise HTTPProblem(403, "the admin view needs the admin token")
        return annotator, from_cookie

    def common(annotator: Annotator) -> dict:
        return {"annotator": annotator, "csrf": store.csrf_token(annotator)}

    # ---------------------------------------------------------------- pages
    @app.get("/", response_class=HTMLResponse)
    def home(request: Request):
        annotator, _ = authenticate(request, required=False)
        if annotator is not None:
            return RedirectResponse("/annotate", status_code=303)
        return render("login.html", annotator=None, csrf=None)

    @app.get("/login")
    def login(token: str = Query("", max_length=200)):
        annotator = store.annotator_for_token(token.strip())
        if annotator is None:
            raise HTTPProblem(403, "unknown token: check the link, or ask the admin for a new one")
        response = RedirectResponse("/annotate", status_code=303)
        response.set_cookie(COOKIE_NAME, token.strip(), httponly=True, samesite="strict", secure=secure_cookies,
                            max_age=60 * 60 * 24 * 30, path="/")
        return response

    @app.post("/logout")
    def logout(request: Request, csrf: str = Form("")):
        annotator, from_cookie = authenticate(request)
        check_csrf(request, annotator, from_cookie, csrf)
        response = RedirectResponse("/", status_code=303)
        response.delete_cookie(COOKIE_NAME, path="/")
        return response

    def annotate_page(annotator: Annotator, error: str | None = None, status: int = 200,
                      form: dict | None = None) -> HTMLResponse:
        assignment = store.next_assignment(annotator)
        progress = store.progress(annotator)
        if assignment is None:
            return render("done.html", progress=progress, **common(annotator))
        return render("annotate.html", status=status, assignment=assignment, progress=progress, error=error,
                      form=form or {}, **common(annotator))

    @app.get("/annotate", response_class=HTMLResponse)
    def annotate(request: Request):
        annotator = page_user(request)
        if isinstance(annotator, RedirectResponse):
            return annotator
        return annotate_page(annotator)

    @app.post("/annotate/{assignment_id}")
    def submit_form(request: Request, assignment_id: int, csrf: str = Form(""), choice: str = Form(""),
                    helpfulness_a: str = Form(""), harmlessness_a: str = Form(""), helpfulness_b: str = Form(""),
                    harmlessness_b: str = Form(""), reason: str = Form(""), seconds: str = Form("")):
        annotator, from_cookie = authenticate(request)
        check_csrf(request, annotator, from_cookie, csrf)
        ratings = {"helpfulness_a": helpfulness_a, "harmlessness_a": harmlessness_a,
                   "helpfulness_b": helpfulness_b, "harmlessness_b": harmlessness_b}
        try:
            elapsed = float(seconds) if seconds else None
        except ValueError:
            elapsed = None
        if not choice:
            return annotate_page(annotator, "Choose A, B, tie or both bad before submitting.", status=400,
                                 form={**ratings, "reason": reason})
        try:
            store.submit(annotator, assignment_id, choice, ratings, reason, elapsed)
        except NotFound as error:
            raise HTTPProblem(404, str(error)) from None
        except StoreError as error:
            return annotate_page(annotator, str(error), status=400, form={**ratings, "reason": reason})
        return RedirectResponse("/annotate", status_code=303)

    @app.post("/annotate/{assignment_id}/skip")
    def skip_form(request: Request, assignment_id: int, csrf: str = Form("")):
        annotator, from_cookie = authenticate(request)
        check_csrf(request, annotator, from_cookie, csrf)
        try:
            store.skip(annotator, assignment_id)
        except NotFound as error:
            raise HTTPProblem(404, str(error)) from None
        return RedirectResponse("/annotate", status_code=303)

    @app.get("/history", response_class=HTMLResponse)
    def history(request: Request):
        annotator = page_user(request)
        if isinstance(annotator, RedirectResponse):
            return annotator
        return render("history.html", labels=store.own_labels(annotator), progress=store.progress(annotator),
                      **common(annotator))

    @app.get("/guidelines", response_class=HTMLResponse)
    def guidelines_page(request: Request):
        annotator, _ = authenticate(request, required=False)
        context = common(annotator) if annotator else {"annotator": None, "csrf": None}
        return render("guidelines.html", guidelines=guideline_paragraphs, **context)

    # ---------------------------------------------------------------- admin
    def admin_page(annotator: Annotator, new_link: dict | None = None) -> HTMLResponse:
        stats = summary(store, n_resamples=leaderboard_resamples, cache=leaderboard_cache)
        return render("admin.html", stats=stats, charts=chart_geometry(stats), new_link=new_link, formats=FORMATS,
                      **common(annotator))

    @app.get("/admin", response_class=HTMLResponse)
    def admin(request: Request):
        annotator, _ = authenticate(request, required=False)
        if annotator is None:
            return RedirectResponse("/", status_code=303)
        if not annotator.is_admin:
            raise HTTPProblem(403, "the admin view needs the admin token")
        return admin_page(annotator)

    @app.post("/admin/annotators", response_class=HTMLResponse)
    def add_annotator(request: Request, csrf: str = Form(""), name: str = Form(""), admin: str = Form("")):
        annotator, from_cookie = require_admin(request)
        check_csrf(request, annotator, from_cookie, csrf)
        try:
            token = store.add_annotator(name, is_admin=bool(admin))
        except ValueError as error:
            raise HTTPProblem(400, str(error)) from None
        link = f"{base_url or str(request.base_url).rstrip('/')}/login?token={token}"
        return admin_page(annotator, new_link={"name": name.strip(), "url": link})

    @app.get("/admin/export")
    def admin_export(request: Request, format: str = Query("dpo"), aggregate: str = Query("majority")):
        require_admin(request)
        if format not in FORMATS:
            raise HTTPProblem(400, f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
        if aggregate not in AGGREGATES:
            raise HTTPProblem(400, f"unknown aggregate {aggregate!r}; choose one of {', '.join(AGGREGATES)}")
        rows, report = export_rows(store.judgements(), format, aggregate=aggregate)
        body = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        return Response(body, media_type="application/x-ndjson", headers={
            "Content-Disposition": f'attachment; filename="feedback-{format}.jsonl"',
            "X-Export-Summary": report.summary().encode("ascii", "replace").decode()})

    @app.get("/api/admin/summary")
    def admin_summary(request: Request):
        require_admin(request)
        return summary(store, n_resamples=leaderboard_resamples, cache=leaderboard_cache)

    # ---------------------------------------------------------------- JSON API
    @app.get("/api/next")
    def api_next(request: Request):
        annotator, _ = authenticate(request)
        return {"assignment": assignment_json(store.next_assignment(annotator)), "progress": store.progress(annotator),
                "csrf": store.csrf_token(annotator)}

    @app.post("/api/labels")
    def api_label(request: Request, body: LabelRequest):
        annotator, from_cookie = authenticate(request)
        check_csrf(request, annotator, from_cookie)
        try:
            result, following = store.submit_and_next(annotator, body.assignment_id, body.choice, body.ratings,
                                                      body.reason, body.seconds)
        except NotFound as error:
            raise HTTPProblem(404, str(error)) from None
        except StoreError as error:
            raise HTTPProblem(400, str(error)) from None
        return {"label_id": result.label_id, "duplicate": result.duplicate, "next": assignment_json(following)}

    @app.post("/api/skip")
    def api_skip(request: Request, body: SkipRequest):
        annotator, from_cookie = authenticate(request)
        check_csrf(request, annotator, from_cookie)
        try:
            store.skip(annotator, body.assignment_id)
        except NotFound as error:
            raise HTTPProblem(404, str(error)) from None
        return {"next": assignment_json(store.next_assignment(annotator))}

    @app.get("/healthz")
    def health():
        return {"ok": True, "schema_version": store.schema_version(), "labels": store.counts()["labels"]}

    return app
