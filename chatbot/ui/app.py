"""Assembles the tabs into one Gradio Blocks app; each tab is its own module.

Who is asking is resolved per request by an `Identity` (see identity.py):
the signed-in account, or the one local user of an app without accounts.
"""

from __future__ import annotations

import gradio as gr

from ..chat import ChatService
from . import alignment_tab, chat_tab, feedback_tab, personas_tab
from .identity import Identity
from .safe_markdown import literal


def build_app(service: ChatService, identity: Identity | str, board=None) -> gr.Blocks:
    """The app; ``identity`` may be a plain name: everyone is that local user (no accounts).

    ``board``: the Alignment tab's job board (alignment/board.py ``JobBoard``); without one the
    tab says how to get it.
    """
    if isinstance(identity, str):
        identity = Identity.local_as(service.user_id(identity), identity)
    with gr.Blocks(title="Persona Studio") as app:
        with gr.Row():
            gr.Markdown("## Persona Studio")
            signed_in = gr.Markdown(elem_id="signed-in")
        with gr.Tab("Chat", elem_id="chat-tab"):
            chat_tab.create(app, service, identity)
        with gr.Tab("Personas", elem_id="personas-tab"):
            personas_tab.create(app, service, identity)
        with gr.Tab("Feedback", elem_id="feedback-tab") as feedback:
            feedback_tab.create(app, service, identity, feedback)
        with gr.Tab("Alignment", elem_id="alignment-tab") as alignment:
            alignment_tab.create(app, service, board, identity, alignment)

        def on_load(request: gr.Request) -> str:
            if not identity.accounts_enabled:
                return ""
            who = identity.current(request)
            return f"Signed in as **{literal(who.name)}** ({literal(who.role)}) · [Sign out](logout)"

        app.load(on_load, None, signed_in, api_visibility="private")
    # The engine batches concurrent replies (chatbot/batching.py): many may be written at once.
    app.queue(default_concurrency_limit=32)
    return app
