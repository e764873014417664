"""Canaries: an online A/B of a candidate version on people's thumbs (store/canary.py, `models canary*`).

Store tests run on a SQLite file and on PostgreSQL (``any_db_url``). The chat
path runs on ``ArmEngine``, a FakeEngine (tests/fake_engine.py) that answers
at once: its reply depends only on the adapter it is asked for and the seed, so a `simulate` rule tells the two
arms apart, and no model is loaded. Adapters are folders with an
``adapter_config.json`` only (the store checks they exist, never loads them).
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest
from fake_engine import FakeEngine

from chatbot import cli
from chatbot.chat import ChatService, params_for
from chatbot.simulation import parse_rule, simulate
from chatbot.store import CanaryRefused, ChatStore, NotFound, PromotionRefused
from chatbot.store.canary import ArmStats, arm_estimate, assign_arm, difference_ci
from chatbot.store.runs import RunStore

BASE = "bundled:SmolLM2-135M-Instruct.Q4_1"
PASSED_GATE = {"passed": True, "checks": [], "bounds": {}}
FAILED_GATE = {"passed": False, "bounds": {}, "checks": [
    {"name": "win_rate_lower", "op": ">", "value": 0.42, "bound": 0.5, "passed": False}]}


@pytest.fixture
def db_url(any_db_url: str) -> str:
    return any_db_url


@pytest.fixture
def store(db_url: str):
    chat_store = ChatStore.open(db_url)
    yield chat_store
    chat_store.close()


@pytest.fixture
def make_version(store: ChatStore, tmp_path: Path):
    """Register a candidate as a job does: a run and its adapter folder, with an evaluation gate (or none)."""
    runs = RunStore(store.engine)
    counter = iter(range(1000))

    def make(persona: str | None = "pirate", *, gate: dict | None = PASSED_GATE, kind: str = "kto") -> int:
        folder = tmp_path / "runs" / f"{kind}-{next(counter)}" / "adapter"
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text("{}")
        metrics = {"evaluation": {"gate": gate}} if gate is not None else {}
        run_id = runs.create_run(kind, persona_id=persona)
        return runs.register_candidate(run_id, base_model=BASE, adapter_path=str(folder), metrics=metrics)

    return make


def conversation_in(store: ChatStore, arm: str, persona: str = "pirate", user: str = "ada") -> int:
    """A new conversation of the persona that the running canary put in ``arm`` (others made on the way stay)."""
    user_id = store.get_or_create_user(user)
    for _ in range(200):
        conv = store.create_conversation(user_id, persona, "hash")
        if store.get_conversation(conv).canary_arm == arm:
            return conv
    raise AssertionError(f"no conversation landed in the {arm} arm")


def voted_conversation(store: ChatStore, arm: str, ratings: list[int], *, simulated: bool = False,
                       user: str = "ada") -> int:
    """A conversation in ``arm`` with one reply per rating, each voted so by its user."""
    conv = conversation_in(store, arm, user=user)
    user_id = store.get_or_create_user(user)
    version = store.serving_version("pirate", conv)
    written_by = store.get_or_create_model_version(BASE, version.adapter_path if version else None)
    greeting = store.add_message(conv, "assistant", "Ahoy!", finish_reason="greeting")
    store.set_feedback(greeting, user_id, 1)  # a greeting is no model's reply: never counted
    parent = greeting
    for rating in ratings:
        asked = store.add_message(conv, "user", "and?", parent_id=parent)
        parent = store.add_message(conv, "assistant", "Arr.", parent_id=asked, model_version_id=written_by)
        store.set_feedback(parent, user_id, rating, simulated=simulated)
    return conv


# -- the rule and the statistics ---------------------------------------------------


def test_assignment_is_deterministic_seed_free_and_fair() -> None:
    arms = [assign_arm(7, conv, 0.2) for conv in range(1, 10_001)]
    assert arms == [assign_arm(7, conv, 0.2) for conv in range(1, 10_001)]
    assert abs(arms.count("candidate") / len(arms) - 0.2) < 0.01
    # Another canary draws other conversations: the same users are not always the guinea pigs.
    other = [assign_arm(8, conv, 0.2) for conv in range(1, 10_001)]
    assert sum(a != b for a, b in zip(arms, other, strict=True)) > 2000
    assert all(assign_arm(7, conv, 0.999999) == "candidate" for conv in range(100))


def test_like_rates_and_ci_by_hand() -> None:
    # (votes, liked) per conversation. Control: 5 of 8 liked in 4 conversations; candidate: 1 of 6 in 3.
    control = arm_estimate([(2, 2), (2, 1), (1, 0), (3, 2), (0, 0)])  # a conversation without votes is ignored
    candidate = arm_estimate([(2, 0), (2, 1), (2, 0)])
    # Control: p = 0.625; residuals y - p*m = 0.75, -0.25, -0.625, 0.125, squares summing to 1.03125;
    # Var = 4/3 * 1.03125 / 8**2 = 0.021484375. Candidate: p = 1/6; residuals -1/3, 2/3, -1/3;
    # Var = 3/2 * (6/9) / 6**2 = 1/36.
    assert control[:3] == (8, 5, 0.625) and control[3] == pytest.approx(0.021484375 ** 0.5)
    assert candidate[:3] == (6, 1, pytest.approx(1 / 6)) and candidate[3] == pytest.approx(1 / 6)
    arm = lambda name, e: ArmStats(name, None, 0, 0, *e)  # noqa: E731
    diff, ci = difference_ci(arm("control", control), arm("candidate", candidate))
    # d = 1/6 - 5/8 = -11/24; SE = sqrt(0.021484375 + 1/36) = 0.221951; 1.959964 * SE = 0.435016.
    assert diff == pytest.approx(-11 / 24)
    assert ci == (pytest.approx(-0.893349, abs=1e-6), pytest.approx(-0.023318, abs=1e-6))
    # One vote per conversation: the usual binomial variance p(1-p)/(n-1).
    votes, liked, rate, se = arm_estimate([(1, 1)] * 3 + [(1, 0)] * 7)
    assert (votes, liked, rate) == (10, 3, 0.3) and se == pytest.approx((0.3 * 0.7 / 9) ** 0.5)
    # One voted conversation has no CI; no votes, no rate.
    assert arm_estimate([(5, 4)])[3] is None and arm_estimate([]) == (0, 0, None, None)


# -- the store: assignment, serving, one canary per persona ------------------------------


def test_share_and_stickiness_over_400_new_conversations(store: ChatStore, make_version) -> None:
    user = store.get_or_create_user("ada")
    before = store.create_conversation(user, "pirate", "h")
    candidate = make_version()
    canary = store.start_canary(candidate, by="alice", share=0.2)
    assert (canary.control_id, canary.share, canary.min_votes, canary.running) == (None, 0.2, 100, True)
    convs = [store.create_conversation(user, "pirate", "h") for _ in range(400)]
    poet = store.create_conversation(user, "poet", "h")

    arms = {c: store.get_conversation(c).canary_arm for c in convs}
    share = sum(arm == "candidate" for arm in arms.values()) / len(convs)
    assert abs(share - 0.2) < 0.05, share
    assert all(arms[c] == assign_arm(canary.id, c, 0.2) for c in convs)
    assert {store.get_conversation(c).canary_id for c in convs} == {canary.id}
    # Existing conversations and other personas' are in no arm and keep what serves the persona.
    for other in (before, poet):
        assert (store.get_conversation(other).canary_id, store.get_conversation(other).canary_arm) == (None, None)
    assert store.serving_version("pirate", before) is None and store.serving_version("pirate") is None
    for c in convs[:60]:  # every lookup for a conversation gives its arm's version, every time
        served = store.serving_version("pirate", c)
        assert (served.id if served else None) == (candidate if arms[c] == "candidate" else None)
    assigned = store.canary_stats(canary.id)
    assert (assigned.candidate.assigned, assigned.control.assigned) == (round(share * 400), 400 - round(share * 400))

    stopped = store.stop_canary("pirate", by="bob")
    assert (stopped.running, stopped.ended_by, stopped.outcome) == (False, "bob", "stopped by bob")
    assert stopped.result["arms"]["candidate"]["assigned"] == round(share * 400)
    # Ended: everyone gets the control again, and new conversations get no arm.
    assert all(store.serving_version("pirate", c) is None for c in convs[:60])
    assert store.get_conversation(store.create_conversation(user, "pirate", "h")).canary_id is None


def test_one_running_canary_per_persona_and_refusals(store: ChatStore, make_version) -> None:
    v1, v2, poet = make_version(), make_version(), make_version("poet")
    first = store.start_canary(v1, by="alice")
    with pytest.raises(CanaryRefused, match=f"persona 'pirate' already has a running canary \\(canary {first.id}, "
                                            f"version {v1}, started by alice\\): stop it first"):
        store.start_canary(v2, by="bob")
    store.start_canary(poet, by="bob")  # another persona's is independent
    assert store.running_canary("pirate").id == first.id
    store.stop_canary("pirate", by="alice")
    with pytest.raises(CanaryRefused, match="no canary is running for persona 'pirate'"):
        store.stop_canary("pirate", by="alice")
    second = store.start_canary(v2, by="bob", share=0.5, min_votes=10)
    assert [c.id for c in store.canaries("pirate")] == [first.id, second.id]

    for share in (0, 1, 1.5, -0.1, float("nan")):
        with pytest.raises(CanaryRefused, match="--share must be between 0 and 1"):
            store.start_canary(v1, by="a", share=share)
    with pytest.raises(CanaryRefused, match="--min-votes must be a whole number"):
        store.start_canary(v1, by="a", min_votes=0)
    with pytest.raises(NotFound, match="model version 999 does not exist"):
        store.start_canary(999, by="a")
    with pytest.raises(PromotionRefused, match="is a reward model"):
        store.start_canary(make_version(kind="reward"), by="a")
    with pytest.raises(PromotionRefused, match="belongs to no persona"):
        store.start_canary(make_version(None), by="a")

    store.stop_canary("pirate", by="a")
    store.promote(v1, by="ops")
    with pytest.raises(CanaryRefused, match=f"version {v1} already serves persona 'pirate'"):
        store.start_canary(v1, by="a")
    assert store.start_canary(v2, by="a").control_id == v1  # the control: what serves when it starts


def test_canary_figures_count_people_s_votes_on_model_replies(store: ChatStore, make_version) -> None:
    candidate = make_version()
    canary = store.start_canary(candidate, by="alice", min_votes=6)
    voted_conversation(store, "candidate", [1] * 5, simulated=True, user="simulator")
    for ratings in ([1, 1], [1, -1], [-1], [1, -1, 1]):  # the hand-computed control arm above
        voted_conversation(store, "control", ratings)
    for ratings in ([-1, -1], [1, -1], [-1, -1]):
        voted_conversation(store, "candidate", ratings)

    figures = store.canary_stats(canary.id)
    assert (figures.control.votes, figures.control.liked, figures.control.conversations) == (8, 5, 4)
    assert (figures.candidate.votes, figures.candidate.liked, figures.candidate.conversations) == (6, 1, 3)
    assert figures.control.version_id is None and figures.candidate.version_id == candidate
    assert figures.difference == pytest.approx(-11 / 24)
    assert figures.ci == (pytest.approx(-0.893349, abs=1e-6), pytest.approx(-0.023318, abs=1e-6))
    assert figures.min_votes_reached and figures.worse and figures.verdict == "significantly worse"
    # The vote that made it significant ended it (people's votes: the canary counts no simulated ones).
    ended = store.canaries("pirate")[-1]
    assert not ended.running and ended.ended_by == "auto"
    assert ended.outcome.startswith("rolled back: significantly worse (candidate 16.7% (1 of 6 votes, "
                                    "3 conversations) vs control 62.5% (5 of 8 votes, 4 conversations): "
                                    "-45.8 points, 95% CI [-89.3, -2.3]")
    # Simulated votes count only when asked for.
    with_simulated = store.canary_stats(canary.id, include_simulated=True)
    assert (with_simulated.candidate.votes, with_simulated.candidate.liked) == (6 + 5, 1 + 5)


def test_minimum_sample_holds_back_every_decision(store: ChatStore, make_version) -> None:
    candidate = make_version()
    canary = store.start_canary(candidate, by="alice", min_votes=20)
    for _ in range(3):
        voted_conversation(store, "control", [1, 1, 1])
        voted_conversation(store, "candidate", [-1, -1, -1])
    figures = store.canary_stats(canary.id)
    assert figures.ci is not None and figures.ci[1] < 0, "significant, but on 9 votes an arm"
    assert not figures.min_votes_reached and not figures.worse and figures.verdict == "not enough votes yet"
    assert store.running_canary("pirate").id == canary.id, "no auto-rollback below the minimum"
    with pytest.raises(CanaryRefused, match=f"version {candidate}'s A/B \\(canary {canary.id}\\) has not reached "
                                            "its minimum sample of 20 votes per arm \\(candidate 9, control 9\\)"):
        store.promote(candidate, by="ops", require_ab=True)


def test_simulated_votes_never_roll_back_a_people_only_canary(store: ChatStore, make_version) -> None:
    canary = store.start_canary(make_version(), by="alice", min_votes=2)
    for _ in range(3):
        voted_conversation(store, "control", [1, 1], simulated=True, user="simulator")
        voted_conversation(store, "candidate", [-1, -1], simulated=True, user="simulator")
    assert store.canary_stats(canary.id, include_simulated=True).worse
    assert store.running_canary("pirate") is not None
    assert store.canary_stats(canary.id).candidate.votes == 0


def test_concurrent_starts_leave_one_running_canary(db_url: str, store: ChatStore, make_version) -> None:
    versions = [make_version() for _ in range(4)]
    stores = [ChatStore.open(db_url) for _ in versions]  # separate pools, as separate processes would have
    start = threading.Barrier(len(stores))
    outcomes: list[object] = []

    def worker(i: int) -> None:
        start.wait()
        try:
            outcomes.append(stores[i].start_canary(versions[i], by=f"w{i}").id)
        except BaseException as exc:  # noqa: BLE001 - checked below
            outcomes.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in stores:
        s.close()
    started = [o for o in outcomes if isinstance(o, int)]
    assert len(started) == 1 and all(isinstance(o, CanaryRefused) for o in outcomes if o not in started), outcomes
    assert [c.id for c in store.canaries("pirate")] == started


def test_concurrent_votes_cannot_miss_the_auto_rollback(db_url: str, store: ChatStore, make_version) -> None:
    """Each check runs under the persona's lock, so the last vote's check sees every vote before it."""
    candidate = make_version()
    store.start_canary(candidate, by="alice", min_votes=4)
    user = store.get_or_create_user("ada")
    ballots = []  # (reply, rating): only all eight together make the candidate significantly worse
    for arm, rating in (("control", 1), ("control", 1), ("candidate", -1), ("candidate", -1)):
        conv = conversation_in(store, arm)
        written_by = store.get_or_create_model_version(BASE, None)
        for _ in range(2):
            asked = store.add_message(conv, "user", "and?")
            ballots.append((store.add_message(conv, "assistant", "Arr.", parent_id=asked,
                                              model_version_id=written_by), rating))
    stores = [ChatStore.open(db_url) for _ in ballots]
    start = threading.Barrier(len(stores))
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        start.wait()
        try:
            stores[i].set_feedback(ballots[i][0], user, ballots[i][1])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in stores:
        s.close()
    assert not errors, errors
    ended = store.canaries("pirate")[-1]
    assert ended.ended_by == "auto" and ended.outcome.startswith("rolled back: significantly worse")
    assert ended.result["arms"]["candidate"]["votes"] == ended.result["arms"]["control"]["votes"] == 4


# -- decisions: promote --require-ab, a better A/B past the gate, what ends a canary -------------


def test_require_ab_refuses_without_an_a_b_and_accepts_one_not_worse(store: ChatStore, make_version) -> None:
    candidate = make_version()
    with pytest.raises(CanaryRefused, match=f"version {candidate} has no A/B against what serves persona 'pirate' "
                                            f"now: start one with `persona-studio models canary {candidate}`"):
        store.promote(candidate, by="ops", require_ab=True)
    canary = store.start_canary(candidate, by="alice", min_votes=4)
    for ratings in ([1, -1], [1, -1]):
        voted_conversation(store, "control", ratings)
        voted_conversation(store, "candidate", ratings)
    change = store.promote(candidate, by="ops", require_ab=True)
    assert change.entry.ab["canary"] == canary.id and change.entry.ab["verdict"] == "no significant difference"
    assert change.entry.ab["arms"]["candidate"]["votes"] == 4 and change.entry.forced is False
    assert change.ended_canary.id == canary.id and change.ended_canary.outcome == "promoted by ops"
    assert store.promotion_log("pirate")[-1].ab == change.entry.ab
    assert store.running_canary("pirate") is None and store.serving_version("pirate").id == candidate


def test_require_ab_refuses_a_significantly_worse_version(store: ChatStore, make_version) -> None:
    candidate = make_version()
    canary = store.start_canary(candidate, by="alice", min_votes=4)
    for _ in range(2):
        voted_conversation(store, "control", [1, 1])
        voted_conversation(store, "candidate", [-1, -1])
    assert store.canaries("pirate")[-1].outcome.startswith("rolled back: significantly worse")
    with pytest.raises(CanaryRefused, match=f"version {candidate}'s A/B \\(canary {canary.id}\\) shows it "
                                            "significantly worse than the control: candidate 0.0%"):
        store.promote(candidate, by="ops", require_ab=True)
    store.promote(candidate, by="ops")  # its gate passed: without --require-ab, the A/B is only recorded
    assert store.promotion_log("pirate")[-1].ab["verdict"] == "significantly worse"


def test_a_significantly_better_a_b_promotes_past_a_failed_or_missing_gate(store: ChatStore, make_version) -> None:
    for gate in (FAILED_GATE, None):
        candidate = make_version(gate=gate)
        canary = store.start_canary(candidate, by="alice", min_votes=4)
        voted_conversation(store, "control", [-1, -1])
        voted_conversation(store, "candidate", [1, 1])
        with pytest.raises(PromotionRefused, match=f"nor does its A/B \\(canary {canary.id}\\) show it significantly "
                                                   "better: not enough votes yet"):
            store.promote(candidate, by="ops")
        voted_conversation(store, "control", [-1, 1])
        voted_conversation(store, "candidate", [1, 1])
        change = store.promote(candidate, by="ops")  # no --force: people are an independent judge
        assert change.entry.forced is False and change.entry.gate == gate
        assert change.entry.ab["verdict"] == "significantly better" and change.entry.ab["ci"][0] > 0
        store.rollback("pirate", by="ops")


def test_promoting_another_version_or_rolling_back_ends_the_canary(store: ChatStore, make_version) -> None:
    v1, v2, v3 = make_version(), make_version(), make_version()
    store.promote(v1, by="ops")
    canary = store.start_canary(v2, by="alice", min_votes=1)
    change = store.promote(v3, by="bob")
    assert change.ended_canary.id == canary.id
    assert change.ended_canary.outcome == f"ended: version {v3} was promoted by bob, replacing its control"
    # Its control no longer serves: the A/B no longer says anything about promoting v2 now.
    with pytest.raises(CanaryRefused, match=f"version {v2} has no A/B against what serves"):
        store.promote(v2, by="ops", require_ab=True)
    store.start_canary(v2, by="alice")
    change = store.rollback("pirate", by="carol")
    assert change.ended_canary.outcome == "ended: a rollback by carol replaced its control"
    assert store.serving_version("pirate").id == v1


# -- the chat path, with simulate playing the users -------------------------------------


class ArmEngine(FakeEngine):
    """Answers at once, by adapter and seed instead of from a queue: a reply ends with a question
    ("liked" by the rule `question`) for a share of seeds that depends on the adapter: ``like_rates[adapter]``."""

    def __init__(self, like_rates: dict[str | None, float]):
        super().__init__(model_id=BASE)
        self.like_rates = like_rates

    def next_text(self, prompt, params, adapter) -> str:
        # The folder's name, not its path (which changes with pytest's tmp_path): the same replies every run.
        name = Path(adapter).name if adapter else "base"
        digest = hashlib.blake2b(f"{name}:{params.seed}".encode(), digest_size=8).digest()
        liked = int.from_bytes(digest, "big") / 2**64 < self.like_rates.get(adapter, 0.5)
        return "Arr, what say ye?" if liked else "Arr."


@pytest.fixture
def sqlite_store(tmp_path):
    url = f"sqlite:///{tmp_path / 'chat.db'}"
    chat_store = ChatStore.open(url)
    yield chat_store, url
    chat_store.close()


def models(capsys, db_url: str, *args: str) -> tuple[int, str, str]:
    code = cli.main(["models", *args, "--db-url", db_url])
    out, err = capsys.readouterr()
    return code, out, err


def replies_by_conversation(store: ChatStore, conversations) -> dict[int, list]:
    return {c: [m for m in store.conversation_messages(c) if m.role == "assistant" and m.model_version_id]
            for c in conversations}


def test_every_reply_of_a_conversation_comes_from_its_arm_retry_included(sqlite_store, personas, tmp_path) -> None:
    store, _ = sqlite_store
    runs = RunStore(store.engine)
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    candidate = runs.register_candidate(runs.create_run("kto", persona_id="pirate"), base_model=BASE,
                                        adapter_path=str(folder), metrics={})
    engine = ArmEngine({})
    service = ChatService(engine, personas, store)
    user = service.user_id("ada")
    params = params_for(personas.get("pirate"), seed=1)

    def chat(session, *texts):
        for text in texts:
            list(service.send(session, text, params))
            list(service.retry(session, params))

    old = service.new_session(user, "pirate")
    chat(old, "Before the canary")
    canary = store.start_canary(candidate, by="alice", share=0.3)
    sessions = [service.new_session(user, "pirate") for _ in range(40)]
    for session in sessions:
        chat(session, "Ahoy", "Where be the gold?")
    chat(old, "During the canary")

    base = store.get_or_create_model_version(BASE, None)
    written = replies_by_conversation(store, [s.conversation_id for s in sessions + [old]])
    arms = {s.conversation_id: store.get_conversation(s.conversation_id).canary_arm for s in sessions}
    assert 0 < sum(arm == "candidate" for arm in arms.values()) < 40
    for conv, arm in arms.items():
        assert len(written[conv]) == 4  # two replies and two retries
        assert {m.model_version_id for m in written[conv]} == {candidate if arm == "candidate" else base}, conv
    assert {m.model_version_id for m in written[old.conversation_id]} == {base}, "started before: keeps the control"
    assert engine.adapters.count(str(folder)) == 4 * sum(arm == "candidate" for arm in arms.values())

    store.stop_canary("pirate", by="alice")
    in_candidate_arm = next(s for s in sessions if arms[s.conversation_id] == "candidate")
    chat(in_candidate_arm, "After the canary")
    assert replies_by_conversation(store, [in_candidate_arm.conversation_id])[
        in_candidate_arm.conversation_id][-1].model_version_id == base
    assert store.canary_stats(canary.id).candidate.votes == 0


def register_adapter(store: ChatStore, tmp_path: Path, name: str, gate: dict | None) -> tuple[int, str]:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    runs = RunStore(store.engine)
    metrics = {"evaluation": {"gate": gate}} if gate is not None else {}
    version = runs.register_candidate(runs.create_run("kto", persona_id="pirate"), base_model=BASE,
                                      adapter_path=str(folder), metrics=metrics)
    return version, str(folder)


def test_simulate_plays_the_users_worse_candidate_is_rolled_back(sqlite_store, personas, tmp_path, capsys) -> None:
    store, url = sqlite_store
    worse, folder = register_adapter(store, tmp_path, "worse", PASSED_GATE)
    service = ChatService(ArmEngine({None: 0.8, folder: 0.2}), personas, store)
    params = params_for(personas.get("pirate"), seed=0)
    rule = parse_rule("question")

    # A canary on people's votes only: simulate's votes are shown with --include-simulated, decide nothing.
    code, out, err = models(capsys, url, "canary", str(worse), "--share", "0.5", "--min-votes", "10",
                            "--by", "alice")
    assert (code, err) == (0, "") and f"version {worse} serves 50% of persona pirate's new conversations" in out
    assert "the control (the persona file's own adapter or the base model) the rest" in out
    simulate(service, "pirate", rule, ["Ahoy", "Where be the gold?"], n=30, samples=2, params=params)
    code, out, _ = models(capsys, url, "canary-status", "pirate")
    assert code == 0 and "votes counted: people's only" in out and "verdict: not enough votes yet" in out
    code, out, _ = models(capsys, url, "canary-status", "pirate", "--include-simulated", "--json")
    status = json.loads(out)
    assert status["verdict"] == "significantly worse" and status["running"] is True
    assert status["arms"]["candidate"]["votes"] + status["arms"]["control"]["votes"] == 60
    code, _, err = models(capsys, url, "promote", str(worse), "--require-ab")
    assert code == 1 and "has not reached its minimum sample of 10 votes per arm (candidate 0, control 0)" in err
    code, _, _ = models(capsys, url, "canary-stop", "pirate", "--by", "alice")
    assert code == 0

    # A demo canary that counts simulated votes: the vote that shows it worse ends it.
    code, out, _ = models(capsys, url, "canary", str(worse), "--share", "0.5", "--min-votes", "10",
                          "--include-simulated", "--by", "alice")
    assert code == 0 and "people's and simulated votes" in out
    canary = store.running_canary("pirate")
    report = simulate(service, "pirate", rule, ["Ahoy", "Where be the gold?"], n=40, samples=2, params=params)
    assert report.replies == 80 and not report.failed
    ended = store.canaries("pirate")[-1]
    assert ended.id == canary.id and not ended.running and ended.ended_by == "auto"
    assert ended.outcome.startswith("rolled back: significantly worse (candidate ")
    assert ended.result["min_votes_reached"] and ended.result["ci"][1] < 0

    # Assigned while it ran: one version per conversation. After: no arm, and every reply is the control's.
    base = store.get_or_create_model_version(BASE, None)
    written = replies_by_conversation(store, report.conversation_ids)
    in_arm = [c for c in report.conversation_ids if store.get_conversation(c).canary_id == canary.id]
    assert in_arm and len(in_arm) < len(report.conversation_ids), "it ended part-way"
    for conv in report.conversation_ids:
        arm = store.get_conversation(conv).canary_arm
        for m in written[conv]:
            if m.created_at > ended.ended_at or arm != "candidate":
                assert m.model_version_id == base
            else:
                assert m.model_version_id == worse

    code, out, _ = models(capsys, url, "canary-status", "pirate")
    assert code == 0 and "rolled back: significantly worse" in out and "verdict: significantly worse" in out
    code, _, err = models(capsys, url, "promote", str(worse), "--require-ab")
    assert code == 1 and err.count("\n") == 1 and "shows it significantly worse than the control" in err
    code, out, _ = models(capsys, url, "log", "pirate")
    assert [line.split()[3] for line in out.splitlines()[1:]] == ["canary", "canary-end", "canary", "canary-end"]
    assert "auto" in out.splitlines()[-1] and "rolled back: significantly worse" in out.splitlines()[-1]


def test_simulate_plays_the_users_better_candidate_is_promoted_past_a_failed_gate(
        sqlite_store, personas, tmp_path, capsys) -> None:
    store, url = sqlite_store
    better, folder = register_adapter(store, tmp_path, "better", FAILED_GATE)
    service = ChatService(ArmEngine({None: 0.3, folder: 0.9}), personas, store)
    params = params_for(personas.get("pirate"), seed=0)

    code, _, err = models(capsys, url, "canary", str(better), "--share", "0.4", "--min-votes", "15",
                          "--include-simulated")
    assert code == 0 and f"version {better}'s offline gate: FAILED" in err
    simulate(service, "pirate", parse_rule("question"), ["Ahoy"], n=50, samples=2, params=params)
    code, out, _ = models(capsys, url, "canary-status", "pirate")
    assert code == 0 and "verdict: significantly better" in out and "minimum sample: 15 votes per arm: reached" in out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("control", "candidate"))}
    assert lines["candidate"][1] == str(better) and lines["control"][1] == "-"
    assert store.running_canary("pirate") is not None

    code, out, err = models(capsys, url, "promote", str(better), "--require-ab", "--by", "dan")
    assert (code, err) == (0, "")
    assert f"version {better} now serves persona pirate" in out and "A/B (canary 1): significantly better" in out
    assert "canary 1 ended (promoted by dan)" in out
    entry = store.promotion_log("pirate")[-1]
    assert entry.forced is False and entry.gate == FAILED_GATE and entry.ab["verdict"] == "significantly better"
    code, out, _ = models(capsys, url, "log", "pirate")
    promoted = next(line for line in out.splitlines() if " promote " in line)
    assert "A/B canary 1: significantly better" in promoted and "promoted on its A/B" in promoted


def test_cli_canary_errors_are_one_line(store: ChatStore, make_version, db_url: str, capsys) -> None:
    version = make_version()
    code, _, err = models(capsys, db_url, "canary-status", "pirate")
    assert code == 1 and err == ("persona-studio: error: no canary for persona pirate: start one with "
                                 "`persona-studio models canary VERSION`\n")
    code, _, err = models(capsys, db_url, "canary", str(version), "--share", "1.5")
    assert code == 1 and err.count("\n") == 1 and "--share must be between 0 and 1" in err
    assert models(capsys, db_url, "canary", str(version), "--by", "a")[0] == 0
    code, _, err = models(capsys, db_url, "canary", str(version))
    assert code == 1 and err.count("\n") == 1 and "already has a running canary" in err
    code, out, _ = models(capsys, db_url, "canary-status", "pirate")
    assert code == 0 and "difference (candidate - control): n/a" in out and "verdict: not enough votes yet" in out
    code, out, err = models(capsys, db_url, "canary-stop", "pirate", "--by", "a")
    assert (code, err) == (0, "") and "the persona file's own adapter or the base model serves persona pirate" in out
    code, _, err = models(capsys, db_url, "canary-stop", "pirate")
    assert (code, err) == (1, "persona-studio: error: no canary is running for persona 'pirate'\n")
