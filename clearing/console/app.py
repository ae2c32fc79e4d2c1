"""The console's routes, mounted at ``/console`` by the receiver's app (``clearing/app.py``).

Every page needs a signed-in operator (else it answers with the sign-in page's address); every
form is a POST carrying the session's CSRF token; only an admin changes the action list, and
each change goes through the receiver's own path (:meth:`Receiver.add_action`,
:meth:`Receiver.remove_action`: the signed list's serial moves) and into the audit, as do
refused sign-ins and refused changes. Responses carry a Content-Security-Policy that allows
nothing but this server's own scripts, styles and images.
"""

from __future__ import annotations

import re
import threading
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import parse_qs, quote

from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from farebox.protocol.settlement import parse_utc, utc_iso

from farebox.clearing.console import charts
from farebox.clearing.console.auth import COOKIE, SESSION_SECONDS, Session, Sessions, authenticate
from farebox.clearing.console.data import (
    FLEET_SORTS, ConsoleData, Operator, audit_into, now_utc,
)

HERE = Path(__file__).parent
MAX_FORM_BYTES = 64 * 1024
#: the list's reasons (the wire format's) and how the console names them
REASONS = {"lost": "loss report", "aavs_suspended": "AAVS suspension", "cancelled": "cancelled"}
HONG_KONG = timezone(timedelta(hours=8))
#: sign-ins refused for one name from one address within LOCKOUT before they are refused
#: without a check
MAX_REFUSALS, LOCKOUT = 5, timedelta(minutes=15)
#: password checks (Argon2id, 64 MiB each) running at once in one process
PASSWORD_CHECKS = 2
_CARD = re.compile(r"\s*(\d{8})\s*")
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def money(cents: int | None) -> str:
    if cents is None:
        return ""
    sign = "-" if cents < 0 else ""
    cents = abs(int(cents))
    return f"{sign}{cents // 100:,}.{cents % 100:02d}"


def _environment() -> Environment:
    env = Environment(loader=FileSystemLoader(HERE / "templates"),
                      autoescape=select_autoescape(["html"]), trim_blocks=True,
                      lstrip_blocks=True)
    env.filters["money"] = money
    env.filters["card"] = lambda n: f"{int(n):08d}"
    return env


