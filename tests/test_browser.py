"""What a person does in the UI, in headless Chromium.

Uses Debian's chromium (`make test` installs it) through Playwright's
`executable_path`; Playwright never downloads a browser here. The first test
runs the whole thing, `python app.py` on the bundled model; the others are
about the page, not about what the model says, and run the app in this
process answering from FakeEngine (tests/in_process_app.py).
"""

from __future__ import annotations

import json

import pytest
from browser_helpers import (
    bot_texts,
    browser_page,
    db_rows,
    pick_option,
    pick_persona,
    plain,
    running_app,
    send,
    wait_until,
)
from fake_engine import FakeEngine
from in_process_app import running_in_process

pytestmark = pytest.mark.browser

STORY = " ".join(["Once upon a time a dragon and a knight met on a hill."] * 40)


@pytest.fixture
def page(tmp_path):
    """The page of an app in this process whose replies stream a long story, a word every 50 ms."""
    with running_in_process(tmp_path / "data", engine=FakeEngine(default=STORY, delay=0.05)) as app, \
            browser_page(app.url) as page:
        yield page


@pytest.mark.model
def test_pick_persona_chat_stream_and_thumbs_up_lands_in_sqlite(data_dir, tmp_path):
    with running_app(data_dir, tmp_path / "server.log") as url, browser_page(url) as page:
        chat_stream_and_vote(page, data_dir)


def chat_stream_and_vote(page, data_dir) -> None:
    pick_persona(page, "Captain Redbeard", "Arr, ahoy there")
    # The greeting picker starts the chat over with an alternate greeting, and back.
    pick_option(page, "#greeting-picker", "Avast", lambda: bot_texts(page)[0].startswith("Avast, User!"))
    pick_option(page, "#greeting-picker", "Arr, ahoy", lambda: bot_texts(page)[0].startswith("Arr, ahoy there"))
    send(page, "Tell me about your ship.")

    # Watch the reply grow while it streams, then wait for it to be stored.
    seen = set()

    def reply_stored():
        texts = bot_texts(page)
        if len(texts) == 2 and texts[1].strip():
            seen.add(texts[1])
        return db_rows(data_dir, "select id, content from messages where role='assistant' and parent_id is not null")

    [(reply_id, stored)] = wait_until(reply_stored, what="the reply to be stored", progress=lambda: bot_texts(page))
    assert len(seen) >= 2, f"the reply should appear piece by piece, saw {len(seen)} states"
    wait_until(lambda: plain(bot_texts(page)[1]) == plain(stored), what="the full reply on screen")
    assert db_rows(data_dir, "select persona_id from conversations") == [("pirate",)]

    page.get_by_role("button", name="Like", exact=True).last.click()
    rows = wait_until(lambda: db_rows(data_dir, "select message_id, rating from feedback"), what="the vote")
    assert rows == [(reply_id, 1)]

    page.get_by_role("button", name="Dislike", exact=True).last.click()
    wait_until(lambda: db_rows(data_dir, "select rating from feedback") == [(-1,)], what="the changed vote")


def test_stop_keeps_the_partial_reply_retry_makes_a_sibling_undo_gives_the_message_back(page, tmp_path):
    data_dir = tmp_path / "data"
    send(page, "Write a long story about a dragon and a knight.")
    # Gradio's "Loading response" bubble is a bot message too (its text: "Loading content"): wait past it,
    # or Stop lands before the first token and the stopped reply is empty.
    wait_until(lambda: len(bot_texts(page)) == 2 and bot_texts(page)[1].strip()
               and not page.locator("#chatbot [aria-label='Loading response']").count(), what="streaming to start")
    page.locator("#stop").click()
    [(content, reason, tokens)] = wait_until(lambda: db_rows(
        data_dir, "select content, finish_reason, completion_tokens from messages "
                  "where role='assistant' and parent_id is not null"), what="the stopped reply")
    assert reason == "stopped" and tokens < 200 and content.strip()
    wait_until(lambda: plain(bot_texts(page)[1]) == plain(content), what="the partial reply kept on screen")

    page.get_by_role("button", name="Retry", exact=True).click()
    # Stop the retry too once it streams: a whole long story took over a minute on a loaded machine.
    wait_until(lambda: len(bot_texts(page)) == 2 and bot_texts(page)[1].strip()
               and plain(bot_texts(page)[1]) != plain(content), what="the retry to stream")
    page.locator("#stop").click()

    def two_replies():
        rows = db_rows(data_dir, "select parent_id from messages where role='assistant' and parent_id is not null")
        return rows if len(rows) == 2 else None

    first, second = wait_until(two_replies, what="the retried reply")
    assert first == second, "the retry is a sibling of the stopped reply"

    wait_until(lambda: page.get_by_role("button", name="Undo", exact=True).count(), what="the Undo button")
    page.get_by_role("button", name="Undo", exact=True).click()
    wait_until(lambda: page.locator("#message textarea").input_value().startswith("Write a long story"),
               what="the undone message back in the textbox")
    assert len(bot_texts(page)) == 1, "only the greeting is left on screen"
    send(page, "Just say hi.")

    def branched():
        rows = db_rows(data_dir, "select parent_id from messages where role='user' order by id")
        return rows if len(rows) == 2 else None

    first_user, second_user = wait_until(branched, what="the new message")
    assert first_user == second_user, "the new message branches from the greeting"


def test_a_reply_from_a_persona_with_documents_shows_its_sources(page, tmp_path):
    """support_agent's policy document is indexed on the first message (the embedding model loads then);
    the passages found go into the prompt and are named under the reply, as stored with it."""
    data_dir = tmp_path / "data"
    pick_persona(page, "Support Agent", "Hi, thanks for contacting")
    send(page, "How long does delivery take?")
    rows = wait_until(lambda: db_rows(data_dir, "select provenance from messages where role='assistant' "
                                                 "and parent_id is not null"), timeout=180,
                      what="the reply to be stored", progress=lambda: bot_texts(page))
    sources = json.loads(rows[0][0])["documents"]
    assert any(s["heading"].endswith("Shipping") for s in sources)
    wait_until(lambda: "📄 Sources: knowledge/acme_policies.md" in bot_texts(page)[-1],
               what="the sources under the reply", progress=lambda: bot_texts(page))
    assert "Shipping" in bot_texts(page)[-1]
