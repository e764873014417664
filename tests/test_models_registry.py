"""Model versions, promotion through the gate, rollback, and `persona-studio models`.

Store tests run on a SQLite file and on PostgreSQL (``any_db_url``). Adapters
here are folders with an ``adapter_config.json`` only: the store checks that
an adapter is on disk, never loads it (tests/test_serving.py does).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from chatbot import cli
from chatbot.store import ChatStore, NotFound, PromotionRefused
from chatbot.store.runs import RunStore

BASE = "bundled:SmolLM2-135M-Instruct.Q4_1"

# Gate verdicts as alignment/gate.py writes them; the last failed check has a bound
# written as text, which older or hand-made verdicts may have.
PASSED_GATE = {
    "passed": True,
    "checks": [
        {"name": "win_rate_lower", "op": ">", "value": 0.56, "bound": 0.5, "passed": True},
        {"name": "kl", "op": "<=", "value": 2.1, "bound": 5.0, "passed": True},
    ],
    "bounds": {"min_win_rate_lower": 0.5, "max_kl": 5.0},
}
FAILED_GATE = {
    "passed": False,
    "checks": [
        {"name": "win_rate_lower", "op": ">", "value": 0.42, "bound": 0.5, "passed": False},
        {"name": "kl", "op": "<=", "value": 2.1, "bound": 5.0, "passed": True},
        {"name": "length_ratio", "op": "within", "value": None, "bound": [0.5, 2.0], "passed": False},
        {"name": "distinct_2", "value": 0.18, "bound": ">= 0.3", "passed": False},
    ],
    "bounds": {"min_win_rate_lower": 0.5, "max_kl": 5.0},
}


def evaluated(gate: dict | None) -> dict:
    """Candidate metrics as the job writes them, with `align evaluate`'s result added."""
    metrics = {"eval_loss": 0.5}
    if gate is not None:
        metrics["evaluation"] = {"win_rate": {"value": 0.6, "ci": [0.56, 0.64]}, "gate": gate}
    return metrics


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
    """Register a candidate the way a job does: a run of ``kind`` and its adapter folder."""
    runs = RunStore(store.engine)
    counter = iter(range(1000))

    def make(persona: str | None = "pirate", *, gate: dict | None = PASSED_GATE, kind: str = "kto",
             on_disk: bool = True, base: str = BASE) -> int:
        folder = tmp_path / "runs" / f"{kind}-{next(counter)}" / "adapter"
        if on_disk:
            folder.mkdir(parents=True)
            (folder / "adapter_config.json").write_text("{}")
        run_id = runs.create_run(kind, persona_id=persona)
        return runs.register_candidate(run_id, base_model=base, adapter_path=str(folder), metrics=evaluated(gate))

    return make


def status(store: ChatStore, version_id: int) -> str:
    return store.get_version(version_id).status


# -- the stack ----------------------------------------------------------------


def test_nothing_promoted_serves_nothing(store: ChatStore, make_version) -> None:
    make_version()
    assert store.serving_version("pirate") is None
    assert store.promotion_log("pirate") == []


def test_promote_and_rollback_replay_as_a_stack(store: ChatStore, make_version) -> None:
    v1, v2 = make_version(), make_version()
    assert status(store, v1) == status(store, v2) == "candidate"

    change = store.promote(v1, by="alice")
    assert change.previous is None and change.serving.id == v1 and change.version.status == "serving"
    served = store.serving_version("pirate")
    assert (served.id, served.base_model, served.persona_id, served.status) == (v1, BASE, "pirate", "serving")
    assert served.adapter_path.endswith("adapter") and served.run_id is not None
    assert served.metrics["evaluation"]["gate"]["passed"] is True

    change = store.promote(v2, by="alice")
    assert (change.previous.id, change.serving.id) == (v1, v2)
    assert (status(store, v1), status(store, v2)) == ("retired", "serving")

    change = store.rollback("pirate", by="bob")
    assert (change.version.id, change.previous.id, change.serving.id) == (v2, v2, v1)
    assert (status(store, v1), status(store, v2)) == ("serving", "retired")
    assert store.serving_version("pirate").id == v1

    change = store.rollback("pirate", by="bob")
    assert change.serving is None and store.serving_version("pirate") is None
    assert (status(store, v1), status(store, v2)) == ("retired", "retired")

    log = store.promotion_log("pirate")
    assert [(e.action, e.version_id, e.by) for e in log] == [
        ("promote", v1, "alice"), ("promote", v2, "alice"), ("rollback", v2, "bob"), ("rollback", v1, "bob")]
    assert log[0].gate == PASSED_GATE and log[0].forced is False and log[0].created_at.tzinfo is not None


