"""Accounts keep people apart, proved through the app's own HTTP API.

The real app (what `serve` runs, on real HTTP in this process, answering from
FakeEngine: tests/in_process_app.py) runs with two accounts; each test signs
in as they would (Gradio's /login form) and calls the event handlers the way
the page does: POST /gradio_api/queue/join, then read the result from the
/gradio_api/queue/data event stream. Nothing here trusts the browser: a
script can send any request a page can, so the server must refuse it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from browser_helpers import db_rows
from cli_helpers import run_cli
from in_process_app import running_in_process

REPO = Path(__file__).resolve().parent.parent
ADMIN = ("alice", "alice-password")
USER = ("bob", "bob-password")


def cli(data_dir: Path, *args: str, password: str | None = None) -> subprocess.CompletedProcess:
    return run_cli("users", *args, "--data-dir", str(data_dir), stdin=password)


@dataclass
class Result:
    success: bool
    outputs: dict[int, object]  # component id -> value (or update dict)
    logs: list[tuple[str, str]]  # (level, text) of gr.Info / gr.Warning
    error: str | None


@dataclass
class ApiSession:
    """One browser tab: a signed-in HTTP client with its own Gradio session."""

    url: str
    client: httpx.Client = field(init=False)
    session_hash: str = field(default_factory=lambda: uuid.uuid4().hex)
    config: dict = field(default_factory=dict)
    values: dict[int, object] = field(default_factory=dict)  # what the page shows, by component id

    def __post_init__(self):
        self.client = httpx.Client(base_url=self.url, timeout=120)

    def login(self, name: str, password: str) -> httpx.Response:
        response = self.client.post("/login", data={"username": name, "password": password})
        if response.status_code == 200:
            self.config = self.client.get("/config").json()
            # What the page starts with: each component's initial value.
            self.values = {c["id"]: c["props"]["value"] for c in self.config["components"]
                           if "value" in c.get("props", {})}
        return response

    def component(self, elem_id: str) -> int:
        return next(c["id"] for c in self.config["components"] if c.get("props", {}).get("elem_id") == elem_id)

    def labelled(self, label: str) -> int:
        return next(c["id"] for c in self.config["components"] if c.get("props", {}).get("label") == label)

    def dependency(self, elem_id: str, event: str) -> dict:
        target = [self.component(elem_id), event]
        return next(d for d in self.config["dependencies"] if target in d["targets"])

    def load(self, elem_id: str, query: dict | None = None) -> list[Result]:
        """Run the page-load events that fill `elem_id`, as the page does on opening (`query`: ?k=v)."""
        cid = self.component(elem_id)
        page = self.config["layout"]["id"]  # the Blocks' own id: not 0 when another app was built in this process
        return [self.call(d, [self.values.get(i) for i in d["inputs"]], query=query)
                for d in self.config["dependencies"] if [page, "load"] in d["targets"] and cid in d["outputs"]]

    def trigger(self, elem_id: str, event: str, event_data: dict | None = None, **overrides) -> Result:
        """Fire `event` on `elem_id` with the page's current values (overrides by elem_id)."""
        dep = self.dependency(elem_id, event)
        by_id = {self.component(k.replace("_", "-")): v for k, v in overrides.items()}
        return self.call(dep, [by_id.get(i, self.values.get(i)) for i in dep["inputs"]], event_data)

    def call(self, dep: dict, data: list | None = None, event_data: dict | None = None,
             query: dict | None = None) -> Result:
        joined = self.client.post("/gradio_api/queue/join", params=query, json={
            "data": data or [], "fn_index": dep["id"], "trigger_id": dep["targets"][0][0],
            "session_hash": self.session_hash, "event_data": event_data})
        assert joined.status_code == 200, joined.text
        logs, done = [], None
        with self.client.stream("GET", "/gradio_api/queue/data",
                                params={"session_hash": self.session_hash}) as stream:
            for line in stream.iter_lines():
                if not line.startswith("data:"):
                    continue
                message = json.loads(line[5:])
                if message.get("msg") == "log":
                    logs.append((message["level"], message["log"]))
                elif message.get("msg") == "process_completed":
                    done = message
                    break
        assert done is not None, "the event stream ended without a result"
        output = done.get("output") or {}
        outputs = dict(zip(dep["outputs"], output.get("data") or [], strict=False))
        for cid, value in outputs.items():
            if isinstance(value, dict) and value.get("__type__") == "update":
                if "value" in value:
                    self.values[cid] = value["value"]
            elif value is not None:
                self.values[cid] = value
        return Result(bool(done.get("success")), outputs, logs, output.get("error"))


@pytest.fixture
def data_dir(tmp_path):
    """A data directory without the model (the app here answers from FakeEngine)."""
    folder = tmp_path / "data"
    folder.mkdir()
    return folder


