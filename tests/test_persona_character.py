"""Each shipped persona stays in character on the real bundled model.

For each persona: an observable trait of its replies (a regex), three
questions, three fixed seeds. The persona must show the trait in most
replies, and far more often than the plain assistant answering the same
questions with the same settings, so the trait comes from the persona and
not from the question. Seeds are fixed, so a run is repeatable on one machine.

The replies are the chat's own: the prompt a session builds for the message,
sampled by the engine with the persona's settings. A question's three seeds
are decoded together (``Engine.generate_batch``: reply k is the one seed k
gives alone), and all questions of a test are in flight at once.
"""

import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from chatbot.chat import params_for

pytestmark = pytest.mark.model

SEEDS = (1, 2, 3)
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


def replies(service, speaker: str, settings_of: str, questions) -> list[list[str]]:
    """For each question, the replies ``speaker`` gives with ``settings_of``'s settings, one per seed."""
    user = service.user_id("Sam")
    params = params_for(service.personas.get(settings_of), seed=SEEDS[0])
    assert SEEDS == tuple(range(SEEDS[0], SEEDS[0] + len(SEEDS)))  # generate_batch seeds reply k with seed + k

    def ask(question: str) -> list[str]:
        prompt = service.new_session(user, speaker, "Sam").prompt([{"role": "user", "content": question}])
        return [reply.text for reply in service.engine.generate_batch(prompt, params, len(SEEDS))]

    with ThreadPoolExecutor(max_workers=len(questions)) as pool:
        return list(pool.map(ask, questions))


def trait_count(texts: list[list[str]], pattern: str) -> tuple[int, list[str]]:
    flat = [text for per_question in texts for text in per_question]
    hits = [bool(re.search(pattern, text, re.IGNORECASE | re.DOTALL)) for text in flat]
    return sum(hits), [text[:120] for text, hit in zip(flat, hits) if not hit]


@pytest.mark.seconds(17)  # 18 replies of up to 120 tokens
@pytest.mark.parametrize("persona_id", sorted(TRAITS))
def test_persona_shows_its_trait_far_more_than_the_plain_assistant(service, persona_id):
    pattern, questions = TRAITS[persona_id]
    total = len(questions) * len(SEEDS)
    with ThreadPoolExecutor(max_workers=2) as pool:  # both speakers' replies decoded together
        own, plain = pool.map(lambda speaker: replies(service, speaker, persona_id, questions),
                              (persona_id, "assistant"))
    hits, misses = trait_count(own, pattern)
    baseline, _ = trait_count(plain, pattern)
    assert hits >= 5, f"{persona_id}: trait in {hits}/{total} replies; misses: {misses}"
    assert hits - baseline >= 4, f"{persona_id}: {hits}/{total} vs plain assistant {baseline}/{total}"


def test_assistant_answers_simple_facts(service):
    questions, answers = zip(("What is the capital of France?", r"Paris"),
                             ("What is the largest planet in the solar system?", r"Jupiter"),
                             ("How many legs does a spider have?", r"\b(8|eight)\b"))
    got = replies(service, "assistant", "assistant", questions)
    right = sum(bool(re.search(answer, text, re.IGNORECASE)) for answer, texts in zip(answers, got) for text in texts)
    assert right >= 6, f"right in {right}/9: {got}"
