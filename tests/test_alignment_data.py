"""alignment.data: preference pairs, KTO rows, PPO prompts and their splits, from a real SQLite store."""

from datetime import datetime, timedelta, timezone

import pytest

from alignment.data import (
    DataTooSmall,
    build_kto,
    build_preference,
    build_prompts,
    require,
)


def prompt(text, persona="Be a pirate."):
    return [{"role": "system", "content": persona}, {"role": "user", "content": text}]


class Filler:
    """Writes conversations and votes by hand, the way ChatService would store them."""

    def __init__(self, store):
        self.store = store
        self.ann = store.get_or_create_user("ann")
        self.bob = store.get_or_create_user("bob")
        self.base = store.get_or_create_model_version("base")

    def conversation(self, text, ratings, persona="pirate", model_version=None, user=None):
        """One conversation: a user message `text` and one reply (regenerations) per rating."""
        user = user or self.ann
        conv = self.store.create_conversation(user, persona, "v1")
        greeting = self.store.add_message(conv, "assistant", "Ahoy!", finish_reason="greeting")
        asked = self.store.add_message(conv, "user", text, parent_id=greeting)
        replies = []
        for i, rating in enumerate(ratings):
            reply = self.store.add_message(conv, "assistant", f"{text} reply {i} in {conv}", parent_id=asked,
                                           prompt=prompt(text), model_version_id=model_version or self.base)
            if rating is not None:
                self.store.set_feedback(reply, user, rating)
            replies.append(reply)
        return conv, replies


@pytest.fixture
def fill(store):
    return Filler(store)


def test_pairs_come_only_from_identical_prompts_regenerations_first(store, fill):
    c1, (a, b) = fill.conversation("Hi", [1, -1])
    _, (c,) = fill.conversation("Hi", [-1])  # same prompt, another conversation
    fill.conversation("Bye", [1])  # no disliked sibling: no pair
    split = build_preference(store, eval_fraction=0)
    rows = split.train
    assert [(r["chosen_id"], r["rejected_id"], r["source"]) for r in rows] == [
        (a, b, "regeneration"), (a, c, "same_prompt")]
    assert all(r["prompt"] == prompt("Hi") for r in rows)
    assert rows[0]["chosen"] == [{"role": "assistant", "content": f"Hi reply 0 in {c1}"}]
    assert split.trl()[0].keys() == {"prompt", "chosen", "rejected"}
    assert (split.stats["regeneration_pairs"], split.stats["same_prompt_pairs"]) == (1, 1)


def test_regenerations_come_before_cross_conversation_pairs_even_when_newer(store, fill):
    fill.conversation("Hi", [1])
    fill.conversation("Hi", [-1])
    _, (x, y) = fill.conversation("Yo", [-1, 1])
    rows = build_preference(store, eval_fraction=0).train
    assert rows[0]["source"] == "regeneration" and (rows[0]["chosen_id"], rows[0]["rejected_id"]) == (y, x)
    assert [r["source"] for r in rows] == ["regeneration", "same_prompt"]


def test_kto_labels_follow_summed_votes(store, fill):
    _, (a, b, c) = fill.conversation("Hi", [1, -1, None])
    store.set_feedback(a, fill.bob, -1)  # 1 - 1: a tie, no label
    rows = build_kto(store, eval_fraction=0).train
    assert [(r["message_id"], r["label"]) for r in rows] == [(b, False)]
    store.set_feedback(c, fill.ann, 1)
    rows = build_kto(store, eval_fraction=0).train
    assert [(r["message_id"], r["label"]) for r in rows] == [(b, False), (c, True)]
    assert rows[1]["completion"] == [{"role": "assistant", "content": store.get_message(c).content}]
    assert build_kto(store, eval_fraction=0).trl()[0].keys() == {"prompt", "completion", "label"}


