"""Helpers the browser tests share: start the app as a subprocess, drive headless Chromium.

Uses Debian's chromium (`make test` installs it) through Playwright's
`executable_path`; Playwright never downloads a browser here.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout=60.0, what="condition", progress=None):
    """``check()``'s first truthy result, polled; AssertionError after ``timeout`` seconds without one.

    With ``progress`` (say, the reply on screen) the wait lasts as long as
    ``progress()`` keeps changing, and times out only after ``timeout`` seconds
    without a change: a whole reply on a loaded machine takes as long as it
    takes, and a stalled one still fails.
    """
    deadline = time.monotonic() + timeout
    last = progress() if progress is not None else None
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        if progress is not None and (now := progress()) != last:
            last, deadline = now, time.monotonic() + timeout
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@contextmanager
def running_app(data_dir: Path, log_path: Path, *extra_args: str):
    """`python app.py` on a free port; yields its URL and stops it afterwards."""
    port = free_port()
    log = open(log_path, "w+")
    server = subprocess.Popen(
        [sys.executable, "app.py", "--data-dir", str(data_dir), "--port", str(port), *extra_args],
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO)

    def listening():
        if server.poll() is not None:
            log.seek(0)
            raise AssertionError(f"the app exited:\n{log.read()}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    try:
        wait_until(listening, timeout=120, what="the app to listen")
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


@contextmanager
def browser_page(url: str, **page_options):
    """A headless Chromium page on `url`, once the chat has shown its greeting."""
    from playwright.sync_api import sync_playwright

    if not os.path.exists(CHROMIUM):
        pytest.fail("Chromium is missing: `make test` installs it, or run `apt-get install chromium`")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(**page_options)
        page.set_default_timeout(60_000)
        page.goto(url)
        page.wait_for_selector("#chatbot .message.bot")
        try:
            yield page
        finally:
            browser.close()


def db_rows(data_dir, sql, *params):
    with sqlite3.connect(data_dir / "chat.db") as db:
        return db.execute(sql, params).fetchall()


def bot_texts(page) -> list[str]:
    return page.locator("#chatbot .message.bot").all_inner_texts()


def plain(text: str) -> str:
    """Text as words only: the page shows replies rendered as Markdown, the store keeps the source."""
    return " ".join(re.sub(r"[*_`#>~|\\-]", " ", text).split())


@contextmanager
def events_sent(page):
    """The Gradio events the page sends to the server (one queue join each) inside the block."""
    sent = []

    def on_request(request):
        if request.method == "POST" and "/queue/join" in request.url:
            sent.append(request.post_data_json)

    page.on("request", on_request)
    try:
        yield sent
    finally:
        page.remove_listener("request", on_request)


def pick_option(page, dropdown: str, option: str, loaded) -> None:
    """Pick `option` in the Dropdown `dropdown` and wait for `loaded()`; the pick is one event.

    A second event from the same pick (a Dropdown sends `input` on the choice and again on
    blur) loads the form twice, and the late second load wipes what the person typed meanwhile.
    """
    page.locator(f"{dropdown} input").click()
    with events_sent(page) as sent:
        page.locator("[role=option]", has_text=option).click()
        wait_until(loaded, what=f"{option} to load")
    assert len(sent) == 1, f"picking {option} sent {len(sent)} events"


def pick_persona(page, name: str, greeting_start: str) -> None:
    pick_option(page, "#persona-picker", name,
                lambda: bot_texts(page) and bot_texts(page)[0].startswith(greeting_start))


def send(page, text: str) -> None:
    page.locator("#message textarea").fill(text)
    page.locator("#send").click()
