"""`persona-studio simulate`: rules, a small run on the bundled model, and the command."""

from pathlib import Path

import pytest
from cli_helpers import run_cli

from chatbot.chat import params_for
from chatbot.simulation import (
    ContainsRule,
    QuestionRule,
    ShortRule,
    load_prompts,
    parse_rule,
    simulate,
)

REPO = Path(__file__).resolve().parent.parent


def test_short_rule_counts_words():
    rule = parse_rule("short:3")
    assert rule == ShortRule(3) and rule.likes("one two") and not rule.likes("one two three")
    assert parse_rule("short") == ShortRule(40)
    assert rule.describe() == "likes replies under 3 words"


def test_question_rule_looks_at_the_end():
    rule = parse_rule("question")
    assert rule == QuestionRule()
    assert rule.likes("How are you?  ") and not rule.likes("Why? Because.")
    assert "question" in rule.describe()


def test_contains_rule_matches_whole_words_ignoring_case():
    rule = parse_rule("contains:Arr")
    assert rule == ContainsRule("Arr")
    assert rule.likes("arr, matey") and rule.likes("Well. ARR!") and not rule.likes("carry on")
    assert "'Arr'" in rule.describe()


def test_digits_mark_and_list_rules():
    digits, colon, listed = parse_rule("digits"), parse_rule("mark::"), parse_rule("list")
    assert digits.likes("Boil it for 7 minutes.") and not digits.likes("Boil it for seven minutes.")
    assert colon.likes("Here is how: boil it.") and not colon.likes("Boil it.")
    assert parse_rule("mark:!").likes("Ahoy!") and not parse_rule("mark:!").likes("Ahoy.")
    assert listed.likes("Try this:\n- sleep\n- water") and listed.likes("1. Rinse\n2) Dry")
    assert not listed.likes("- only one item") and not listed.likes("Costs 5 - 3 dollars - maybe")
    assert [r.describe() for r in (digits, colon, listed)] == [
        "likes replies that contain a number", "likes replies with ':' in them",
        "likes replies laid out as a list (two or more items)"]


@pytest.mark.parametrize("spec", ["long", "short:x", "short:0", "contains:", "question:yes", "digits:3",
                                  "list:2", "mark:"])
def test_bad_rules_are_refused(spec):
    with pytest.raises(ValueError):
        parse_rule(spec)


def test_prompt_files_skip_blanks_and_comments(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# comment\nHi\n\n  Bye  \n")
    assert load_prompts(path) == ["Hi", "Bye"]
    assert len(load_prompts(REPO / "alignment" / "prompts" / "general.txt")) >= 40
    path.write_text("# only a comment\n")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts(path)


def test_simulate_stores_simulated_votes_for_every_regeneration(fake_service, fake_engine, store):
    service = fake_service
    fake_engine.queue("Arr, gold.", "Arr, the gold be buried deep under the old palm tree.",
                      "Why did the parrot cross the sea? To get to the other tide, matey.", "Ha!")
    persona = service.personas.get("pirate")
    params = params_for(persona, max_new_tokens=8, seed=3)
    lines = []
    rule = parse_rule("short:5")
    report = simulate(service, "pirate", rule, ["Hi!", "Tell me a joke."], n=2, samples=2, params=params,
                      progress=lines.append)
    assert (report.prompts, report.replies, report.liked, report.disliked) == (2, 4, 2, 2)
    assert len(lines) == 2 and lines[0].startswith("SIMULATED [1/2]")
    rows = store.feedback_rows(persona_id="pirate")
    assert len(rows) == 4 and {r.message.id for r in rows} == set(report.message_ids)
    assert all(r.feedback.simulated and r.user_name == "simulator" for r in rows)
    assert all(r.feedback.reason == "simulated: likes replies under 5 words" for r in rows)
    assert all(r.feedback.rating == (1 if len(r.message.content.split()) < 5 else -1) for r in rows)
    # Regenerations: two replies per prompt, siblings in one conversation, each titled SIMULATED.
    assert len(report.conversation_ids) == 2
    for conv in report.conversation_ids:
        replies = [m for m in store.conversation_messages(conv) if m.prompt]
        assert len(replies) == 2 and replies[0].parent_id == replies[1].parent_id
        assert store.get_conversation(conv).title.startswith("SIMULATED (likes replies under 5 words)")
    assert report.satisfaction_rate == report.liked / 4
    # Each prompt's replies were sampled together, each with its own seed: seed + i * samples + row.
    for i, conv in enumerate(report.conversation_ids):
        replies = [m for m in store.conversation_messages(conv) if m.prompt]
        assert [m.generation_params["seed"] for m in replies] == [3 + 2 * i, 4 + 2 * i]


def test_rerate_votes_again_by_another_rule_without_generating(store):
    from chatbot.simulation import SIMULATOR_USER, rerate

    simulator, person = store.get_or_create_user(SIMULATOR_USER), store.get_or_create_user("ann")
    conv = store.create_conversation(simulator, "pirate", "v1")
    store.rename_conversation(conv, "SIMULATED (likes replies under 5 words): Hi!")
    asked = store.add_message(conv, "user", "Hi!")
    texts = ["Ahoy! 3 ships.", "Ahoy there, a long and peaceful reply today.", "No ships."]
    replies = [store.add_message(conv, "assistant", t, parent_id=asked, prompt=[{"role": "user", "content": "Hi!"}])
               for t in texts]
    for message in replies:
        store.set_feedback(message, simulator, 1 if len(store.get_message(message).content.split()) < 5 else -1,
                           reason="simulated: likes replies under 5 words", simulated=True)
    store.set_feedback(replies[2], person, 1)  # a person's vote is never touched
    report = rerate(store, "pirate", parse_rule("digits"))
    assert (report.replies, report.liked, report.prompts) == (3, 1, 1)
    votes = {(r.user_name, r.message.id): (r.feedback.rating, r.feedback.reason)
             for r in store.feedback_rows("pirate")}
    assert votes[(SIMULATOR_USER, replies[0])] == (1, "simulated: likes replies that contain a number")
    assert votes[(SIMULATOR_USER, replies[2])] == (-1, "simulated: likes replies that contain a number")
    assert votes[("ann", replies[2])] == (1, None)
    assert store.get_conversation(conv).title == "SIMULATED (likes replies that contain a number): Hi!"


@pytest.mark.model
def test_simulate_command_prints_that_it_is_simulated(data_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello there\n")
    done = run_cli("simulate", "--persona", "pirate",
                   "--rule", "question", "--prompts", str(prompts), "--data-dir", str(data_dir),
                   "--n", "1", "--samples", "2", "--max-new-tokens", "6", "--seed", "1")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("SIMULATED feedback (a rule, not people): persona pirate")
    assert lines[1].startswith("SIMULATED [1/1]")
    assert lines[-1].startswith("SIMULATED: 2 replies to 1 prompts")

    from chatbot.store import ChatStore

    store = ChatStore.open(f"sqlite:///{data_dir / 'chat.db'}")
    try:
        rows = store.feedback_rows()
    finally:
        store.close()
    assert len(rows) == 2 and all(r.feedback.simulated for r in rows)


def test_simulate_command_refuses_an_unknown_rule(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hi\n")
    done = run_cli("simulate", "--persona", "pirate",
                   "--rule", "loud", "--prompts", str(prompts), "--data-dir", str(tmp_path / "d"))
    assert done.returncode == 1 and "unknown rule 'loud'" in done.stderr
