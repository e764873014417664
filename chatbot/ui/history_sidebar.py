"""The sidebar of past conversations: search, resume, rename, delete, download as JSON.

Each user sees only their own conversations (ChatService checks ownership on
every call, so a conversation id from elsewhere gets "not found").
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import gradio as gr

from ..chat import ChatError, ChatService
from .identity import Identity


def _label(conversation) -> str:
    when = conversation.updated_at.strftime("%Y-%m-%d %H:%M")
    return f"{conversation.title or '(untitled)'} · {conversation.persona_id} · {when}"


def create(app: gr.Blocks, service: ChatService, identity: Identity, session_state: gr.State,
           show, show_outputs: list) -> dict:
    """Builds the sidebar; returns the keyword arguments of a `.then(...)` that refreshes its list."""
    # Closed at first: on narrower windows an open sidebar covers the chat.
    with gr.Sidebar(label="Conversations", open=False, elem_id="history-sidebar"):
        search = gr.Textbox(placeholder="Search your conversations", show_label=False, elem_id="history-search")
        listing = gr.Radio([], label="Your conversations, newest first", elem_id="history-list")
        title = gr.Textbox(label="Title", elem_id="history-title")
        with gr.Row():
            rename = gr.Button("Rename", size="sm", elem_id="history-rename")
            delete = gr.Button("Delete", size="sm", variant="stop", elem_id="history-delete")
        download = gr.DownloadButton("Download JSON", size="sm", elem_id="history-download")

    def refresh(query, session, request: gr.Request):
        user = identity.current(request)
        conversations = service.conversations(user.id, query or "")
        current = session.conversation_id if session is not None else None
        ids = [c.id for c in conversations]
        return gr.Radio(choices=[(_label(c), c.id) for c in conversations],
                        value=current if current in ids else None)

    refresh_args = dict(fn=refresh, inputs=[search, session_state], outputs=listing)
    app.load(**refresh_args)
    search.change(**refresh_args)

    def on_pick(conversation_id, request: gr.Request):
        user = identity.current(request)
        try:
            session = service.resume(user.id, conversation_id, user.name)
        except ChatError as exc:
            raise gr.Error(str(exc)) from None
        conversation = service.store.get_conversation(session.conversation_id)
        return (*show(session, None), conversation.title or "")

    listing.input(on_pick, listing, [*show_outputs, title])

    def on_rename(conversation_id, new_title, query, session, request: gr.Request):
        if conversation_id is None:
            raise gr.Error("Pick a conversation first.")
        try:
            service.rename(identity.current(request).id, conversation_id, new_title)
        except ChatError as exc:
            raise gr.Error(str(exc)) from None
        return refresh(query, session, request)

    rename.click(on_rename, [listing, title, search, session_state], listing)

    def on_delete(conversation_id, query, session, request: gr.Request):
        if conversation_id is None:
            raise gr.Error("Pick a conversation first.")
        try:
            service.delete(identity.current(request).id, conversation_id)
        except ChatError as exc:
            raise gr.Error(str(exc)) from None
        gr.Info("Conversation deleted.")
        return refresh(query, session, request), ""

    delete.click(on_delete, [listing, search, session_state], [listing, title],
                 js="(id, q, s) => { if (!confirm('Delete this conversation for good?')) throw 'cancelled'; "
                    "return [id, q, s]; }")

    def on_download(conversation_id, request: gr.Request):
        if conversation_id is None:
            raise gr.Error("Pick a conversation first.")
        try:
            data = service.export_conversation(identity.current(request).id, conversation_id)
        except ChatError as exc:
            raise gr.Error(str(exc)) from None
        # Gradio serves the file from its cache; a fresh temporary folder keeps users' files apart.
        path = Path(tempfile.mkdtemp(prefix="persona-studio-")) / f"conversation-{conversation_id}.json"
        path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
        return str(path)

    download.click(on_download, listing, download)
    return refresh_args
