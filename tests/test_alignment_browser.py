"""The Alignment tab in a real browser: a job started from the tab runs in the worker process the
server starts, and the page shows its progress and curves move until it succeeds.

A seeded store (same-context pairs for the pirate) and a tiny random model with the real tokenizer.
"""

from __future__ import annotations


import pytest
from browser_helpers import REPO, browser_page, db_rows, pick_persona, running_app, send, wait_until
from cli_helpers import stop_worker
from test_align_cli import fill

from chatbot.store import ChatStore

pytestmark = [pytest.mark.browser, pytest.mark.model]


@pytest.fixture
def seeded(data_dir):
    store = ChatStore.open(f"sqlite:///{data_dir / 'chat.db'}")
    fill(store, 30)
    store.close()
    yield data_dir
    stop_worker(data_dir)


def pick(page, dropdown: str, option: str) -> None:
    page.locator(f"{dropdown} input").click()
    page.locator("[role=option]", has_text=option).first.click()


def run_job(page, recipe: str, text: str, number: int, part: str = "policy") -> None:
    """Start a job from the tab with an edited recipe; wait until the page shows it succeeded,
    having seen its progress bar move and its curve drawn while it ran."""
    pick(page, "#alignment-recipe", recipe)
    editor = page.locator("#alignment-recipe-text textarea")
    shipped = (REPO / "alignment" / "recipes" / recipe).read_text()
    # Typed only once the picked recipe is shown: a late load would overwrite what was typed.
    wait_until(lambda: editor.input_value().strip() == shipped.strip(), what=f"{recipe} in the editor")
    editor.fill(text)
    page.locator("#alignment-part").get_by_label(part).check()
    page.locator("#alignment-start").click()
    wait_until(lambda: f"Job {number} queued" in page.locator("#alignment-notice").inner_text(),
               what=f"job {number} to be queued")
    progress = page.locator("#alignment-progress")

    def shown() -> tuple[str, float]:
        if not progress.count() or f"job {number} " not in progress.inner_text():
            return "", 0.0
        return progress.get_attribute("data-status") or "", float(progress.get_attribute("data-progress") or 0)

    seen = set()

    def moving() -> bool:
        status, value = shown()
        if status == "running" and 0 < value < 1:
            seen.add(value)
        return len(seen) >= 2

    # The worker is another process; the page polls it every few seconds.
    wait_until(moving, timeout=180, what=f"job {number}'s progress bar to move", progress=shown)
    curve = page.locator("#alignment-curves")
    wait_until(lambda: curve.locator("canvas, svg .mark-line, svg path").count() > 0, timeout=120,
               what=f"job {number}'s curve", progress=shown)
    wait_until(lambda: shown()[0] == "succeeded", timeout=180, what=f"job {number} to succeed", progress=shown)
    assert f'job {number}: finished: {{"run": ' in page.locator("#alignment-log textarea").input_value()


