"""The UI reads conversations and feedback through ChatService, with its access checks.

The Feedback tab and the history sidebar's handlers, called as Gradio calls
them (the request says who is asking), on FakeEngine: no browser, no model.
"""

from __future__ import annotations

import types

import gradio as gr
import pytest

from chatbot.chat import ChatError, params_for
from chatbot.store.accounts import AccountStore
from chatbot.ui import build_app
from chatbot.ui.identity import Identity


def handler(app: gr.Blocks, module: str, name: str):
    """The function named ``name`` that chatbot/ui/<module>.py wired to an event of ``app``."""
    found = {f.fn for f in app.fns.values()
             if f.fn.__module__ == f"chatbot.ui.{module}" and f.fn.__name__ == name}
    assert len(found) == 1, (module, name, found)
    return found.pop()


def as_user(name: str):
    """What Gradio hands a handler for a signed-in request."""
    return types.SimpleNamespace(username=name, query_params={})


def chatted(service, user_id: int, name: str):
    """A conversation of ``user_id``'s with one reply, liked with a comment."""
    session = service.new_session(user_id, "pirate", name)
    list(service.send(session, "Where be the gold?", params_for(session.persona, seed=1)))
    service.vote(session, 2, 1, comment="arr")
    return session


def test_the_service_checks_who_may_read_a_conversation_and_all_feedback(fake_service):
    ann, bob = fake_service.user_id("ann"), fake_service.user_id("bob")
    session = chatted(fake_service, ann, "ann")
    assert fake_service.conversation(ann, session.conversation_id).title == "Where be the gold?"
    with pytest.raises(ChatError, match=f"^conversation {session.conversation_id} not found$"):
        fake_service.conversation(bob, session.conversation_id)  # someone else's looks like a missing one
    assert fake_service.conversation(bob, session.conversation_id, as_admin=True).user_id == ann
    with pytest.raises(ChatError, match="not found"):
        fake_service.conversation(ann, 10**9)
    with pytest.raises(ChatError, match="only admins"):
        fake_service.all_feedback(as_admin=False)
    [vote] = fake_service.all_feedback(as_admin=True)
    assert (vote.user_name, vote.feedback.comment) == ("ann", "arr")


def test_without_accounts_the_local_user_sees_the_feedback_and_reopens_a_conversation(fake_service):
    app = build_app(fake_service, "Ann")  # everyone is the local user Ann, with every right
    session = chatted(fake_service, fake_service.user_id("Ann"), "Ann")
    summary, *_, comments = handler(app, "feedback_tab", "load")(None)
    assert summary == "1 current votes on 1 replies." and "“arr”" in comments
    *_, title = handler(app, "history_sidebar", "on_pick")(session.conversation_id, None)
    assert title == "Where be the gold?"


def test_with_accounts_only_admins_see_the_feedback_and_only_owners_reopen_from_the_sidebar(fake_service, store):
    accounts = AccountStore(store.engine)
    alice = accounts.add_user("alice", "alice-password-1", role="admin")
    accounts.add_user("bob", "bob-password-1")
    app = build_app(fake_service, Identity.with_accounts(store))
    session = chatted(fake_service, alice.id, "alice")
    load = handler(app, "feedback_tab", "load")
    assert load(as_user("alice"))[0] == "1 current votes on 1 replies."
    refused, _, _, table, comments = load(as_user("bob"))
    assert refused == "Only admins can see everyone's feedback." and table == [] and comments == ""
    pick = handler(app, "history_sidebar", "on_pick")
    *_, title = pick(session.conversation_id, as_user("alice"))
    assert title == "Where be the gold?"
    with pytest.raises(gr.Error, match=f"conversation {session.conversation_id} not found"):
        pick(session.conversation_id, as_user("bob"))