def test_ppo_prompts_are_distinct_and_exclude_the_reply(store, fill):
    fill.conversation("Hi", [1, -1, 1])
    fill.conversation("Hi", [-1])
    fill.conversation("Bye", [1, None])
    fill.conversation("Unrated", [None])
    rows = build_prompts(store, eval_fraction=0).train
    assert [r["prompt"] for r in rows] == [prompt("Hi"), prompt("Bye")]
    assert all(m["role"] != "assistant" for r in rows for m in r["prompt"])


def test_split_by_conversation_keeps_conversations_and_prompts_together(store, fill):
    for i in range(40):
        fill.conversation(f"question {i}", [1, -1, -1])
    fill.conversation("question 0", [-1])  # shares a prompt with conversation 0: same group
    split = build_preference(store, split="conversation", eval_fraction=0.3, seed=1)
    train_convs = {r["conversation_id"] for r in split.train}
    eval_convs = {r["conversation_id"] for r in split.eval}
    assert train_convs and eval_convs and not train_convs & eval_convs
    train_prompts = {r["prompt"][-1]["content"] for r in split.train}
    eval_prompts = {r["prompt"][-1]["content"] for r in split.eval}
    assert not train_prompts & eval_prompts
    assert {r["chosen_id"] for r in split.train}.isdisjoint({r["chosen_id"] for r in split.eval})
    # Deterministic for a seed; another seed holds out other conversations.
    again = build_preference(store, split="conversation", eval_fraction=0.3, seed=1)
    assert again.eval == split.eval
    other = build_preference(store, split="conversation", eval_fraction=0.3, seed=2)
    assert {r["conversation_id"] for r in other.eval} != eval_convs


def test_split_by_time_holds_out_the_newest_conversations(store, fill):
    convs = [fill.conversation(f"q{i}", [1, -1])[0] for i in range(10)]
    split = build_kto(store, split="time", eval_fraction=0.2)
    assert {r["conversation_id"] for r in split.eval} == set(convs[-2:])
    assert {r["conversation_id"] for r in split.train} == set(convs[:-2])
    assert split.stats["eval_from"]


def test_snapshot_hash_is_stable_and_changes_with_a_vote(store, fill):
    _, (a, b) = fill.conversation("Hi", [1, -1])
    first = build_preference(store, eval_fraction=0).snapshot_hash
    store.set_feedback(a, fill.ann, 1)  # the same vote again: same data
    assert build_preference(store, eval_fraction=0).snapshot_hash == first
    store.set_feedback(b, fill.ann, 1)
    changed = build_preference(store, eval_fraction=0)
    assert changed.snapshot_hash != first and not changed.train
    assert len(first) == 64


def test_filters_by_persona_time_and_model_version(store, fill):
    tuned = store.get_or_create_model_version("base", "adapters/v1")
    fill.conversation("Hi", [1, -1], persona="pirate")
    other, _ = fill.conversation("Hi", [1, -1], persona="assistant", model_version=tuned)
    assert len(build_preference(store, persona="pirate", eval_fraction=0).train) == 1
    # The two conversations share a prompt text (same stored prompt): without a filter they pair across.
    assert len(build_preference(store, eval_fraction=0).train) == 4
    only_tuned = build_kto(store, model_version=tuned, eval_fraction=0)
    assert {r["conversation_id"] for r in only_tuned.train} == {other}
    future = datetime.now(timezone.utc) + timedelta(days=1)
    assert build_kto(store, since=future).train == ()
    assert build_kto(store, persona="pirate", eval_fraction=0).stats["persona"] == "pirate"


def test_too_little_data_is_a_clear_message(store, fill):
    for i in range(3):
        fill.conversation(f"q{i}", [1, -1, -1, -1])
    split = build_preference(store, persona="pirate", eval_fraction=0)
    assert len(split.train) == 9
    with pytest.raises(DataTooSmall) as raised:
        require(split, 32)
    message = str(raised.value)
    assert message.startswith("9 pairs for persona pirate (9 train, 0 eval")
    assert "the recipe needs at least 32" in message and "Retry" in message
    assert (raised.value.train, raised.value.min_train) == (9, 32)
    with pytest.raises(DataTooSmall, match="needs at least 10 \\(8 train, 2 eval\\)"):
        split.require(8, 2)
    assert split.require(9) is split
    with pytest.raises(DataTooSmall, match="^0 prompts for persona nobody"):
        build_prompts(store, persona="nobody").require(1)
    with pytest.raises(DataTooSmall, match="^0 labelled replies for all personas, since "):
        build_kto(store, since=datetime.now(timezone.utc) + timedelta(days=1)).require(1)