def test_personas_have_separate_stacks(store: ChatStore, make_version) -> None:
    pirate, poet, unused = make_version("pirate"), make_version("poet"), make_version("poet")
    store.promote(pirate, by="a")
    store.promote(poet, by="a")
    assert store.serving_version("pirate").id == pirate
    assert store.serving_version("poet").id == poet
    store.rollback("pirate", by="a")
    assert store.serving_version("pirate") is None and store.serving_version("poet").id == poet
    assert status(store, unused) == "candidate"
    assert [v.id for v in store.list_versions("poet")] == [unused, poet]
    assert {v.id for v in store.list_versions()} >= {pirate, poet, unused}


def test_promoting_the_serving_version_again_is_refused(store: ChatStore, make_version) -> None:
    v1 = make_version()
    store.promote(v1, by="a")
    with pytest.raises(PromotionRefused, match=f"version {v1} already serves persona 'pirate'"):
        store.promote(v1, by="a")


def test_a_retired_version_can_be_promoted_again(store: ChatStore, make_version) -> None:
    v1, v2 = make_version(), make_version()
    store.promote(v1, by="a")
    store.promote(v2, by="a")
    store.promote(v1, by="a")
    assert (status(store, v1), status(store, v2)) == ("serving", "retired")
    store.rollback("pirate", by="a")  # back to v2, with v1 still below it
    assert (status(store, v1), status(store, v2)) == ("retired", "serving")
    store.rollback("pirate", by="a")
    assert store.serving_version("pirate").id == v1 and status(store, v1) == "serving"


def test_rollback_with_nothing_promoted_is_a_clear_error(store: ChatStore) -> None:
    with pytest.raises(PromotionRefused, match="nothing to roll back: no promoted version serves persona 'pirate'"):
        store.rollback("pirate", by="a")
    assert store.promotion_log("pirate") == []


def test_persona_less_version_needs_an_explicit_persona(store: ChatStore, make_version) -> None:
    shared = make_version(None)
    with pytest.raises(PromotionRefused, match="belongs to no persona: name the one it should serve with --persona"):
        store.promote(shared, by="a")
    store.promote(shared, by="a", persona_id="pirate")
    store.promote(shared, by="a", persona_id="poet")
    assert store.serving_version("poet").id == store.serving_version("pirate").id == shared
    assert [v.id for v in store.list_versions("poet")] == [shared]
    # Taken off one persona, it still serves the other.
    store.rollback("pirate", by="a")
    assert status(store, shared) == "serving"
    store.rollback("poet", by="a")
    assert status(store, shared) == "retired"


def test_a_version_serves_only_its_own_persona(store: ChatStore, make_version) -> None:
    pirate = make_version("pirate")
    with pytest.raises(PromotionRefused, match=f"version {pirate} was trained for persona 'pirate', not 'poet'"):
        store.promote(pirate, by="a", persona_id="poet")
    store.promote(pirate, by="a", persona_id="pirate")  # naming its own persona is fine
    assert store.serving_version("poet") is None


def test_unknown_version_is_not_found(store: ChatStore) -> None:
    with pytest.raises(NotFound, match="model version 999 does not exist"):
        store.promote(999, by="a")
    with pytest.raises(NotFound):
        store.get_version(999)


# -- the gate -----------------------------------------------------------------


def test_unevaluated_version_is_refused(store: ChatStore, make_version) -> None:
    version = make_version(gate=None)
    run = store.get_version(version).run_id
    with pytest.raises(PromotionRefused) as refused:
        store.promote(version, by="a")
    assert str(refused.value) == (f"version {version} has not been evaluated: run `persona-studio align evaluate "
                                  f"{run}` first, or promote with --force --reason TEXT")
    assert status(store, version) == "candidate" and store.promotion_log("pirate") == []


