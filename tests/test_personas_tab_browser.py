"""The Personas tab in headless Chromium: edit, try, save, and a new chat uses the edit.

The app runs on a copy of the shipped personas folder, so the repository's
files are never touched. Nothing here is about what the model says: the app
runs in this process (tests/in_process_app.py), answering from FakeEngine.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import yaml
from browser_helpers import (
    REPO,
    bot_texts,
    browser_page,
    db_rows,
    pick_option,
    pick_persona,
    send,
    wait_until,
)
from in_process_app import running_in_process

from chatbot.personas import content_hash

pytestmark = pytest.mark.browser

NEW_PROMPT = ("You are Captain Bluebeard, a retired pirate who now grows tomatoes. "
              "Mention tomatoes in every answer.")


def comment_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "#" in line]


@pytest.fixture
def personas_dir(tmp_path):
    folder = tmp_path / "personas"
    shutil.copytree(REPO / "personas", folder)
    # More hand-written comments than the shipped file has: a top line, an
    # end-of-line note and a comment at the very end.
    path = folder / "pirate.yaml"
    text = re.sub(r"^name: (.*)$", r"name: \1   # shown in the picker", path.read_text(), count=1, flags=re.MULTILINE)
    text = "# Edited by the browser test: every comment here must survive.\n" + text
    text = text.rstrip("\n") + "\n# The end of the file.\n"
    assert "# shown in the picker" in text
    path.write_text(text)
    from test_lorebook import PERSONA as WITH_LOREBOOK

    (folder / "seraphina.yaml").write_text(WITH_LOREBOOK)
    return folder


@pytest.fixture
def data_dir(tmp_path):
    return tmp_path / "data"  # no model in it: FakeEngine answers


@pytest.fixture
def page(data_dir, personas_dir):
    with running_in_process(data_dir, personas_dir) as app, \
            browser_page(app.url, viewport={"width": 1400, "height": 1000}) as page:
        yield page


def toasts(page) -> str:
    return "\n".join(page.locator(".toast-body").all_inner_texts())


def open_personas_tab(page, option: str, name: str) -> None:
    page.get_by_role("tab", name="Personas").click()
    pick_option(page, "#persona-select", option, lambda: page.locator("#persona-name textarea").input_value() == name)


def test_edit_try_save_and_a_new_chat_uses_the_new_system_prompt(page, data_dir, personas_dir, tmp_path):
    path = personas_dir / "pirate.yaml"
    original = path.read_text()
    open_personas_tab(page, "Captain Redbeard (pirate)", "Captain Redbeard")
    page.screenshot(path=tmp_path / "personas-tab.png", full_page=True)

    # Edit the form: a new system prompt and a shorter reply limit.
    page.locator("#persona-system-prompt textarea").fill(NEW_PROMPT)
    page.get_by_text("Generation defaults").click()
    tokens = page.locator("#persona-max-new-tokens input[type=number]")
    slider = page.locator("#persona-max-new-tokens input[type=range]")
    # The accordion mounts its fields when it first opens, and they take the form's values after that:
    # text typed in between was overwritten by the persona's 160 (a CI failure). Type once they show it.
    wait_until(lambda: tokens.input_value() == slider.input_value() == "160",
               what="the opened fields to show the persona's max_new_tokens")

    def typed() -> bool:
        # Even after that, a re-render could still put 160 back under a loaded CI run (the slider never
        # took 24): type again, as a person would, whenever the box does not show what was typed.
        if tokens.input_value() != "24":
            tokens.fill("24")
            tokens.press("Enter")
        return slider.input_value() == "24"

    wait_until(typed, what="the slider to take the typed 24")

    # Try the draft before saving: a reply streams, nothing is written or stored.
    page.locator("#persona-try-message textarea").fill("What do you grow?")
    page.locator("#persona-try-send").click()
    try_bot = page.locator("#persona-try-chat .message.bot")
    wait_until(lambda: try_bot.count() == 2 and try_bot.nth(1).inner_text().strip()
               and "Loading" not in try_bot.nth(1).inner_text(), timeout=120, what="the draft's reply")
    page.locator("#persona-try-stop").click()
    wait_until(lambda: "processing" not in page.locator("#persona-try-message").inner_text(),
               what="the draft's reply to stop")
    assert path.read_text() == original, "trying a draft writes nothing"
    assert db_rows(data_dir, "select count(*) from messages") == [(0,)], "trying a draft stores nothing"

    page.locator("#persona-save").click()
    wait_until(lambda: path.read_text() != original, what="the file to be saved")
    saved = path.read_text()
    data = yaml.safe_load(saved)
    assert data["system_prompt"] == NEW_PROMPT and data["generation"]["max_new_tokens"] == 24
    assert comment_lines(saved) == comment_lines(original), "hand-written comments survive the save"
    assert list(data) == list(yaml.safe_load(original)), "key order survives the save"
    # Only the edited lines differ.
    changed = set(original.splitlines()) ^ set(saved.splitlines())
    assert all(line.startswith(("  ", "system_prompt")) for line in changed), changed
    wait_until(lambda: "Saved pirate.yaml" in toasts(page), what="the saved message")
    assert not [p for p in personas_dir.iterdir() if p.name.endswith(".tmp")]

    # Raw YAML: an invalid document is refused with the validator's message; the file stays.
    page.get_by_role("tab", name="Raw YAML").click()
    editor = page.locator("#persona-raw .cm-content")
    editor.click()
    page.keyboard.press("Control+A")
    page.keyboard.insert_text(saved.replace("max_new_tokens: 24", "max_new_tokens: 99999"))
    page.locator("#persona-save-raw").click()
    wait_until(lambda: "generation.max_new_tokens" in toasts(page), what="the validation error")
    assert "pirate.yaml" in toasts(page)
    assert path.read_text() == saved
    assert "max_new_tokens: 99999" in editor.inner_text(), "the refused text stays in the editor to fix"
    page.screenshot(path=tmp_path / "personas-raw-error.png", full_page=True)

    # A new chat with the persona uses the saved file.
    page.get_by_role("tab", name="Chat").click()
    pick_persona(page, "Captain Redbeard", data["greeting"][:20])
    send(page, "Hello!")
    [(prompt, params)] = wait_until(lambda: db_rows(
        data_dir, "select prompt, generation_params from messages where role='assistant' and parent_id is not null"),
        timeout=120, what="the reply to be stored", progress=lambda: bot_texts(page))
    system = json.loads(prompt)[0]
    assert system["role"] == "system" and system["content"].startswith(NEW_PROMPT)
    assert json.loads(params)["max_new_tokens"] == 24
    assert db_rows(data_dir, "select persona_id, persona_hash from conversations") == [("pirate", content_hash(saved))]
    wait_until(lambda: len(bot_texts(page)) == 2, what="the reply on screen")


def test_new_duplicate_and_delete(page, personas_dir):
    page.once("dialog", lambda dialog: dialog.accept())  # "Move ... to the archive?"
    open_personas_tab(page, "Captain Redbeard (pirate)", "Captain Redbeard")

    page.locator("#persona-new-id textarea").fill("night_owl")
    page.locator("#persona-new").click()
    wait_until(lambda: page.locator("#persona-name textarea").input_value() == "Night Owl", what="the new persona")
    assert (personas_dir / "night_owl.yaml").is_file()

    page.locator("#persona-new-id textarea").fill("night_owl")
    page.locator("#persona-new").click()
    wait_until(lambda: "already exists" in toasts(page), what="the refusal of an existing id")

    page.locator("#persona-new-id textarea").fill("owl2")
    page.locator("#persona-duplicate").click()
    wait_until(lambda: page.locator("#persona-name textarea").input_value() == "Night Owl (copy)",
               what="the copy")
    assert (personas_dir / "owl2.yaml").is_file()
    wait_until(lambda: page.locator("#persona-gallery button.thumbnail-item").count() ==
               len(list(personas_dir.glob("*.yaml"))), what="the gallery to list the new personas")

    page.locator("#persona-delete").click()
    wait_until(lambda: not (personas_dir / "owl2.yaml").exists(), what="the copy to be archived")
    [archived] = (personas_dir / ".archive").glob("owl2-*.yaml")
    assert "Night Owl (copy)" in archived.read_text()

    # The Chat tab offers the new persona on its next new chat.
    page.get_by_role("tab", name="Chat").click()
    page.locator("#new-chat").click()
    page.locator("#persona-picker input").click()
    wait_until(lambda: page.locator("[role=option]", has_text="Night Owl").count() == 1,
               what="the new persona in the chat's picker")


def test_the_lorebook_tester_says_which_entries_fire_and_on_which_key(page):
    open_personas_tab(page, "Seraphina (seraphina)", "Seraphina")
    page.get_by_text("Lorebook", exact=True).click()
    wait_until(lambda: page.locator("#persona-lorebook").get_by_text("The glade of {{char}} heals wounds.").count() > 0,
               what="the entries in the lorebook table")
    page.locator("#persona-lore-message textarea").fill("Are there WOLVES in the glade?")
    page.locator("#persona-lore-test").click()
    result = page.locator("#persona-lore-result")
    wait_until(lambda: "Glade" in result.inner_text(), what="the tester's answer")
    text = result.inner_text()
    assert "Wolves" in text and "wolves" in text and "at_depth 0 (system)" in text
    assert "Rule" in text and "(constant)" in text and "Forest" not in text


def test_markup_in_a_refused_value_shows_as_text_in_the_toast(page):
    """Gradio renders a toast's message as HTML, and a refusal quotes what was given (here an id typed
    into the form; as well a value from a persona file): chatbot/ui/notices.py escapes it."""
    page.get_by_role("tab", name="Personas").click()
    page.locator("#persona-new-id textarea").fill('<img id="planted" src="x"><b id="bold">x</b>')
    page.locator("#persona-new").click()
    wait_until(lambda: "is not a safe file name" in toasts(page), what="the refusal")
    assert '<img id="planted" src="x"><b id="bold">x</b>' in toasts(page)
    assert page.locator("#planted, #bold").count() == 0