def test_bad_split_arguments_are_refused(store, fill):
    with pytest.raises(ValueError, match="unknown split"):
        build_kto(store, split="row")
    with pytest.raises(ValueError, match="eval_fraction"):
        build_kto(store, eval_fraction=1.5)


# -- the judge's part of the feedback ---------------------------------------------


def test_policy_and_judge_parts_never_share_a_conversation(store, fill):
    from alignment.data import JUDGE_FRACTION

    for i in range(200):
        fill.conversation(f"Question {i}", [1, -1])
    whole, policy, judge = (build_preference(store, eval_fraction=0.2, seed=3, part=part)
                            for part in ("all", "policy", "judge"))
    conversations = {name: {r["conversation_id"] for r in split.train}
                     for name, split in (("all", whole), ("policy", policy), ("judge", judge))}
    assert not conversations["policy"] & conversations["judge"]
    assert conversations["policy"] | conversations["judge"] == conversations["all"]
    share = len(conversations["judge"]) / len(conversations["all"])
    assert abs(share - JUDGE_FRACTION) < 0.1, share
    # The eval rows are the held-out conversations whatever the part.
    assert whole.eval == policy.eval == judge.eval
    assert (policy.stats["part"], judge.stats["part"]) == ("policy", "judge")
    # The parts do not move with the recipe's seed: a judge trained with another seed is still disjoint.
    other_seed = {r["conversation_id"] for r in build_preference(store, eval_fraction=0.2, seed=99,
                                                                 part="judge").train}
    assert not other_seed & conversations["policy"]
    with pytest.raises(ValueError, match="unknown feedback part 'both'"):
        build_kto(store, part="both")


def test_too_little_data_in_a_part_says_which_part(store, fill):
    fill.conversation("Hi", [1, -1])
    with pytest.raises(DataTooSmall, match=r"1 pairs for all personas \(0 train, 0 eval, 1 in the policy part: "
                                           r"judge jobs train on the judge part only; split by conversation\)"):
        build_preference(store, eval_fraction=0, part="judge").require(5)


def test_pairs_say_whether_each_reply_ended_on_its_own(store, fill):
    conv = store.create_conversation(fill.ann, "pirate", "v1")
    asked = store.add_message(conv, "user", "Hi")
    ended = store.add_message(conv, "assistant", "Short.", parent_id=asked, prompt=prompt("Hi"), finish_reason="eos")
    cut = store.add_message(conv, "assistant", "Long and", parent_id=asked, prompt=prompt("Hi"),
                            finish_reason="length")
    unknown = store.add_message(conv, "assistant", "Old row", parent_id=asked, prompt=prompt("Hi"))
    for message, rating in ((ended, 1), (cut, -1), (unknown, -1)):
        store.set_feedback(message, fill.ann, rating)
    split = build_preference(store, eval_fraction=0)
    assert [(r["chosen_eos"], r["rejected_eos"]) for r in split.train] == [(True, False), (True, None)]
    assert split.trl("train")[0].keys() == {"prompt", "chosen", "rejected"}  # trainers never see them


def test_train_prompts_file_names_prompts_and_conversations(store, fill, tmp_path):
    import json

    from alignment.data import prompt_fingerprints, write_train_prompts

    c1, _ = fill.conversation("Hi", [1, -1])
    c2, _ = fill.conversation("Bye", [1, -1])
    split = build_preference(store, eval_fraction=0)
    written = json.loads(write_train_prompts(tmp_path, split.train).read_text())
    assert written == {"keys": prompt_fingerprints(split.train), "conversations": [c1, c2]}