@pytest.fixture
def app_with_accounts(data_dir, tmp_path):
    """The app over a copy of the shipped personas, with an admin and a user account."""
    personas = tmp_path / "personas"
    shutil.copytree(REPO / "personas", personas)
    for (name, password), role in ((ADMIN, "admin"), (USER, "user")):
        done = cli(data_dir, "add", name, "--role", role, "--password-stdin", password=password + "\n")
        assert done.returncode == 0, done.stderr
    with running_in_process(data_dir, personas) as running:
        assert running.identity.accounts_enabled  # what `serve` prints as "accounts enabled: sign in at URL"
        yield running.url, personas


def test_signing_in_is_required_and_checked(app_with_accounts, data_dir):
    url, _ = app_with_accounts
    anonymous = httpx.Client(base_url=url, timeout=60)
    assert anonymous.get("/config").status_code == 401
    assert anonymous.post("/gradio_api/queue/join", json={"data": [], "fn_index": 0,
                                                          "session_hash": "x"}).status_code == 401
    for name, password in (("alice", "wrong-password"), ("mallory", "alice-password"), ("alice", "")):
        response = ApiSession(url).login(name, password)
        assert response.status_code in (400, 422), (name, password)  # 422: the form lacks a field
        assert "access-token" not in response.headers.get("set-cookie", "")

    bob = ApiSession(url)
    assert bob.login(*USER).status_code == 200
    assert bob.config["username"] == "bob"
    assert all(r.success for r in bob.load("persona-select"))

    # Removing an account ends a session that is already signed in: its next request is signed out.
    done = cli(data_dir, "remove", "bob")
    assert done.returncode == 0, done.stderr
    dep = bob.dependency("persona-reload", "click")
    refused = bob.client.post("/gradio_api/queue/join", json={
        "data": [], "fn_index": dep["id"], "trigger_id": dep["targets"][0][0], "session_hash": bob.session_hash})
    assert refused.status_code == 401
    assert bob.client.get("/config").status_code == 401
    assert ApiSession(url).login(*USER).status_code == 400


def test_only_admins_can_write_personas_through_the_api(app_with_accounts):
    url, personas = app_with_accounts
    pirate = personas / "pirate.yaml"
    original = pirate.read_text()

    bob = ApiSession(url)
    assert bob.login(*USER).status_code == 200
    rights = bob.load("persona-rights")
    assert [r.outputs[bob.component("persona-save")] for r in rights] == [
        {"__type__": "update", "interactive": False}]
    bob.load("persona-select")
    assert bob.trigger("persona-select", "select", persona_select="pirate").success
    # Reading is allowed (the code box drops the final newline).
    assert bob.values[bob.component("persona-raw")] == original.rstrip("\n")

    attempts = {
        "save": bob.trigger("persona-save", "click", persona_name="Captain Bob"),
        "save raw": bob.trigger("persona-save-raw", "click", persona_raw=original + "# bob was here\n"),
        "new": bob.trigger("persona-new", "click", persona_new_id="bobs_bot"),
        "duplicate": bob.trigger("persona-duplicate", "click", persona_new_id="bobs_copy"),
        "delete": bob.trigger("persona-delete", "click", persona_select="pirate"),
    }
    for action, result in attempts.items():
        assert ("warning", "Only admins can edit personas.") in result.logs, action
    assert pirate.read_text() == original
    assert sorted(p.name for p in personas.iterdir()) == sorted(p.name for p in (REPO / "personas").iterdir())

    alice = ApiSession(url)
    assert alice.login(*ADMIN).status_code == 200
    rights = alice.load("persona-rights")
    assert rights[0].outputs[alice.component("persona-save")] == {"__type__": "update", "interactive": True}
    alice.load("persona-select")
    assert alice.trigger("persona-select", "select", persona_select="pirate").success
    saved = alice.trigger("persona-save-raw", "click", persona_raw=original + "# edited by alice\n")
    assert saved.success and not [log for log in saved.logs if log[0] == "warning"], saved.logs
    assert pirate.read_text() == original + "# edited by alice\n"