class Console:
    def __init__(self, receiver) -> None:
        self.receiver = receiver
        self.data = ConsoleData(receiver.store)
        self.sessions = Sessions.of(self.data)
        self.env = _environment()
        self.checks = threading.BoundedSemaphore(PASSWORD_CHECKS)

    # -- plumbing ------------------------------------------------------------------------------

    def session(self, request: Request) -> tuple[Session, bool]:
        """The request's session, or a new one without an operator (True: set its cookie)."""
        found = self.sessions.read(request.cookies.get(COOKIE))
        return (found, False) if found is not None else (self.sessions.new(None), True)

    def set_cookie(self, response: Response, request: Request, session: Session) -> None:
        response.set_cookie(COOKIE, self.sessions.cookie(session), max_age=SESSION_SECONDS,
                            path="/console", httponly=True, samesite="strict",
                            secure=request.url.scheme == "https")

    async def operator(self, session: Session) -> Operator | None:
        if session.operator is None:
            return None
        found = await run_in_threadpool(self.data.operator, session.operator)
        if found is None or not self.sessions.belongs(session, found):
            return None  # removed, or its password changed since this session signed in
        return found

    def render(self, request: Request, name: str, session: Session, operator: Operator | None,
               http_status: int = 200, **context) -> HTMLResponse:
        html = self.env.get_template(name).render(
            operator=operator, csrf=self.sessions.csrf(session), page=name.split(".")[0],
            reasons=REASONS, **context)
        return HTMLResponse(html, status_code=http_status, headers=HEADERS)

    async def form(self, request: Request) -> dict[str, str] | None:
        """The urlencoded body's fields (the first of each), None when it is too big."""
        body, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_FORM_BYTES:
                return None
            body.append(chunk)
        try:
            fields = parse_qs(b"".join(body).decode("utf-8", "replace"), keep_blank_values=True,
                              max_num_fields=32)
        except ValueError:  # more fields than any form has: refused as a bad form (403)
            return None
        return {k: v[0] for k, v in fields.items()}

    def page(self, handler):
        """A page for signed-in operators: to the sign-in page otherwise."""
        async def endpoint(request: Request) -> Response:
            session, fresh = self.session(request)
            operator = await self.operator(session)
            if operator is None:
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                response: Response = RedirectResponse(
                    f"/console/login?next={quote(target, safe='')}", status_code=303)
            else:
                response = await handler(request, session, operator)
            if fresh:
                self.set_cookie(response, request, session)
            return response
        return endpoint

    def refuse(self, request, session, operator, status, message) -> HTMLResponse:
        return self.render(request, "refused.html", session, operator, http_status=status,
                           message=message)

    # -- sign-in -------------------------------------------------------------------------------

    async def login(self, request: Request) -> Response:
        session, fresh = self.session(request)
        target = _local(request.query_params.get("next"))
        if request.method == "GET":
            response: Response = self.render(request, "login.html", session, None, target=target,
                                             error=None)
            if fresh:
                self.set_cookie(response, request, session)
            return response
        fields = await self.form(request)
        if fields is None or fresh or not self.sessions.csrf_ok(session, fields.get("csrf")):
            return self.refuse(request, session, None, 403, "the form's CSRF token is missing "
                               "or wrong: load the sign-in page again")
        name, password = fields.get("name", "")[:64], fields.get("password", "")
        now = utc_iso(now_utc())
        since = utc_iso(now_utc() - LOCKOUT)
        # the lockout counts refusals of this name from this address: another address cannot
        # lock an operator out; the refusals said during a lockout are not counted (written
        # once per lockout), so a lockout ends LOCKOUT after the last wrong password
        source = request.client.host if request.client else "?"
        wrong = f"wrong name or password (from {source})"
        who = name or "(none)"
        if await run_in_threadpool(self.data.refusals_since, who, since, "sign-in refused",
                                   wrong) >= MAX_REFUSALS:
            locked = f"too many refused sign-ins from {source}: locked for a while"
            if not await run_in_threadpool(self.data.refusals_since, who, since,
                                           "sign-in locked", locked):
                await run_in_threadpool(self.data.audit, now, who, "sign-in locked", None,
                                        locked)
            return self.render(request, "login.html", session, None, http_status=429,
                               target=_local(fields.get("next")),
                               error="too many refused sign-ins for this name: try again in "
                                     f"{LOCKOUT.seconds // 60} minutes")
        # an Argon2id check takes 64 MiB and a thread: at most PASSWORD_CHECKS at once, so a
        # flood of sign-ins can neither exhaust memory nor the threads the settlement API uses
        if not self.checks.acquire(blocking=False):
            response = self.render(request, "login.html", session, None, http_status=503,
                                   target=_local(fields.get("next")),
                                   error="busy: try again in a moment")
            response.headers["Retry-After"] = "1"
            return response
        try:
            operator = await run_in_threadpool(authenticate, self.data, name, password)
        finally:
            self.checks.release()
        if operator is None:
            await run_in_threadpool(self.data.audit, now, who, "sign-in refused", None, wrong)
            return self.render(request, "login.html", session, None, http_status=401,
                               target=_local(fields.get("next")),
                               error="wrong name or password")
        await run_in_threadpool(self.data.audit, now, operator.name, "signed in", None,
                                operator.role)
        signed = self.sessions.new(operator)  # a new nonce: no session fixation
        response = RedirectResponse(_local(fields.get("next")) or "/console/fleet",
                                    status_code=303)
        self.set_cookie(response, request, signed)
        return response

    async def logout(self, request: Request) -> Response:
        session, _ = self.session(request)
        fields = await self.form(request)
        if fields is None or not self.sessions.csrf_ok(session, fields.get("csrf")):
            return self.refuse(request, session, None, 403, "the form's CSRF token is missing "
                               "or wrong")
        operator = await self.operator(session)
        if operator is not None:  # every session of the account ends, a copied cookie too
            await run_in_threadpool(self.data.end_sessions, operator.name, utc_iso(now_utc()))
        response = RedirectResponse("/console/login", status_code=303)
        self.set_cookie(response, request, self.sessions.new(None))
        return response

    # -- pages ---------------------------------------------------------------------------------

    async def fleet(self, request, session, operator) -> Response:
        q = request.query_params
        sort = q.get("sort") if q.get("sort") in FLEET_SORTS else "status"
        descending = q.get("desc") == "1"
        status = q.get("status") if q.get("status") in ("red", "amber", "green") else ""
        text = (q.get("q") or "")[:64]
        rows = await run_in_threadpool(lambda: self.data.fleet(
            now_utc(), sort=sort, descending=descending, status=status or None, text=text))
        counts = {c: sum(r["status"] == c for r in rows) for c in ("red", "amber", "green")}
        return self.render(request, "fleet.html", session, operator, rows=rows, sort=sort,
                           descending=descending, status=status, text=text, counts=counts,
                           sorts=FLEET_SORTS)

    async def day(self, request, session, operator) -> Response:
        wanted = request.query_params.get("d")
        if wanted:
            try:
                parsed = date.fromisoformat(wanted)
            except ValueError:
                return self.refuse(request, session, operator, 400, "a day is YYYY-MM-DD")
            if not date(1990, 1, 1) <= parsed <= date(2199, 12, 31):
                return self.refuse(request, session, operator, 400,
                                   "a day of the scheme is from 1990 to 2199")
            day = parsed.isoformat()
        else:
            day = await run_in_threadpool(self.data.latest_day) or now_utc().date().isoformat()
        shown = await run_in_threadpool(self.data.day, day)
        committed = [t for t in shown["totals"] if t["state"] == "committed"]
        return self.render(request, "day.html", session, operator, **shown,
                           hours_svg=Markup(charts.hours(shown["hours"])),
                           value_svg=Markup(charts.values(
                               [(t["type"], t["amount_cents"]) for t in committed])))

    async def card(self, request, session, operator) -> Response:
        text = request.query_params.get("number")
        if not text:
            return self.render(request, "card.html", session, operator, shown=None, text="")
        match = _CARD.fullmatch(text)
        if match is None:
            return self.render(request, "card.html", session, operator, shown=None, text=text,
                               error="a card number is 8 digits", http_status=400)
        shown = await run_in_threadpool(self.data.card, int(match.group(1)))
        return self.render(request, "card.html", session, operator, shown=shown, text=text,
                           default_at=datetime.now(HONG_KONG).strftime("%Y-%m-%dT%H:%M"))

    async def batches(self, request, session, operator) -> Response:
        terminal = (request.query_params.get("terminal") or "")[:64]
        rows = await run_in_threadpool(self.data.batches, 200, terminal)
        return self.render(request, "batches.html", session, operator, rows=rows,
                           terminal=terminal)

    async def batch(self, request, session, operator) -> Response:
        source, number = request.path_params["source"], request.path_params["number"]
        shown = await run_in_threadpool(self.data.batch, source, number)
        if shown is None:
            return self.refuse(request, session, operator, 404, "no such batch")
        return self.render(request, "batch.html", session, operator, batch=shown)

    async def actions(self, request, session, operator, *, error=None, done=None,
                      status=200) -> Response:
        serial, entries = await run_in_threadpool(self.data.actions)
        default_at = datetime.now(HONG_KONG).strftime("%Y-%m-%dT%H:%M")
        return self.render(request, "actions.html", session, operator, serial=serial,
                           entries=entries, error=error, done=done, default_at=default_at,
                           http_status=status)

    async def audit(self, request, session, operator) -> Response:
        rows = await run_in_threadpool(self.data.audit_log, 500)
        return self.render(request, "audit.html", session, operator, rows=rows)

    # -- changes -------------------------------------------------------------------------------

    def change(self, handler):
        """A POST that changes the list: a signed-in operator, the CSRF token, the admin
        role; each refusal audited."""
        async def endpoint(request: Request) -> Response:
            session, _ = self.session(request)
            operator = await self.operator(session)
            fields = await self.form(request)
            now = utc_iso(now_utc())
            who = operator.name if operator else "(not signed in)"
            if fields is None or not self.sessions.csrf_ok(session, fields.get("csrf")):
                await run_in_threadpool(self.data.audit, now, who, "change refused", None,
                                        f"{request.url.path}: CSRF token missing or wrong")
                return self.refuse(request, session, operator, 403, "the form's CSRF token is "
                                   "missing or wrong: nothing was changed")
            if operator is None:
                return RedirectResponse("/console/login", status_code=303)
            if not operator.admin:
                await run_in_threadpool(self.data.audit, now, who, "change refused", None,
                                        f"{request.url.path}: the {operator.role} role only "
                                        "reads")
                return self.refuse(request, session, operator, 403, f"{operator.name} is a "
                                   f"{operator.role}: only an admin changes the action list; "
                                   "nothing was changed")
            return await handler(request, session, operator, fields, now)
        return endpoint

    async def add(self, request, session, operator, fields, now) -> Response:
        match = _CARD.fullmatch(fields.get("card", ""))
        reason, note = fields.get("reason", ""), fields.get("note", "").strip()[:500]
        error = None
        if match is None:
            error = "a card number is 8 digits"
        elif reason not in REASONS:
            error = f"a reason is one of {', '.join(REASONS.values())}"
        elif not note:
            error = "say why (the note is kept in the audit)"
        at = now
        if error is None and fields.get("at"):
            try:
                local = datetime.fromisoformat(fields["at"])
                at = utc_iso((local if local.tzinfo else local.replace(tzinfo=HONG_KONG))
                             .astimezone(timezone.utc))
                if parse_utc(at) > now_utc() + timedelta(minutes=5):
                    error = "a report's time is not in the future"
            except ValueError:
                error = "the report's time is YYYY-MM-DDTHH:MM (Hong Kong time)"
        if error is not None:
            return await self.actions(request, session, operator, error=error, status=400)
        card = int(match.group(1))
        def audited(db, serial):  # in the change's own transaction: both or neither
            audit_into(db, now, operator.name, "listed", card,
                       f"{REASONS[reason]} reported {at}; list serial {serial}; note: {note}")

        serial = await run_in_threadpool(self.receiver.add_action, card, reason, at, now,
                                         audited)
        return RedirectResponse(f"/console/actions?done=listed+{card:08d}+serial+{serial}",
                                status_code=303)

    async def remove(self, request, session, operator, fields, now) -> Response:
        match = _CARD.fullmatch(fields.get("card", ""))
        note = fields.get("note", "").strip()[:500]
        if match is None or not note:
            return await self.actions(request, session, operator, status=400,
                                      error="taking a card off needs its number and a note")
        card = int(match.group(1))
        def audited(db, serial):  # in the change's own transaction: both or neither
            audit_into(db, now, operator.name, "taken off", card,
                       f"list serial {serial}; note: {note}")

        serial = await run_in_threadpool(self.receiver.remove_action, card, audited)
        if serial is None:
            return await self.actions(request, session, operator, status=400,
                                      error=f"card {card:08d} is not on the list")
        return RedirectResponse(f"/console/actions?done=took+{card:08d}+off+serial+{serial}",
                                status_code=303)

    async def actions_page(self, request, session, operator) -> Response:
        done = (request.query_params.get("done") or "")[:80] or None
        return await self.actions(request, session, operator, done=done)


