"""The web app's sign-in layer, with accounts: who may send what to the Gradio app.

Gradio's own handling had three holes, each closed here, on the outer FastAPI
app (build_server, chatbot/cli/serve.py) in front of the mounted Gradio app:

- ``POST /login`` checked any number of passwords, as fast as argon2 allowed.
  Ours (shadowing Gradio's, which is never reached) goes through
  ``Identity.sign_in``: throttled per address and per account and address,
  failures logged. Too many failures: 429 with Retry-After, no hash checked.
- Sessions never ended. Gradio's token dict is replaced by the identity's
  ``SessionTokens`` (sessions.py): tokens expire and are revoked by a password
  change or removal. ``GET /logout`` ended every session of the user, even
  when a page on another site sent it; ours ends only this session, and only
  for a POST or a GET that the browser says came from the app's own page.
- Cross-site requests were served. A browser states where a request comes
  from (Origin, Referer, Sec-Fetch-Site; scripts cannot forge them in a
  victim's browser): a state-changing request from another origin is
  refused with 403. A request without any of them is from a program, not a
  page, and passes (it holds its own cookie, if any).

Every Gradio path except the sign-in page and its static files needs a
session that is valid now (401 otherwise): several Gradio routes
(heartbeat, cancel, reset, stream, ...) do not check for one themselves.
The OpenAI-compatible API under /v1 uses API keys, not cookies, and is left
to its own checks.

The origin check compares with the Host header: behind a reverse proxy, pass
the browser's Host through (nginx: ``proxy_set_header Host $host``).
"""

from __future__ import annotations

import logging
import math
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.security import OAuth2PasswordRequestForm
from gradio import route_utils
from gradio.routes import App as GradioApp
from starlette.datastructures import Headers
from starlette.routing import Mount
from starlette.types import ASGIApp, Receive, Scope, Send

from .identity import Identity

log = logging.getLogger(__name__)

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
API_PREFIX = "/v1"  # chatbot/openai_api.py: API keys, no cookies
# What the sign-in page loads before anyone has signed in (checked in Chromium).
PUBLIC_PATHS = frozenset({"/", "/login", "/login/", "/logout", "/logout/", "/favicon.ico", "/robots.txt",
                          "/manifest.json", "/theme.css", "/gradio_api/theme.css"})
PUBLIC_PREFIXES = ("/assets/", "/static/", "/svelte/", "/pwa_icon")
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def same_origin(headers: Headers) -> bool | None:
    """Does the browser say this request comes from a page of this app?

    True or False when the browser says (Origin, else Referer, else
    Sec-Fetch-Site); None when nothing says: not a browser page (curl, a script).
    """
    host = headers.get("host")
    origin = headers.get("origin")
    if origin is not None:  # "null" (a sandboxed or file: page) never matches
        return _same_host(origin, host)
    referer = headers.get("referer")
    if referer:
        return _same_host(referer, host)
    site = headers.get("sec-fetch-site")
    if site in ("cross-site", "same-site"):
        return False
    if site == "same-origin":
        return True
    return None  # "none" (typed into the address bar) or absent


def _same_host(url: str, host: str | None) -> bool:
    try:
        source, here = urlsplit(url), urlsplit("//" + (host or ""))
        default = _DEFAULT_PORTS.get(source.scheme)
        source_port = None if source.port == default else source.port
        here_port = None if here.port == default else here.port
    except ValueError:  # a malformed port
        return False
    return bool(source.hostname) and source.hostname == here.hostname and source_port == here_port


