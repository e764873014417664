"""Each shipped persona stays in character on the real bundled model.

For each persona: an observable trait of its replies (a regex), three
questions, three fixed seeds. The persona must show the trait in most
replies, and far more often than the plain assistant answering the same
questions with the same settings, so the trait comes from the persona and
not from the question. Seeds are fixed, so a run is repeatable on one machine.
"""

import re

import pytest

from chatbot.chat import params_for

pytestmark = pytest.mark.model

SEEDS = (1, 2, 3)
# The trait shows in a reply's first sentences; a shorter reply keeps the 90
# generations of this file to a fraction of the suite's time.
MAX_NEW_TOKENS = 48
TRAITS = {
    "pirate": (r"\b(arr+|matey|ye|ahoy|ship|sea|treasure|avast)\b",
               ["What did you do today?", "Can you recommend a book?", "What's the weather like?"]),
    "socratic_tutor": (r"\?",  # answers with a question
                       ["Why is the sky blue?", "What is 15 times 4?", "How do plants make food?"]),
    "code_reviewer": (r"(?m)^\s*[-*] ",  # bullet points
                      ["def avg(xs):\n    return sum(xs) / len(xs)",
                       "for i in range(len(items)):\n    print(items[i])", "x = open('f.txt').read()"]),
    "korean_tutor": (r"[\uac00-\ud7a3]",  # Hangul
                     ["How do I say good morning?", "How do I say I love you?", "What is the word for cat?"]),
    "support_agent": (r"^(?!.*\bas an ai\b).*\b(refund|return|order|purchase|store credit|shipping|deliver)",
                      ["I bought a lamp 45 days ago. Can I get a full refund?",
                       "Can I return a shirt I got 10 days ago?", "What is your return policy?"]),
}


def trait_count(service, speaker: str, settings_of: str, pattern: str, questions) -> tuple[int, list[str]]:
    user = service.user_id("Sam")
    hits, misses = 0, []
    for question in questions:
        for seed in SEEDS:
            session = service.new_session(user, speaker, "Sam")
            params = params_for(service.personas.get(settings_of), seed=seed, max_new_tokens=MAX_NEW_TOKENS)
            *_, reply = service.send(session, question, params)
            if re.search(pattern, reply.text, re.IGNORECASE | re.DOTALL):
                hits += 1
            else:
                misses.append(reply.text[:120])
    return hits, misses


@pytest.mark.parametrize("persona_id", sorted(TRAITS))
def test_persona_shows_its_trait_far_more_than_the_plain_assistant(service, persona_id):
    pattern, questions = TRAITS[persona_id]
    total = len(questions) * len(SEEDS)
    hits, misses = trait_count(service, persona_id, persona_id, pattern, questions)
    baseline, _ = trait_count(service, "assistant", persona_id, pattern, questions)
    assert hits >= 5, f"{persona_id}: trait in {hits}/{total} replies; misses: {misses}"
    assert hits - baseline >= 4, f"{persona_id}: {hits}/{total} vs plain assistant {baseline}/{total}"


def test_assistant_answers_simple_facts(service):
    pattern_answers = [("What is the capital of France?", r"Paris"),
                       ("What is the largest planet in the solar system?", r"Jupiter"),
                       ("How many legs does a spider have?", r"\b(8|eight)\b")]
    user = service.user_id("Sam")
    right = 0
    for question, answer in pattern_answers:
        for seed in SEEDS:
            session = service.new_session(user, "assistant", "Sam")
            *_, reply = service.send(session, question, params_for(session.persona, seed=seed, max_new_tokens=MAX_NEW_TOKENS))
            right += bool(re.search(answer, reply.text, re.IGNORECASE))
    assert right >= 6, f"right in {right}/9"
