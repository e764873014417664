"""Conversation history, reply versions, feedback details and the Feedback tab, in headless Chromium."""

from __future__ import annotations

import pytest
from browser_helpers import bot_texts, browser_page, db_rows, plain, running_app, send, wait_until

pytestmark = [pytest.mark.browser, pytest.mark.model]


@pytest.fixture
def page(data_dir, tmp_path):
    # Wide enough that the open sidebar sits beside the chat instead of over it.
    with running_app(data_dir, tmp_path / "server.log") as url, \
            browser_page(url, viewport={"width": 1600, "height": 1000}) as page:
        page.on("dialog", lambda dialog: dialog.accept())  # the Delete confirmation
        yield page


def replies(data_dir, conversation=None):
    sql = "select id, content from messages where role='assistant' and parent_id is not null"
    if conversation is not None:
        return db_rows(data_dir, sql + " and conversation_id = ? order by id", conversation)
    return db_rows(data_dir, sql + " order by id")


def history_labels(page) -> list[str]:
    return page.locator("#history-list label").all_inner_texts()


@pytest.mark.seconds(45)
def test_history_versions_feedback_details_and_feedback_tab(page, data_dir):
    send(page, "First chat about cats.")
    wait_until(lambda: len(replies(data_dir)) == 1, what="the first reply",
               progress=lambda: bot_texts(page))
    page.locator("#new-chat").click()
    wait_until(lambda: len(bot_texts(page)) == 1, what="a fresh chat")
    send(page, "Second chat about dogs.")
    wait_until(lambda: len(replies(data_dir)) == 2, what="the second reply",
               progress=lambda: bot_texts(page))
    page.locator("#history-sidebar .toggle-button").click()  # the sidebar starts closed
    wait_until(lambda: len(history_labels(page)) == 2, what="both chats in the sidebar")
    assert history_labels(page)[0].startswith("Second chat about dogs."), "newest first"

    # Search looks at titles and messages, in any case.
    page.locator("#history-search input, #history-search textarea").first.fill("first chat")
    wait_until(lambda: len(history_labels(page)) == 1, what="the search to filter")
    page.locator("#history-list label").first.click()
    wait_until(lambda: "First chat about cats." in page.locator("#chatbot").inner_text(), what="the resumed chat")
    [(cats,)] = db_rows(data_dir, "select id from conversations where title like 'First%'")

    # Retry makes a second version; the arrows page between them.
    page.get_by_role("button", name="Retry", exact=True).click()
    wait_until(lambda: len(replies(data_dir, cats)) == 2, what="the retried reply",
               progress=lambda: bot_texts(page))
    wait_until(lambda: "version 2/2" in page.locator("#versions").inner_text(), what="the versions counter")
    (first_id, first_text), _ = replies(data_dir, cats)
    page.locator("#prev-version").click()
    wait_until(lambda: "version 1/2" in page.locator("#versions").inner_text(), what="version 1/2")
    wait_until(lambda: plain(bot_texts(page)[-1]) == plain(first_text), what="the first version on screen")

    # Thumbs up on the shown version, then a reason and a comment.
    page.get_by_role("button", name="Like", exact=True).last.click()
    wait_until(lambda: db_rows(data_dir, "select message_id, rating from feedback") == [(first_id, 1)],
               what="the vote on the shown version")
    page.locator("#feedback-reasons label", has_text="funny").click()
    page.locator("#feedback-comment textarea").fill("nice one")
    page.locator("#feedback-save").click()
    wait_until(lambda: db_rows(data_dir, "select reason, comment from feedback") == [("funny", "nice one")],
               what="reason and comment stored")
    assert len(db_rows(data_dir, "select id from feedback_events")) == 2, "each change is kept"

    # Rename from the sidebar.
    page.locator("#history-title textarea, #history-title input").first.fill("Cats!")
    page.locator("#history-rename").click()
    wait_until(lambda: db_rows(data_dir, "select title from conversations where id = ?", cats) == [("Cats!",)],
               what="the new title")

    # The Feedback tab shows the vote, the counts and the comment with a link into the conversation.
    page.get_by_role("tab", name="Feedback").click()
    wait_until(lambda: "1 current votes" in page.locator("#feedback-notice").inner_text(), what="the summary")
    assert "assistant" in page.locator("#feedback-counts").inner_text()
    comments = page.locator("#feedback-comments")
    assert "nice one" in comments.inner_text()
    assert comments.locator("a").first.get_attribute("href").endswith(f"?conversation={cats}")

    # Delete the other conversation; the cats one stays.
    page.get_by_role("tab", name="Chat").click()
    page.locator("#history-search input, #history-search textarea").first.fill("")
    wait_until(lambda: len(history_labels(page)) == 2, what="the full list again")
    page.locator("#history-list label", has_text="Second chat about dogs.").click()
    page.locator("#history-delete").click()
    wait_until(lambda: db_rows(data_dir, "select id from conversations") == [(cats,)], what="the deletion")
    wait_until(lambda: len(history_labels(page)) == 1, what="the list without it")
