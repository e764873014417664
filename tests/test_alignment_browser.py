"""The Alignment tab in a real browser: a job started from the tab runs in the worker process the
server starts, and the page shows its progress and curves move until it succeeds.

A seeded store (same-context pairs for the pirate) and a tiny random model with the real tokenizer.
"""

from __future__ import annotations

import os
import signal
from contextlib import suppress

import pytest
from browser_helpers import browser_page, db_rows, running_app, wait_until
from test_align_cli import fill

from chatbot.store import ChatStore

pytestmark = [pytest.mark.browser, pytest.mark.model]


def stop_worker(data_dir) -> None:
    """The worker the server started is detached (it outlives a server restart): stop it here."""
    lock = data_dir / "worker.lock"
    pid = lock.read_text().strip() if lock.exists() else ""
    if pid.isdigit():
        with suppress(ProcessLookupError):
            os.killpg(int(pid), signal.SIGKILL)  # its own session: the job's processes go with it


@pytest.fixture
def seeded(data_dir):
    store = ChatStore.open(f"sqlite:///{data_dir / 'chat.db'}")
    fill(store, 30)
    store.close()
    yield data_dir
    stop_worker(data_dir)


def test_start_a_job_from_the_tab_and_watch_it_train(seeded, tiny_model, tmp_path):
    data_dir = seeded
    with running_app(data_dir, tmp_path / "server.log") as url, browser_page(url) as page:
        page.get_by_role("tab", name="Alignment").click()
        summary = page.locator("#alignment-data")
        wait_until(lambda: "Same-context pairs" in summary.inner_text(), what="the first persona's data")
        page.locator("#alignment-persona input").click()
        page.locator("[role=option]", has_text="pirate").click()
        wait_until(lambda: "Same-context pairs: 30" in summary.inner_text(), what="the persona's data")
        assert "People: 30 👍 / 30 👎" in summary.inner_text()

        page.locator("#alignment-recipe input").click()
        page.locator("[role=option]", has_text="reward_cpu.yaml").click()
        editor = page.locator("#alignment-recipe-text textarea")
        wait_until(lambda: "lora_r" in editor.input_value(), what="the recipe in the editor")
        # Long enough (a tiny model does ~20 steps/s) for a few of the page's polls to land mid-run.
        editor.fill(f"base_model: {tiny_model}\nmax_steps: 400\nsave_steps: 1000\nmin_pairs: 8\n"
                    "per_device_train_batch_size: 4\nlearning_rate: 1.0e-3\n")
        page.locator("#alignment-start").click()
        notice = page.locator("#alignment-notice")
        wait_until(lambda: "Job 1 queued" in notice.inner_text(), what="the job to be queued")

        progress = page.locator("#alignment-progress")

        def shown() -> tuple[str, float]:
            if not progress.count():
                return "", 0.0
            return progress.get_attribute("data-status") or "", float(progress.get_attribute("data-progress") or 0)

        # Progress moves while it trains (the worker is another process; the page polls).
        seen = set()

        def moving() -> bool:
            status, value = shown()
            if status == "running" and 0 < value < 1:
                seen.add(value)
            return len(seen) >= 2

        wait_until(moving, timeout=180, what="the progress bar to move while the job runs", progress=shown)
        curve = page.locator("#alignment-curves")
        wait_until(lambda: curve.locator("canvas, svg .mark-line, svg path").count() > 0, timeout=120,
                   what="the curve to appear", progress=shown)
        wait_until(lambda: shown()[0] == "succeeded", timeout=180, what="the job to succeed", progress=shown)
        assert "job 1 · reward · succeeded · 100%" in progress.inner_text()
        assert 'job 1: finished: {"run": 1, "version": ' in page.locator("#alignment-log textarea").input_value()

    assert db_rows(data_dir, "select status, kind, persona_id, requested_by from jobs") == \
        [("succeeded", "reward", "pirate", "User")]
    assert db_rows(data_dir, "select status from alignment_runs") == [("succeeded",)]
    assert db_rows(data_dir, "select status, run_id from model_versions where run_id is not null") == \
        [("candidate", 1)]