def test_failed_gate_is_refused_naming_each_failed_check(store: ChatStore, make_version) -> None:
    version = make_version(gate=FAILED_GATE)
    with pytest.raises(PromotionRefused) as refused:
        store.promote(version, by="a")
    message = str(refused.value)
    assert message.startswith(f"version {version} failed its promotion gate: ")
    assert "win_rate_lower = 0.42 (must be > 0.5)" in message
    assert "length_ratio = n/a (must be within [0.5, 2])" in message
    assert "distinct_2 = 0.18 (must be >= 0.3)" in message
    assert "kl" not in message  # it passed
    assert "--force --reason TEXT" in message
    assert store.serving_version("pirate") is None


def test_reward_model_is_refused_even_when_forced(store: ChatStore, make_version) -> None:
    version = make_version(kind="reward")
    for force in (False, True):
        with pytest.raises(PromotionRefused, match=f"version {version} is a reward model .*not a policy"):
            store.promote(version, by="a", force=force, reason="try")


def test_missing_adapter_folder_is_refused_even_when_forced(store: ChatStore, make_version, tmp_path) -> None:
    version = make_version(on_disk=False)
    with pytest.raises(PromotionRefused, match=f"version {version}'s adapter folder .* does not exist"):
        store.promote(version, by="a", force=True, reason="try")
    not_an_adapter = make_version()
    Path(store.get_version(not_an_adapter).adapter_path, "adapter_config.json").unlink()
    with pytest.raises(PromotionRefused, match="holds no LoRA adapter"):
        store.promote(not_an_adapter, by="a")


def test_bare_base_model_is_refused(store: ChatStore) -> None:
    base = store.get_or_create_model_version(BASE)
    with pytest.raises(PromotionRefused, match="bare base model"):
        store.promote(base, by="a", persona_id="pirate", force=True, reason="x")


def test_force_needs_a_reason_and_is_recorded(store: ChatStore, make_version) -> None:
    failed, unevaluated, fine = make_version(gate=FAILED_GATE), make_version(gate=None), make_version()
    for reason in (None, "   "):
        with pytest.raises(PromotionRefused, match="--force needs --reason TEXT"):
            store.promote(failed, by="a", force=True, reason=reason)
    assert store.promotion_log("pirate") == []

    store.promote(failed, by="carol", force=True, reason="  the CI is 1 point short; users asked  ")
    store.promote(unevaluated, by="carol", force=True, reason="hotfix")
    store.promote(fine, by="carol", force=True, reason="habit")  # nothing to override
    log = store.promotion_log("pirate")
    assert [(e.forced, e.reason) for e in log] == [
        (True, "the CI is 1 point short; users asked"), (True, "hotfix"), (False, "habit")]
    assert log[0].gate == FAILED_GATE and log[1].gate is None and log[2].gate == PASSED_GATE


def test_the_database_refuses_a_forced_row_without_reason(store: ChatStore, make_version) -> None:
    from sqlalchemy.exc import IntegrityError

    from chatbot.store import Promotion

    version = make_version()
    with pytest.raises(IntegrityError), store._sessions.begin() as session:
        session.add(Promotion(persona_id="pirate", version_id=version, action="promote", forced=True, by="x"))
        session.flush()


# -- concurrency ----------------------------------------------------------------


def test_concurrent_promotions_and_rollbacks_keep_one_serving_version(db_url: str, make_version) -> None:
    versions = [make_version() for _ in range(4)]
    stores = [ChatStore.open(db_url) for _ in range(4)]  # separate pools, as separate processes would have
    errors: list[BaseException] = []
    start = threading.Barrier(len(stores))

    def worker(i: int) -> None:
        try:
            start.wait()
            stores[i].promote(versions[i], by=f"w{i}")
            stores[i].rollback("pirate", by=f"w{i}")
            stores[i].promote(versions[i], by=f"w{i}")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in stores:
        s.close()
    # A rollback may find the stack empty only if it ran right after another rollback.
    assert all(isinstance(e, PromotionRefused) for e in errors), errors
    store = ChatStore.open(db_url)
    try:
        log = store.promotion_log("pirate")
        stack: list[int] = []
        for entry in log:  # every rollback took off what was on top when it ran
            if entry.action == "promote":
                stack.append(entry.version_id)
            else:
                assert entry.version_id == stack.pop()
        serving = [v.id for v in store.list_versions("pirate") if v.status == "serving"]
        assert serving == stack[-1:] == [store.serving_version("pirate").id]
    finally:
        store.close()


