"""Assembles the tabs into one Gradio Blocks app; each tab is its own module."""

from __future__ import annotations

import gradio as gr

from ..chat import ChatService
from . import chat_tab, personas_tab


def build_app(service: ChatService, user: str) -> gr.Blocks:
    with gr.Blocks(title="Persona Studio") as app:
        gr.Markdown("## Persona Studio")
        with gr.Tab("Chat", elem_id="chat-tab"):
            chat_tab.create(app, service, user)
        # Editing personas will be an admin action; for now everyone is the one local user.
        with gr.Tab("Personas", elem_id="personas-tab"):
            personas_tab.create(app, service, user)
    app.queue(default_concurrency_limit=4)
    return app
