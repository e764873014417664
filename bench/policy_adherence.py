"""Does support_agent answer from its policy document? Held-out customer questions, before and after.

    .venv/bin/python bench/policy_adherence.py [--seeds 3]

Nine questions whose answers are only in personas/knowledge/acme_policies.md (delivery
times, gift cards, electronics, warranty, ...), each with the fact a right answer states
(a regex). The same persona is asked with and without its `knowledge:` documents, on the
bundled model, the replies sampled with the persona's settings and fixed seeds, side by
side in one process. Printed: per question the passages found (file, lines) and how many
replies state the fact; then the totals and whether the right passage was found.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from chatbot.chat import ChatService, params_for  # noqa: E402
from chatbot.knowledge.retrieval import PersonaKnowledge  # noqa: E402
from chatbot.personas import PersonaLibrary  # noqa: E402
from chatbot.settings import Settings  # noqa: E402
from chatbot.startup import open_engine  # noqa: E402
from chatbot.store import ChatStore  # noqa: E402

# (question, what a right answer states, the policy section that holds it)
QUESTIONS = [
    ("I bought headphones 20 days ago. Can I get a refund?", r"14[- ]days?", "Refunds"),
    ("Can I get my money back for a gift card?",
     r"gift cards? (can ?not|cannot|can't|are not|aren't)|non-?refundable", "Refunds"),
    ("How long does delivery take?", r"3 (to|-) ?5", "Shipping"),
    ("My mug arrived broken. What now?", r"photo|replacement", "Damaged"),
    ("Do you ship to Canada?", r"15 dollars|\$15|7 (to|-) ?14", "Shipping"),
    ("I ordered the wrong size ten minutes ago. Can I change my order?", r"(1|one) hour", "Orders"),
    ("How long is the warranty on a laptop?", r"(1|one)[- ]year", "Warranty"),
    ("I bought a lamp 45 days ago. Can I return it?", r"store credit", "Refunds"),
    ("What does shipping cost on a 20 dollar order?", r"5 dollars|\$5\b", "Shipping"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="policy-"))
    folder = work / "personas"
    shutil.copytree(REPO / "personas", folder)
    text = (folder / "support_agent.yaml").read_text()
    without = re.sub(r"(?m)^knowledge:.*\n(  .*\n)*", "", text)
    (folder / "support_agent_alone.yaml").write_text(without)
    engine = open_engine(Settings(data_dir=work / "data"))
    store = ChatStore.open(f"sqlite:///{work / 'chat.db'}")
    library = PersonaLibrary(folder)
    service = ChatService(engine, library, store, PersonaKnowledge(store.engine, folder))
    totals, found = {}, 0
    for persona in ("support_agent_alone", "support_agent"):
        totals[persona] = 0
        for question, fact, section in QUESTIONS:
            session = service.new_session(service.user_id("bench"), persona, "Sam")
            prompt = service._prompt(session, [{"role": "user", "content": question}])
            replies = engine.generate_batch(prompt, params_for(library.get(persona), seed=1), args.seeds)
            right = sum(bool(re.search(fact, r.text, re.IGNORECASE)) for r in replies)
            totals[persona] += right
            sources = (prompt.provenance or {}).get("documents", [])
            if persona == "support_agent":
                found += any(section in (s["heading"] or "") for s in sources)
            print(f"{persona:20} {right}/{args.seeds}  {question}  passages: "
                  f"{[s['location'] + ' ' + (s['heading'] or '').split(' > ')[-1] for s in sources]}", flush=True)
    n = len(QUESTIONS) * args.seeds
    print(f"\nstates the policy: without documents {totals['support_agent_alone']}/{n}, "
          f"with them {totals['support_agent']}/{n}; the right section among the passages: "
          f"{found}/{len(QUESTIONS)} questions")
    engine.close()


if __name__ == "__main__":
    main()