# -- the CLI ---------------------------------------------------------------------


def models(capsys, db_url: str, *args: str) -> tuple[int, str, str]:
    code = cli.main(["models", *args, "--db-url", db_url])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_promote_list_log_rollback(store: ChatStore, make_version, db_url: str, capsys) -> None:
    v1, v2 = make_version(), make_version()
    reward = make_version(kind="reward", gate=None)

    code, out, err = models(capsys, db_url, "promote", str(v1), "--by", "alice")
    assert (code, err) == (0, "")
    assert f"version {v1} now serves persona pirate" in out

    code, out, _ = models(capsys, db_url, "list", "--persona", "pirate")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["id", "persona", "status", "kind"]
    rows = {int(line.split()[0]): line for line in lines[1:]}
    assert set(rows) == {v1, v2, reward}
    assert "serving" in rows[v1] and "kto" in rows[v1] and "passed" in rows[v1] and "60%" in rows[v1]
    assert "candidate" in rows[v2]
    assert "reward" in rows[reward] and "not evaluated" in rows[reward]

    code, out, _ = models(capsys, db_url, "promote", str(v2), "--by", "alice")
    assert code == 0 and f"(was version {v1})" in out
    code, out, err = models(capsys, db_url, "rollback", "pirate", "--by", "bob")
    assert (code, err) == (0, "")
    assert f"rolled back version {v2}" in out and f"version {v1} serves persona pirate again" in out

    code, out, _ = models(capsys, db_url, "log", "pirate")
    assert code == 0
    assert [line.split()[3:5] for line in out.splitlines()[1:]] == [
        ["promote", str(v1)], ["promote", str(v2)], ["rollback", str(v2)]]
    assert "bob" in out.splitlines()[-1]


def test_cli_refusals_are_one_line_and_exit_1(store: ChatStore, make_version, db_url: str, capsys) -> None:
    failed, reward = make_version(gate=FAILED_GATE), make_version(kind="reward")

    code, out, err = models(capsys, db_url, "promote", str(failed))
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("persona-studio: error: version")
    assert "win_rate_lower = 0.42 (must be > 0.5)" in err

    code, _, err = models(capsys, db_url, "promote", str(failed), "--force")
    assert code == 1 and "--force needs --reason TEXT" in err
    code, _, err = models(capsys, db_url, "promote", str(reward))
    assert code == 1 and "reward model" in err
    code, _, err = models(capsys, db_url, "promote", "999")
    assert (code, err) == (1, "persona-studio: error: model version 999 does not exist\n")
    code, _, err = models(capsys, db_url, "rollback", "poet")
    assert code == 1 and "nothing to roll back" in err
    assert store.promotion_log("pirate") == []

    code, out, err = models(capsys, db_url, "promote", str(failed), "--force", "--reason", "ship it", "--by", "dan")
    assert code == 0 and "forced past its gate" in out
    entry = store.promotion_log("pirate")[0]
    assert (entry.forced, entry.reason, entry.by) == (True, "ship it", "dan")


def test_cli_by_defaults_to_the_os_user(store: ChatStore, make_version, db_url: str, capsys, monkeypatch) -> None:
    monkeypatch.setattr("getpass.getuser", lambda: "osuser")
    version = make_version()
    code, _, _ = models(capsys, db_url, "promote", str(version))
    assert code == 0 and store.promotion_log("pirate")[0].by == "osuser"


def test_cli_list_as_json(store: ChatStore, make_version, db_url: str, capsys) -> None:
    version = make_version()
    code, out, _ = models(capsys, db_url, "list", "--json")
    assert code == 0
    rows = json.loads(out)
    assert rows[0]["id"] == version and rows[0]["run_kind"] == "kto" and rows[0]["gate"] == "passed"
