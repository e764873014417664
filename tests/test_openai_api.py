"""The OpenAI-compatible API (/v1), used as its users would: the official `openai` client against the real app.

The app is what `serve` runs, on real HTTP in this process (tests/in_process_app.py),
answering from FakeEngine: what the API says is checked against what the SQLite
file holds (through ChatStore), whatever the model would have said. (The real
model's replies: test_engine.py, test_engine_contract.py; `python app.py`: test_cli.py.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import openai
import pytest
from browser_helpers import wait_until
from fake_engine import FakeEngine
from in_process_app import running_in_process

from chatbot import default_model
from chatbot.personas import PersonaLibrary, render
from chatbot.store import ChatStore
from chatbot.store.accounts import AccountStore

REPO = Path(__file__).resolve().parent.parent
PERSONAS = PersonaLibrary(REPO / "personas")
GREEDY = {"temperature": 0, "max_tokens": 8}


def client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "v1", api_key=key, max_retries=0, timeout=120)


def open_store(data_dir: Path) -> ChatStore:
    return ChatStore.open(f"sqlite:///{data_dir / 'chat.db'}")


def system_prompt(persona_id: str, user: str = "User") -> str:
    return render(PERSONAS.get(persona_id), user).system_prompt


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """One app without accounts for the module: everyone is the local user `User`.

    (url, data directory, the FakeEngine it answers with: its model id is the bundled model's.)
    """
    folder = tmp_path_factory.mktemp("openai")
    data = folder / "data"
    with pytest.MonkeyPatch.context() as env:  # what conftest's per-test isolation does, for the whole module
        for key in [k for k in os.environ if k.startswith("PERSONA_STUDIO_")]:
            env.delenv(key)
        env.setenv("XDG_DATA_HOME", str(folder / "xdg"))
        env.setenv("GRADIO_ANALYTICS_ENABLED", "False")
        with running_in_process(data, engine=FakeEngine(model_id=default_model.MODEL_ID)) as running:
            yield running.url, data, running.engine
    log = running.errors.text()
    assert "Traceback" not in log and "ERROR" not in log, log  # bad requests are answered, never crash a handler


@pytest.fixture
def store(app):
    chat_store = open_store(app[1])
    yield chat_store
    chat_store.close()


def test_the_models_are_the_personas(app):
    models = client(app[0]).models.list()
    assert [m.id for m in models.data] == PERSONAS.ids()
    assert {(m.object, m.created, m.owned_by) for m in models.data} == {("model", 0, "persona-studio")}
    assert client(app[0]).models.retrieve("pirate").id == "pirate"


def test_a_reply_as_the_persona_is_stored_with_its_provenance(app, store):
    completion = client(app[0]).chat.completions.create(
        model="pirate", messages=[{"role": "system", "content": "You are a calculator."},
                                  {"role": "user", "content": "Where is the treasure?"}], **GREEDY)
    text = completion.choices[0].message.content
    assert completion.object == "chat.completion" and completion.model == "pirate"
    assert completion.choices[0].finish_reason in ("stop", "length") and text
    assert completion.id == f"chatcmpl-{completion.message_id}"

    reply = store.get_message(completion.message_id)
    assert (reply.role, reply.content, reply.conversation_id) == ("assistant", text, completion.conversation_id)
    assert (reply.prompt_tokens, reply.completion_tokens) == (completion.usage.prompt_tokens,
                                                              completion.usage.completion_tokens)
    assert completion.usage.total_tokens == reply.prompt_tokens + reply.completion_tokens
    # The persona's system prompt, not the client's; its examples; the greeting; the message.
    assert reply.prompt[0] == {"role": "system", "content": system_prompt("pirate")}
    assert "calculator" not in json.dumps(reply.prompt)
    assert reply.prompt[-1]["content"].startswith("Where is the treasure?")
    assert (reply.generation_params["temperature"], reply.generation_params["max_new_tokens"]) == (0, 8)
    version = store.get_version(reply.model_version_id)
    assert (version.base_model, version.adapter_path) == (default_model.MODEL_ID, None)
    conversation = store.get_conversation(completion.conversation_id)
    assert conversation.persona_id == "pirate" and conversation.user_id == store.get_or_create_user("User")
    roles = [(m.role, m.finish_reason) for m in store.conversation_messages(conversation.id)]
    assert roles == [("assistant", "greeting"), ("user", None), ("assistant", reply.finish_reason)]


def test_a_streamed_reply_is_the_same_reply_and_is_stored(app, store):
    messages = [{"role": "user", "content": "Tell me about your ship."}]
    whole = client(app[0]).chat.completions.create(model="pirate", messages=messages, **GREEDY)
    chunks = list(client(app[0]).chat.completions.create(
        model="pirate", messages=messages, stream=True, stream_options={"include_usage": True}, **GREEDY))
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content  # greedy: the same reply either way
    finished = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finished) == 1 and finished[0].choices[0].finish_reason == whole.choices[0].finish_reason
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == whole.usage.completion_tokens
    message_id = finished[0].message_id
    assert usage.message_id == message_id and finished[0].id == f"chatcmpl-{message_id}"
    assert {c.conversation_id for c in chunks} == {finished[0].conversation_id}
    assert finished[0].conversation_id != whole.conversation_id  # each request without one starts a new one
    reply = store.get_message(message_id)
    assert reply.content == text and reply.prompt[0]["content"] == system_prompt("pirate")
    assert reply.model_version_id == store.get_message(whole.message_id).model_version_id


def test_the_history_sent_starts_the_conversation_and_conversation_id_continues_it(app, store):
    api = client(app[0])
    history = [{"role": "system", "content": "ignored"},
               {"role": "assistant", "content": "Ahoy from the client!"},
               {"role": "user", "content": "What is your name?"},
               {"role": "assistant", "content": "Captain Redbeard."},
               {"role": "user", "content": [{"type": "text", "text": "And your ship?"}]}]
    first = api.chat.completions.create(model="pirate", messages=history, **GREEDY)
    stored = store.conversation_messages(first.conversation_id)
    assert [(m.role, m.content) for m in stored] == [
        ("assistant", "Ahoy from the client!"), ("user", "What is your name?"),
        ("assistant", "Captain Redbeard."), ("user", "And your ship?"),
        ("assistant", first.choices[0].message.content)]
    assert [m.parent_id for m in stored] == [None] + [m.id for m in stored[:-1]]  # one branch
    prompt = stored[-1].prompt
    assert prompt[0]["content"] == system_prompt("pirate")
    assert [(m["role"], m["content"]) for m in prompt[-4:-1]] == [(m.role, m.content) for m in stored[:3]]
    assert prompt[-1]["content"].startswith("And your ship?")  # (with any post-history instructions)

    # Continuing: the last message is the new one; the rest of the request is not read.
    second = api.chat.completions.create(
        model="pirate", messages=[{"role": "user", "content": "not stored"},
                                  {"role": "user", "content": "Where do we sail?"}],
        extra_body={"conversation_id": first.conversation_id}, **GREEDY)
    assert second.conversation_id == first.conversation_id
    stored = store.conversation_messages(first.conversation_id)
    assert [(m.role, m.content) for m in stored[-2:]] == [
        ("user", "Where do we sail?"), ("assistant", second.choices[0].message.content)]
    assert stored[-2].parent_id == first.message_id and "not stored" not in json.dumps([m.content for m in stored])
    assert [m["content"] for m in stored[-1].prompt[-6:-1]] == [m.content for m in stored[:5]]
    assert stored[-1].prompt[-1]["content"].startswith("Where do we sail?")


def test_feedback_by_message_id_is_the_callers_vote(app, store):
    api = client(app[0])
    completion = api.chat.completions.create(model="assistant", messages=[{"role": "user", "content": "Hi"}],
                                             **GREEDY)
    user_id = store.get_or_create_user("User")
    voted = api.post("/feedback", body={"message_id": completion.message_id, "rating": "up"}, cast_to=object)
    assert voted == {"object": "feedback", "message_id": completion.message_id, "rating": 1}
    assert store.get_feedback(completion.message_id, user_id) == 1
    api.post("/feedback", body={"message_id": completion.message_id, "rating": -1, "reason": "too long"},
             cast_to=object)
    [row] = [r for r in store.feedback_rows() if r.message.id == completion.message_id]
    assert (row.feedback.rating, row.feedback.reason, row.user_name) == (-1, "too long", "User")

    user_message = store.get_message(completion.message_id).parent_id
    for body, status, problem in [
            ({"message_id": user_message, "rating": 1}, 404, f"message {user_message} not found"),
            ({"message_id": 10**9, "rating": 1}, 404, f"message {10**9} not found"),
            ({"message_id": completion.message_id, "rating": 0}, 400, "rating: must be 1"),
            ({"message_id": "one", "rating": 1}, 400, "message_id: Input should be a valid integer")]:
        with pytest.raises(openai.APIStatusError) as refused:
            api.post("/feedback", body=body, cast_to=object)
        assert refused.value.status_code == status and problem in refused.value.message, body
    assert store.get_feedback(completion.message_id, user_id) == -1


@pytest.mark.parametrize("request_body, status, problem", [
    ({"model": "nobody", "messages": [{"role": "user", "content": "Hi"}]}, 404, "unknown persona 'nobody'"),
    ({"model": "pirate", "messages": []}, 400, "messages: must hold at least one message"),
    ({"model": "pirate", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Arr"}]},
     400, "messages[1]: the last message must be from the user, not the assistant"),
    ({"model": "pirate", "messages": [{"role": "system", "content": "only this"}]}, 400, "there is no user message"),
    ({"model": "pirate", "messages": [{"role": "user", "content": "  "}]}, 400, "messages[0]: the user message is empty"),
    ({"model": "pirate", "messages": [{"role": "tool", "content": "Hi"}]}, 400, "messages[0].role: Input should be"),
    ({"model": "pirate", "messages": [{"role": "user"}]}, 400, "messages[0]: the user message is empty"),
    ({"model": "pirate", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "only text content is supported"),
    ({"model": "pirate", "messages": "Hi"}, 400, "messages: Input should be a valid list"),
    ({"messages": [{"role": "user", "content": "Hi"}]}, 400, "model: Field required"),
    ({"model": "pirate", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": "8"}, 400,
     "max_tokens: Input should be a valid integer"),
    ({"model": "pirate", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 0}, 400,
     "max_tokens: Input should be greater than or equal to 1"),
    ({"model": "pirate", "messages": [{"role": "user", "content": "Hi"}], "temperature": 3}, 400,
     "temperature: Input should be less than or equal to 2"),
    ({"model": "pirate", "messages": [{"role": "user", "content": "Hi"}], "temperature": "hot"}, 400,
     "temperature: Input should be a valid number"),
    ({"model": "pirate", "messages": [{"role": "user", "content": "Hi"}], "n": 2}, 400, "n: only 1 choice"),
    ({"model": "pirate", "messages": [{"role": "user", "content": "Hi"}], "conversation_id": 10**9}, 404,
     f"conversation {10**9} not found"),
    ({"model": "pirate", "messages": [{"role": "user", "content": "word " * 20_000}]}, 400, "the message is too long"),
    ({"model": "pirate", "messages": [{"role": "user", "content": "x" * (1 << 20)}]}, 413,
     "the request body is larger than 1024 KiB"),
], ids=["unknown persona", "no messages", "last from the assistant", "only system", "empty", "tool role",
        "no content", "image", "messages not a list", "no model", "max_tokens a string", "max_tokens 0",
        "temperature too high", "temperature a string", "n 2", "unknown conversation", "prompt too long",
        "huge body"])
def test_bad_requests_get_a_clear_4xx_and_the_server_keeps_serving(app, request_body, status, problem):
    api = client(app[0])
    with pytest.raises(openai.APIStatusError) as refused:  # sent as is: the typed method would refuse some first
        api.post("/chat/completions", body=request_body, cast_to=object)
    error = refused.value
    assert error.status_code == status
    assert problem in error.body["message"] and "\n" not in error.body["message"]
    assert error.body["type"] == "invalid_request_error"
    assert api.models.list().data  # still serving


def test_malformed_json_is_a_400_and_the_server_keeps_serving(app):
    for raw, problem in ((b"{not json", "not valid JSON"), (b"[1, 2]", "must be a JSON object"),
                         (b"[" * 100_000, "not valid JSON")):
        response = httpx.post(app[0] + "v1/chat/completions", content=raw, timeout=60,
                              headers={"Content-Type": "application/json"})
        assert response.status_code == 400 and problem in response.json()["error"]["message"]
    ok = client(app[0]).chat.completions.create(model="pirate", messages=[{"role": "user", "content": "Hi"}],
                                                **GREEDY)
    assert ok.choices[0].message.content


def test_other_routes_under_v1_are_an_api_404_not_the_web_page(app):
    for method, path in (("POST", "v1/embeddings"), ("GET", "v1/chat/completions"), ("POST", "v1/models")):
        response = httpx.request(method, app[0] + path, json={}, timeout=60)
        assert response.status_code == 404, path
        assert response.json()["error"]["message"].startswith(f"no route {method} /{path}")


@pytest.fixture
def long_slow_reply(app):
    """The next reply runs to max_tokens (400) unless stopped, a token every 50 ms: time to hang up."""
    engine = app[2]
    engine.queue("word " * 400)
    engine.delay = 0.05
    yield
    engine.delay = 0.0


def test_a_client_that_hangs_up_stops_its_reply(app, store, long_slow_reply):
    with httpx.stream("POST", app[0] + "v1/chat/completions", timeout=120, json={
            "model": "pirate", "messages": [{"role": "user", "content": "Tell me a very long tale of the sea."}],
            "max_tokens": 400, "temperature": 0, "stream": True}) as response:
        events = []
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
            if len(events) == 3:
                break
    conversation_id = events[0]["conversation_id"]

    def stored_reply():
        replies = [m for m in store.conversation_messages(conversation_id) if m.role == "assistant"][1:]
        return replies[0] if replies else None

    reply = wait_until(stored_reply, timeout=60, what="the stopped reply to be stored")
    assert reply.finish_reason == "stopped" and reply.completion_tokens < 400


# -- with accounts -----------------------------------------------------------------


@pytest.fixture
def data_dir(tmp_path):
    """A data directory without the model (the app here answers from FakeEngine)."""
    folder = tmp_path / "data"
    folder.mkdir()
    return folder


@pytest.fixture
def app_with_accounts(data_dir):
    """Two accounts, each with an API key, made before the app starts."""
    store = open_store(data_dir)
    try:
        accounts = AccountStore(store.engine)
        keys = {}
        for name in ("alice", "bob"):
            accounts.add_user(name, f"{name}-password")
            keys[name] = accounts.create_api_key(name)
    finally:
        store.close()
    with running_in_process(data_dir) as running:
        yield running.url, keys


def test_with_accounts_a_key_is_required_and_reaches_only_its_own_account(app_with_accounts, data_dir):
    url, keys = app_with_accounts
    message = [{"role": "user", "content": "Hello"}]
    for path, method in (("v1/models", "GET"), ("v1/chat/completions", "POST"), ("v1/feedback", "POST")):
        response = httpx.request(method, url + path, json={"model": "pirate", "messages": message}, timeout=60)
        assert response.status_code == 401, path
        assert "an API key is required" in response.json()["error"]["message"]
    for wrong in ("wrong-key", keys["alice"] + "x"):
        with pytest.raises(openai.AuthenticationError, match="invalid API key"):
            client(url, wrong).chat.completions.create(model="pirate", messages=message, **GREEDY)

    alice, bob = client(url, keys["alice"]), client(url, keys["bob"])
    assert [m.id for m in alice.models.list().data] == PERSONAS.ids()
    hers = alice.chat.completions.create(model="pirate", messages=message, **GREEDY)
    with pytest.raises(openai.NotFoundError, match=f"conversation {hers.conversation_id} not found"):
        bob.chat.completions.create(model="pirate", messages=message, extra_body={
            "conversation_id": hers.conversation_id}, **GREEDY)
    with pytest.raises(openai.NotFoundError, match=f"message {hers.message_id} not found"):
        bob.post("/feedback", body={"message_id": hers.message_id, "rating": "down"}, cast_to=object)
    alice.post("/feedback", body={"message_id": hers.message_id, "rating": "up"}, cast_to=object)
    his = bob.chat.completions.create(model="pirate", messages=message, **GREEDY)

    store = open_store(data_dir)
    try:
        accounts = AccountStore(store.engine)
        alice_id, bob_id = accounts.get("alice").id, accounts.get("bob").id
        assert store.get_conversation(hers.conversation_id).user_id == alice_id
        assert store.get_conversation(his.conversation_id).user_id == bob_id
        assert len(store.conversation_messages(hers.conversation_id)) == 3  # nothing of bob's was added
        assert (store.get_feedback(hers.message_id, alice_id), store.get_feedback(hers.message_id, bob_id)) == (1, None)
        assert store.get_message(hers.message_id).prompt[0]["content"] == system_prompt("pirate", "alice")
        accounts.remove_user("bob")  # a removed account's key stops working at once
    finally:
        store.close()
    with pytest.raises(openai.AuthenticationError):
        bob.models.list()
    assert alice.models.list().data
