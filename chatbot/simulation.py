"""SIMULATED feedback from a declared rule, for demos, tests and benchmarks: the rules and the run.

The command is `persona-studio simulate` (chatbot/cli/simulate.py); the rules
are also judges for `align evaluate` (alignment/evaluate.py), which is why
they live here, outside the command line.

    persona-studio simulate --persona ID --rule RULE --prompts FILE [--n N] [--samples K]
                            [--max-new-tokens M] [--seed S] [--data-dir DIR] [--db-url URL] [--model M]
    persona-studio simulate --persona ID --rule RULE --rerate [--data-dir DIR] [--db-url URL]

``simulate`` drives the real chat path (new chat, then several replies to the message,
siblings as Retry makes them, sampled together in one batch) as the user
"simulator" and rates every reply by a rule, not by people:

    short:40       likes replies under 40 words
    question       likes replies that end with a question mark
    contains:WORD  likes replies that contain WORD (case-insensitive)
    digits         likes replies that contain a number
    mark:TEXT      likes replies with TEXT in them, anywhere (mark::  a colon, mark:!)
    list           likes replies laid out as a list (two or more items)

``--rerate`` generates nothing: it votes again, by the new rule, on every
reply the simulator already rated for the persona (the same replies, another
rater), so several rules can be compared on one set of generated replies.

Votes go through ``ChatService.vote`` like a person's, with ``simulated`` set and a reason
"simulated: <rule>"; conversations are titled "SIMULATED ...". Several
replies per prompt (``--samples``, default 4) give the liked/disliked siblings
that reward-model pairs are made of. Prompt files hold one prompt per line;
blank lines and lines starting with # are skipped (alignment/prompts/general.txt).

During a canary (`persona-studio models canary`), each simulated chat is a new
conversation that gets an A/B arm like anyone's: the store assigns it when the
conversation is created. So simulate can play the users of an A/B. Its votes
count in the canary's figures only with `--include-simulated`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

SIMULATOR_USER = "simulator"
BANNER = "SIMULATED feedback (a rule, not people)"  # what every simulation's output starts with


# -- rules ---------------------------------------------------------------------


@dataclass(frozen=True)
class ShortRule:
    words: int = 40

    def likes(self, text: str) -> bool:
        return len(text.split()) < self.words

    def describe(self) -> str:
        return f"likes replies under {self.words} words"


@dataclass(frozen=True)
class QuestionRule:
    def likes(self, text: str) -> bool:
        return text.rstrip().endswith("?")

    def describe(self) -> str:
        return "likes replies that end with a question"


@dataclass(frozen=True)
class ContainsRule:
    word: str

    def likes(self, text: str) -> bool:
        return re.search(rf"(?<!\w){re.escape(self.word)}(?!\w)", text, re.IGNORECASE) is not None

    def describe(self) -> str:
        return f"likes replies that contain {self.word!r}"


@dataclass(frozen=True)
class DigitsRule:
    def likes(self, text: str) -> bool:
        return any(c.isdigit() for c in text)

    def describe(self) -> str:
        return "likes replies that contain a number"


@dataclass(frozen=True)
class MarkRule:
    mark: str

    def likes(self, text: str) -> bool:
        return self.mark in text

    def describe(self) -> str:
        return f"likes replies with {self.mark!r} in them"


@dataclass(frozen=True)
class ListRule:
    # "- a", "* a", "• a", "1. a", "2) a" at the start of a line.
    ITEM = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+\S", re.MULTILINE)

    def likes(self, text: str) -> bool:
        return len(self.ITEM.findall(text)) >= 2

    def describe(self) -> str:
        return "likes replies laid out as a list (two or more items)"


def _no_argument(rule_class, name: str):
    def make(arg: str | None):
        if arg is not None:
            raise ValueError(f"rule {name} takes no argument")
        return rule_class()
    return make


def _mark(arg: str | None) -> MarkRule:
    if not arg or not arg.strip():
        raise ValueError("rule mark:TEXT needs the text to look for, e.g. mark::  or mark:!")
    return MarkRule(arg.strip())


def _short(arg: str | None) -> ShortRule:
    if arg is None:
        return ShortRule()
    if not arg.isdigit() or int(arg) < 1:
        raise ValueError(f"rule short:N needs a positive number of words, not {arg!r}")
    return ShortRule(int(arg))


def _contains(arg: str | None) -> ContainsRule:
    if not arg or not arg.strip():
        raise ValueError("rule contains:WORD needs a word")
    return ContainsRule(arg.strip())


RULES: dict[str, Callable[[str | None], object]] = {
    "short": _short, "question": _no_argument(QuestionRule, "question"), "contains": _contains, "digits": _no_argument(DigitsRule, "digits"),
    "mark": _mark, "list": _no_argument(ListRule, "list")}
RULE_SPECS = "short[:N], question, contains:WORD, digits, mark:TEXT, list"


def parse_rule(spec: str):
    """A rule from its spec: "short", "short:40", "question", "contains:WORD"."""
    name, _, arg = spec.partition(":")
    if name not in RULES:
        raise ValueError(f"unknown rule {spec!r}: use {RULE_SPECS}")
    return RULES[name](arg if _ else None)


def rating(rule, text: str) -> int:
    return 1 if rule.likes(text) else -1


def load_prompts(path: Path) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ValueError(f"cannot read prompt file {path}: {exc.strerror or exc}") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"prompt file {path} has no prompts (one per line)")
    return prompts


# -- the run -------------------------------------------------------------------


@dataclass
class SimulationReport:
    persona_id: str
    rule: str  # the rule's description
    prompts: int = 0
    replies: int = 0
    liked: int = 0
    failed: list[str] = field(default_factory=list)  # "prompt: why", for prompts that got no reply
    conversation_ids: list[int] = field(default_factory=list)
    message_ids: list[int] = field(default_factory=list)

    @property
    def disliked(self) -> int:
        return self.replies - self.liked

    @property
    def satisfaction_rate(self) -> float | None:
        """The share of replies the rule likes."""
        return self.liked / self.replies if self.replies else None

    def summary(self) -> str:
        rate = "n/a" if self.satisfaction_rate is None else f"{self.satisfaction_rate:.0%}"
        text = (f"SIMULATED: {self.replies} replies to {self.prompts} prompts rated by a rule "
                f"({self.rule}): {self.liked} liked, {self.disliked} disliked, satisfaction rate {rate}")
        return text + (f"; {len(self.failed)} prompts failed" if self.failed else "")


def simulate(service, persona_id: str, rule, prompts: Sequence[str], n: int, samples: int = 4,
             params=None, progress: Callable[[str], None] | None = None) -> SimulationReport:
    """Send `n` prompts (cycling through `prompts`), each in a new chat, with `samples` replies each,
    and vote on every reply by `rule` as the user "simulator".

    The replies to a prompt are siblings, as Retry makes them, sampled together in one batch
    (``ChatService.send_samples``): several times faster than one at a time. `params` default to the
    persona's own settings; with a seed, prompt i's reply k uses seed + i * samples + k.
    """
    from .chat import ChatError, params_for
    from .prompting import PromptTooLong

    if n < 1 or samples < 1:
        raise ValueError("--n and --samples must be at least 1")
    if not prompts:
        raise ValueError("no prompts to send")
    user_id = service.user_id(SIMULATOR_USER)
    reason = f"simulated: {rule.describe()}"
    report = SimulationReport(persona_id, rule.describe())
    for i in range(n):
        text = prompts[i % len(prompts)]
        session = service.new_session(user_id, persona_id, user_name=SIMULATOR_USER)
        base = params or params_for(session.persona)
        sample = base if base.seed is None else replace(base, seed=base.seed + i * samples)
        votes = []
        try:
            replies = service.send_samples(session, text, sample, samples)
            service.store.rename_conversation(session.conversation_id, f"SIMULATED ({rule.describe()}): {text}")
            report.conversation_ids.append(session.conversation_id)
            for reply in replies:
                session.turns[-1] = reply  # show this sibling, then vote on it as a person would
                vote = rating(rule, reply.content)
                service.vote(session, len(session.turns) - 1, vote, reason=reason, simulated=True)
                report.message_ids.append(reply.message_id)
                report.replies += 1
                report.liked += vote > 0
                votes.append(vote)
        except (ChatError, PromptTooLong) as exc:
            report.failed.append(f"{text}: {exc}")
        report.prompts += 1
        if progress:
            shown = text if len(text) <= 50 else text[:47] + "..."
            liked = sum(v > 0 for v in votes)
            progress(f"SIMULATED [{i + 1}/{n}] {liked}/{len(votes)} liked: {shown}")
    return report


def rerate(store, persona_id: str, rule) -> SimulationReport:
    """Vote again, by ``rule``, on every reply the simulator has rated for ``persona_id``; no generation.

    The same SIMULATED replies with another rule's thumbs: what `simulate` with that rule and the same
    seeds would have stored, at no generation cost. Conversations are retitled with the new rule.
    """
    user_id = store.get_or_create_user(SIMULATOR_USER)
    reason = f"simulated: {rule.describe()}"
    report = SimulationReport(persona_id, rule.describe())
    conversations: dict[int, str] = {}
    for row in store.feedback_rows(persona_id, user_id=user_id):
        if not row.feedback.simulated or row.feedback.rating is None:
            continue
        vote = rating(rule, row.message.content)
        store.set_feedback(row.message.id, user_id, vote, reason=reason, simulated=True)
        report.replies += 1
        report.liked += vote > 0
        report.message_ids.append(row.message.id)
        if row.message.conversation_id not in conversations:  # "SIMULATED (old rule): prompt" -> the prompt
            title = store.get_conversation(row.message.conversation_id).title or ""
            conversations[row.message.conversation_id] = title.partition("): ")[2] or title
    for conversation_id, text in conversations.items():
        store.rename_conversation(conversation_id, f"SIMULATED ({rule.describe()}): {text}")
    report.conversation_ids = list(conversations)
    report.prompts = len(conversations)
    return report