def test_only_admins_can_see_and_run_alignment_jobs_through_the_api(app_with_accounts, data_dir):
    """Every Alignment tab action asks for the admin role on the server: a user calling the
    Gradio API directly gets the refusal and no job is queued; an admin's start queues one."""
    url, _ = app_with_accounts
    refusal = r"**Only admins can run alignment jobs\.**"  # literal(): Markdown escaped
    notice = "alignment-notice"
    bob = ApiSession(url)
    assert bob.login(*USER).status_code == 200
    attempts = {
        "open": bob.trigger("alignment-tab", "select"),
        "data": bob.trigger("alignment-refresh", "click", alignment_persona="pirate"),
        "recipe": bob.trigger("alignment-recipe", "change", alignment_recipe="kto_cpu.yaml"),
        "start": bob.trigger("alignment-start", "click", alignment_persona="pirate", alignment_recipe="kto_cpu.yaml",
                             alignment_recipe_text="min_rows: 1\n", alignment_part="policy"),
        "watch": bob.trigger("alignment-job", "change", alignment_job=1),
        "cancel": bob.trigger("alignment-cancel", "click", alignment_job=1, alignment_persona="pirate"),
        "resume": bob.trigger("alignment-resume", "click", alignment_job=1, alignment_persona="pirate"),
    }
    for action, result in attempts.items():
        assert result.success and result.outputs[bob.component(notice)] == refusal, action
    assert attempts["data"].outputs[bob.component("alignment-data")] == ""  # nothing about the feedback leaks
    assert db_rows(data_dir, "select count(*) from jobs") == [(0,)]

    alice = ApiSession(url)
    assert alice.login(*ADMIN).status_code == 200
    opened = alice.trigger("alignment-tab", "select")
    assert opened.outputs[alice.component(notice)] == ""
    data = alice.trigger("alignment-refresh", "click", alignment_persona="pirate")
    assert "Same-context pairs: **0**" in data.outputs[alice.component("alignment-data")]
    readiness = data.outputs[alice.component("alignment-readiness")]["data"]
    assert ["kto_cpu.yaml", "not yet"] == readiness[[r[0] for r in readiness].index("kto_cpu.yaml")][:2]
    refused = alice.trigger("alignment-start", "click", alignment_persona="pirate", alignment_recipe="kto_cpu.yaml",
                            alignment_recipe_text="learning_rate: fast\n", alignment_part="policy")
    from chatbot.ui.safe_markdown import literal

    # The recipe loader's own refusal, as the CLI gives it.
    expected = literal("kto_cpu.yaml: learning_rate must be a number, not 'fast'")
    assert refused.outputs[alice.component(notice)] == f"**{expected}**"
    assert db_rows(data_dir, "select count(*) from jobs") == [(0,)]


def test_one_user_cannot_read_or_vote_on_anothers_messages(app_with_accounts, data_dir):
    url, _ = app_with_accounts
    secret = "The treasure is under the old oak"

    alice = ApiSession(url)  # an admin: the one with more rights must still be safe from bob
    assert alice.login(*ADMIN).status_code == 200
    opened = alice.load("chatbot")
    assert opened and all(r.success for r in opened), [r.error for r in opened]
    alice.values[alice.labelled("max_new_tokens")] = 3
    assert alice.trigger("message", "submit", message=secret).success
    liked = alice.trigger("chatbot", "like", event_data={"index": 2, "value": "", "liked": True})
    assert liked.success, liked.error
    [(conversation, owner)] = db_rows(data_dir, "select c.id, u.name from conversations c "
                                                "join users u on u.id = c.user_id")
    assert owner == "alice"
    alices_messages = {m for (m,) in db_rows(data_dir, "select id from messages where conversation_id = ?",
                                              conversation)}
    votes_before = db_rows(data_dir, "select message_id, user_id, rating from feedback order by id")
    assert len(votes_before) == 1

    # The link mechanism works for its owner (so bob's refusals below are not vacuous).
    again = ApiSession(url)
    assert again.login(*ADMIN).status_code == 200
    again.load("chatbot", query={"conversation": str(conversation)})
    assert secret in json.dumps(again.values[again.component("chatbot")])

    bob = ApiSession(url)
    assert bob.login(*USER).status_code == 200
    seen = [bob.load("chatbot", query={"conversation": str(conversation)}),  # a link to alice's chat
            bob.load("history-list")]
    assert ("warning", f"conversation {conversation} not found") in seen[0][0].logs  # and a new chat instead
    # Not in bob's sidebar, so it cannot be picked or downloaded from there either.
    picked = bob.trigger("history-list", "input", history_list=conversation)
    downloaded = bob.trigger("history-download", "click", history_list=conversation)
    assert not picked.success and not downloaded.success
    everything_bob_got = json.dumps([r.outputs for results in seen for r in results] +
                                    [picked.outputs, downloaded.outputs, bob.values], default=str)
    assert secret not in everything_bob_got

    # Bob's thumbs land on his own chat, whatever index he sends.
    for index in (0, 1, 2, 3):
        bob.trigger("chatbot", "like", event_data={"index": index, "value": "", "liked": False})
    # Even with alice's session id, bob's requests are his and refused there.
    hijack = ApiSession(url)
    assert hijack.login(*USER).status_code == 200
    hijack.session_hash = alice.session_hash
    stolen = hijack.trigger("chatbot", "like", event_data={"index": 2, "value": "", "liked": False})
    assert not stolen.success and "belongs to another sign-in" in stolen.error
    assert secret not in json.dumps(stolen.outputs, default=str)

    votes = db_rows(data_dir, "select f.message_id, u.name, f.rating from feedback f "
                              "join users u on u.id = f.user_id order by f.id")
    assert [v for v in votes if v[0] in alices_messages] == [(votes_before[0][0], "alice", 1)]
    assert [v[1:] for v in votes if v[0] not in alices_messages] == [("bob", -1)]  # on his own greeting