def _local(target: str | None) -> str:
    """A redirect target inside the console only (never another site)."""
    if target and target.startswith("/console/") and "//" not in target and "\\" not in target:
        return target
    return ""


def console_mount(receiver) -> Mount:
    console = Console(receiver)
    page = console.page

    async def home(request: Request) -> Response:
        return RedirectResponse("/console/fleet", status_code=303)

    routes = [
        Route("/", home, methods=["GET"]),
        Route("/login", console.login, methods=["GET", "POST"]),
        Route("/logout", console.logout, methods=["POST"]),
        Route("/fleet", page(console.fleet), methods=["GET"]),
        Route("/day", page(console.day), methods=["GET"]),
        Route("/card", page(console.card), methods=["GET"]),
        Route("/batches", page(console.batches), methods=["GET"]),
        Route("/batches/{source:int}/{number:int}", page(console.batch), methods=["GET"]),
        Route("/actions", page(console.actions_page), methods=["GET"]),
        Route("/actions/add", console.change(console.add), methods=["POST"]),
        Route("/actions/remove", console.change(console.remove), methods=["POST"]),
        Route("/audit", page(console.audit), methods=["GET"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    return Mount("/console", app=_Headed(Starlette(routes=routes)))


class _Headed:
    """Every console response carries the security headers (redirects, static files, 404s
    too), unless it set its own."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def headed(message) -> None:
            if message["type"] == "http.response.start":
                have = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k.lower().encode(), v.encode()) for k, v in HEADERS.items()
                         if k.lower().encode() not in have]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, headed)