class WebGuard:
    """Installs the checks of the module docstring on ``server``; ``attach`` the mounted Gradio app after."""

    def __init__(self, identity: Identity) -> None:
        if identity.sessions is None:
            raise ValueError("the web guard is for apps with accounts")
        self.identity = identity
        self.sessions = identity.sessions
        self._gradio: GradioApp | None = None

    def install(self, server: FastAPI) -> None:
        """Before mounting Gradio at "/": the first matching route wins, and Gradio's would match."""
        server.include_router(self._router())
        server.add_middleware(_GuardMiddleware, guard=self)

    def attach(self, server: FastAPI) -> None:
        """After mounting: Gradio's sign-ins become our sessions; its cookie names are learnt."""
        self._gradio = next(route.app for route in server.routes
                            if isinstance(route, Mount) and isinstance(route.app, GradioApp))
        self._gradio.tokens = self.sessions

    # -- cookies ----------------------------------------------------------------

    def _cookie_names(self) -> tuple[str, str]:
        assert self._gradio is not None, "attach() the Gradio app first"
        return f"access-token-{self._gradio.cookie_id}", f"access-token-unsecure-{self._gradio.cookie_id}"

    def token(self, cookies: dict[str, str]) -> str | None:
        secure, unsecure = self._cookie_names()
        return cookies.get(secure) or cookies.get(unsecure)

    def signed_in(self, cookies: dict[str, str]) -> bool:
        return self._gradio is not None and self.sessions.get(self.token(cookies)) is not None

    # -- routes ---------------------------------------------------------------------

    def _router(self) -> APIRouter:
        router = APIRouter()

        @router.post("/login")
        @router.post("/login/")
        async def login(request: Request, form: OAuth2PasswordRequestForm = Depends()):
            # Gradio's login form strips the name too.
            result = await self.identity.sign_in(form.username.strip(), form.password, _address(request))
            if result.retry_after > 0:
                seconds = math.ceil(result.retry_after)
                raise HTTPException(429, f"Too many failed sign-ins; try again in {seconds} s.",
                                    headers={"Retry-After": str(seconds)})
            if result.token is None:
                raise HTTPException(400, "Incorrect credentials.")
            response = JSONResponse({"success": True})
            secure, unsecure = self._cookie_names()
            # The cookies Gradio sets (its page and its client read them under these names).
            response.set_cookie(secure, result.token, httponly=True, samesite="none", secure=True)
            response.set_cookie(unsecure, result.token, httponly=True)
            return response

        @router.post("/logout")
        @router.post("/logout/")
        @router.get("/logout")
        @router.get("/logout/")
        def logout(request: Request):
            # A GET is what the "Sign out" link sends; a page elsewhere can send one too (an <img>),
            # so a GET must come, by the browser's word, from this app's own page.
            if request.method == "GET" and same_origin(request.headers) is not True:
                return _confirm_page()
            self.sessions.end(self.token(request.cookies))  # this session only; others stay signed in
            assert self._gradio is not None
            root = route_utils.get_root_url(request=request, route_path="/logout",
                                            root_path=self._gradio.root_path)
            response = RedirectResponse(root or "/", status_code=303)
            for name in self._cookie_names():
                response.delete_cookie(name, path="/")
            return response

        return router


def _address(request: Request) -> str:
    # uvicorn puts a trusted proxy's X-Forwarded-For here (its proxy_headers, on by default for 127.0.0.1).
    return request.client.host if request.client else "unknown"


def _confirm_page() -> HTMLResponse:
    """Sign out by a button: the POST it sends carries the page's Origin."""
    body = ("<!doctype html><title>Sign out</title>"  # action "": back to this same URL
            "<form method=post action=''><p>Sign out of Persona Studio?</p>"
            "<button type=submit>Sign out</button></form>")
    # Not framed by another site, which could trick a click.
    return HTMLResponse(body, headers={"X-Frame-Options": "DENY",
                                       "Content-Security-Policy": "frame-ancestors 'none'"})


class _GuardMiddleware:
    """Refuses cross-site state changes (403) and requests without a valid session (401); see the module."""

    def __init__(self, app: ASGIApp, guard: WebGuard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path == API_PREFIX or path.startswith(API_PREFIX + "/"):
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        method = scope["method"]
        if method not in SAFE_METHODS and same_origin(request.headers) is False:
            log.info("refused a cross-site %s %s (Origin %s, Referer %s)", method, path,
                     request.headers.get("origin"), request.headers.get("referer"))
            await JSONResponse({"detail": "Cross-site request refused."}, status_code=403)(scope, receive, send)
            return
        public = path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)
        if not public and method != "OPTIONS" and not self.guard.signed_in(request.cookies):
            await JSONResponse({"detail": {"error": "Not authenticated"}}, status_code=401)(scope, receive, send)
            return
        await self.app(scope, receive, send)
