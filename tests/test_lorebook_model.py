"""A card that keeps its character in its lorebook answers with its lore, on the real bundled model.

Such cards (the issue measured a 27-entry one with 7 entries always on) have
little or no description: before lorebooks reached the prompt, the model got
only the app's default prompt. The card is imported as a user would
(`import_card`); the same persona without its lorebook is the baseline. Three
questions, three fixed seeds; a reply "answers with its lore" when it names
something only the lorebook says.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from chatbot.chat import ChatService, params_for
from chatbot.persona_cards import dump_persona_yaml, import_card
from chatbot.personas import PersonaLibrary

pytestmark = pytest.mark.model

SEEDS = (1, 2, 3)
LORE = r"\b(bak\w*|bread|loa(f|ves)|oven|thornbury|rye)\b"
QUESTIONS = ["What do you do for a living?", "Where do you live?", "Tell me about your day."]
CARD = {"spec": "chara_card_v2", "spec_version": "2.0", "data": {
    "name": "Mira", "description": "", "personality": "", "scenario": "",
    "first_mes": "Oh, hello there!", "mes_example": "",
    "character_book": {"name": "Mira's world", "entries": [
        {"keys": [], "constant": True, "enabled": True, "insertion_order": 1, "extensions": {},
         "content": "{{char}} is the baker of Thornbury, a small village by the river. "
                    "{{char}} talks about her bakery and her bread all the time."},
        {"keys": [], "constant": True, "enabled": True, "insertion_order": 2, "extensions": {},
         "content": "Every morning {{char}} bakes rye loaves in her stone oven."},
        {"keys": ["river"], "enabled": True, "insertion_order": 3, "extensions": {},
         "content": "The river Thorn floods every spring."}]}}}


def lore_replies(engine, folder, store, persona_id: str) -> list[str]:
    service = ChatService(engine, PersonaLibrary(folder), store)
    user = service.user_id("Sam")
    params = params_for(service.personas.get(persona_id), seed=SEEDS[0], max_new_tokens=60)

    def ask(question: str) -> list[str]:
        prompt = service.new_session(user, persona_id, "Sam").prompt([{"role": "user", "content": question}],
                                                                     engine.count_text_tokens)
        return [reply.text for reply in engine.generate_batch(prompt, params, len(SEEDS))]

    with ThreadPoolExecutor(max_workers=len(QUESTIONS)) as pool:
        return [text for texts in pool.map(ask, QUESTIONS) for text in texts]


def test_a_card_whose_character_is_its_lorebook_answers_with_its_lore(engine, store, tmp_path):
    source = tmp_path / "mira.json"
    source.write_text(json.dumps(CARD))
    folder = tmp_path / "personas"
    folder.mkdir()
    result = import_card(source)
    assert result.persona.lorebook is not None and len(result.persona.lorebook.entries) == 3
    (folder / "mira.yaml").write_text(result.yaml_text)
    # The baseline: the same persona as the app had it before, its lorebook never reaching the model.
    bare = result.persona.model_copy(update={"lorebook": None})
    (folder / "mira_before.yaml").write_text(dump_persona_yaml(bare.model_dump(exclude_defaults=True)))
    with_lore = lore_replies(engine, folder, store, "mira")
    without = lore_replies(engine, folder, store, "mira_before")
    hits = sum(bool(re.search(LORE, text, re.IGNORECASE)) for text in with_lore)
    baseline = sum(bool(re.search(LORE, text, re.IGNORECASE)) for text in without)
    print(f"lore in {hits}/9 replies with the lorebook, {baseline}/9 without")
    assert hits >= 5 and hits >= baseline + 3, (hits, baseline, with_lore)