@pytest.mark.seconds(70)
def test_the_loop_from_the_tab_train_evaluate_promote_and_chat_with_it(seeded, tiny_model, tmp_path):
    """Train a judge and a DPO policy from the tab, evaluate the policy's version there, promote it,
    and a new chat's reply is recorded as that version's."""
    data_dir = seeded
    tiny = f"base_model: {tiny_model}\nsave_steps: 1000\nper_device_train_batch_size: 4\nlearning_rate: 1.0e-3\n"
    # The server serves the tiny model, so that a version trained on it can serve. Its worker keeps
    # normal priority: at the default 10 it waits behind whatever else keeps the CPU busy (make test-stress).
    # The tab polls 4 times a second, so that a job of a few seconds on an idle machine is seen moving.
    with running_app(data_dir, tmp_path / "server.log", "--model", str(tiny_model), "--worker-nice", "0",
                     "--job-poll-seconds", "0.25") as url, \
            browser_page(url) as page:
        page.get_by_role("tab", name="Alignment").click()
        summary = page.locator("#alignment-data")
        wait_until(lambda: "Same-context pairs" in summary.inner_text(), what="the first persona's data")
        pick(page, "#alignment-persona", "pirate")
        wait_until(lambda: "Same-context pairs: 30" in summary.inner_text(), what="the pirate's data")
        assert "People: 30 👍 / 30 👎" in summary.inner_text() and "SIMULATED: 0 👍 / 0 👎" in summary.inner_text()

        # Long enough (a tiny model does 20 to 40 steps a second) for several of the page's polls to land mid-run.
        run_job(page, "reward_cpu.yaml", tiny + "max_steps: 120\nmin_pairs: 4\n", 1, part="judge")
        run_job(page, "dpo_cpu.yaml", tiny + "max_steps: 40\nmin_pairs: 4\n", 2)

        # Evaluate the DPO candidate: a job too; its report then shows in the tab.
        pick(page, "#alignment-version", "run 2")
        wait_until(lambda: "has not been evaluated yet" in page.locator("#alignment-report").inner_text(),
                   what="the version's (missing) report")
        page.locator("#alignment-evaluate").click()
        wait_until(lambda: "Job 3 queued" in page.locator("#alignment-notice").inner_text(), what="the evaluation")
        wait_until(lambda: db_rows(data_dir, "select status from jobs where id = 3") in ([("succeeded",)],
                                                                                         [("failed",)]),
                   timeout=300, what="the evaluation job to end")
        assert db_rows(data_dir, "select status, error from jobs where id = 3") == [("succeeded", None)]
        pick(page, "#alignment-version", "run 1")  # away and back: the report is read when picked
        pick(page, "#alignment-version", "run 2")
        report = page.locator("#alignment-report")
        wait_until(lambda: "Judges" in report.inner_text(), what="the evaluation report")
        assert "independent_judges" in report.inner_text() and "Promotion gate" in report.inner_text()
        wait_until(lambda: page.locator("#alignment-plots img").count() >= 1, what="the evaluation's plots")

        # Promote: through the gate, or forced with a reason (a tiny random model rarely passes it).
        version = db_rows(data_dir, "select id from model_versions where run_id = 2")[0][0]
        gate = db_rows(data_dir, "select metrics from model_versions where id = ?", version)[0][0]
        if '"passed": true' not in gate.split('"gate"')[-1][:40]:
            page.locator("#alignment-promote").click()
            wait_until(lambda: "gate" in page.locator("#alignment-notice").inner_text().lower(),
                       what="the gate's refusal")
            page.locator("#alignment-force-reason textarea").fill("browser test of the loop")
        page.locator("#alignment-promote").click()
        wait_until(lambda: f"Version {version} now serves pirate" in page.locator("#alignment-notice").inner_text(),
                   what="the promotion")
        history = page.locator("#alignment-history")
        wait_until(lambda: "promote" in history.inner_text(), what="the promotion log")

        # A new chat with the pirate is answered by the promoted version, and recorded as such.
        page.get_by_role("tab", name="Chat").click()
        pick_persona(page, "Captain Redbeard", "Arr, ahoy there")
        send(page, "Where is the treasure?")
        seeded_replies = 60  # fill(): two replies per conversation

        def new_reply():
            return db_rows(data_dir, "select model_version_id, content from messages where role = 'assistant' "
                                     "and coalesce(finish_reason, '') != 'greeting' and id > (select max(id) from messages where "
                                     "conversation_id = 30)")
        wait_until(new_reply, timeout=120, what="the new chat's reply to be stored")
    replies = new_reply()
    assert len(replies) == 1 and replies[0][0] == version, replies
    assert db_rows(data_dir, "select count(*) from messages where role = 'assistant' "
                             "and coalesce(finish_reason, '') != 'greeting'") == [(seeded_replies + 1,)]
    assert db_rows(data_dir, "select kind, status from jobs order by id") == \
        [("reward", "succeeded"), ("dpo", "succeeded"), ("evaluate", "succeeded")]


def test_a_signed_in_user_who_is_not_an_admin_is_refused_in_the_tab(data_dir, tmp_path):
    """The page as a person without the admin role sees it: the tab answers with the refusal and shows
    none of the feedback. (Every action's refusal on the server: test_user_isolation, through the API.)"""
    from playwright.sync_api import sync_playwright

    from browser_helpers import CHROMIUM, CHROMIUM_ARGS
    from cli_helpers import run_cli

    store = ChatStore.open(f"sqlite:///{data_dir / 'chat.db'}")
    fill(store, 30)
    store.close()
    for name, role in (("alice", "admin"), ("bob", "user")):
        done = run_cli("users", "add", name, "--role", role, "--password-stdin", "--data-dir", str(data_dir),
                       stdin=f"{name}-password\n")
        assert done.returncode == 0, done.stderr
    with running_app(data_dir, tmp_path / "server.log") as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            page.goto(url)
            page.locator("input[name=username], input[type=text]").first.fill("bob")
            page.locator("input[type=password]").first.fill("bob-password")
            page.locator("button[type=submit], button:has-text('Login')").first.click()
            page.wait_for_selector("#chatbot .message.bot")
            page.get_by_role("tab", name="Alignment").click()
            notice = page.locator("#alignment-notice")
            wait_until(lambda: "Only admins can run alignment jobs." in notice.inner_text(), what="the refusal")
            assert "Same-context pairs" not in page.locator("#alignment-data").inner_text()
            assert page.locator("#alignment-readiness").inner_text().count("yaml") == 0
        finally:
            browser.close()
