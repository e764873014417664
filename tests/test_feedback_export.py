"""Feedback export (jsonl, TRL preference pairs, TRL KTO rows) and stats, from a real SQLite store."""

import json
from datetime import datetime, timedelta, timezone

import pytest
from cli_helpers import run_cli

from chatbot.feedback_export import daily_like_rates, export_rows, like_rates

PROMPT_A = [{"role": "system", "content": "Be a pirate."}, {"role": "user", "content": "Hi"}]
PROMPT_B = [{"role": "system", "content": "Be a pirate."}, {"role": "user", "content": "Bye"}]


@pytest.fixture
def filled(store):
    """Two users; three replies to prompt A (two liked, one disliked), one to B, a greeting vote."""
    ann, bob = store.get_or_create_user("ann"), store.get_or_create_user("bob")
    base = store.get_or_create_model_version("base")
    tuned = store.get_or_create_model_version("base", "adapters/v1")
    conv = store.create_conversation(ann, "pirate", "v1")
    greeting = store.add_message(conv, "assistant", "Ahoy!", finish_reason="greeting")
    user = store.add_message(conv, "user", "Hi", parent_id=greeting)
    r1 = store.add_message(conv, "assistant", "Arr, hello!", parent_id=user, prompt=PROMPT_A, model_version_id=base)
    r2 = store.add_message(conv, "assistant", "Hello.", parent_id=user, prompt=PROMPT_A, model_version_id=base)
    r3 = store.add_message(conv, "assistant", "Avast!", parent_id=user, prompt=PROMPT_A, model_version_id=tuned)
    r4 = store.add_message(conv, "assistant", "Farewell, matey", prompt=PROMPT_B, model_version_id=tuned)
    store.set_feedback(r1, ann, 1, reason="in character", comment="great")
    store.set_feedback(r2, ann, -1)
    store.set_feedback(r3, ann, 1)
    store.set_feedback(r3, bob, 1)
    store.set_feedback(r4, ann, 1)
    store.set_feedback(r4, bob, -1)  # a tie: no label
    store.set_feedback(greeting, ann, 1)  # greetings have no prompt: no training row
    other = store.create_conversation(ann, "assistant", "v9")
    r5 = store.add_message(other, "assistant", "Sure.", prompt=PROMPT_B, model_version_id=base)
    store.set_feedback(r5, bob, -1)
    return dict(r1=r1, r2=r2, r3=r3, r4=r4, r5=r5, base=base, tuned=tuned)


def test_jsonl_has_every_vote_with_its_context(store, filled):
    rows = list(export_rows(store.feedback_rows(), "jsonl"))
    assert len(rows) == 8
    first = next(r for r in rows if r["message_id"] == filled["r1"])
    assert first["prompt"] == PROMPT_A and first["completion"] == "Arr, hello!"
    assert (first["rating"], first["reason"], first["comment"], first["user"]) == (1, "in character", "great", "ann")
    assert first["persona_id"] == "pirate" and first["persona_version"] == "v1" and first["base_model"] == "base"
    json.dumps(rows)


def test_preference_pairs_come_from_the_same_context_only(store, filled):
    rows = list(export_rows(store.feedback_rows(), "preference"))
    pairs = {(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows}
    assert pairs == {("Arr, hello!", "Hello."), ("Avast!", "Hello.")}
    assert all(r["prompt"] == PROMPT_A for r in rows)
    assert rows[0]["chosen"][0]["role"] == "assistant"


def test_kto_rows_label_replies_by_their_summed_votes(store, filled):
    rows = list(export_rows(store.feedback_rows(), "kto"))
    labels = {r["completion"][0]["content"]: r["label"] for r in rows}
    assert labels == {"Arr, hello!": True, "Hello.": False, "Avast!": True, "Sure.": False}


def test_filters_persona_since_and_model_version(store, filled):
    assert {r.message.persona_id for r in store.feedback_rows(persona_id="assistant")} == {"assistant"}
    assert {r.message.id for r in store.feedback_rows(model_version_id=filled["tuned"])} == \
        {filled["r3"], filled["r4"]}
    assert store.feedback_rows(since=datetime.now(timezone.utc) + timedelta(days=1)) == []


def test_like_rates_per_persona_and_model(store, filled):
    rates = {(r.persona_id, r.model): (r.likes, r.dislikes) for r in like_rates(store.feedback_rows())}
    base, tuned = filled["base"], filled["tuned"]
    assert rates[("pirate", f"v{base}: base")] == (1, 1)
    assert rates[("pirate", f"v{tuned}: base + adapters/v1")] == (3, 1)
    assert rates[("assistant", f"v{base}: base")] == (0, 1)
    daily = daily_like_rates(store.feedback_rows())
    assert {r["group"] for r in daily} == {"pirate", "assistant"}
    assert sum(r["likes"] + r["dislikes"] for r in daily) == 8


def test_cli_export_and_stats(store, filled, tmp_path):
    url = str(store.engine.url)
    out = tmp_path / "pairs.jsonl"
    done = run_cli("feedback", "export", "--format", "preference", "--db-url", url, "--persona", "pirate",
                   "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert len(out.read_text().splitlines()) == 2 and "2 preference rows" in done.stderr
    done = run_cli("feedback", "stats", "--db-url", url)
    assert done.returncode == 0, done.stderr
    assert "pirate" in done.stdout and "75%" in done.stdout
    done = run_cli("feedback", "export", "--since", "yesterday", "--db-url", url)
    assert done.returncode == 2 and "expected a date" in done.stderr
