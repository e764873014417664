"""The sidebar of past conversations: search, resume, rename, delete, download as JSON.

Each user sees only their own conversations (ChatService checks ownership on
every call, so a conversation id from elsewhere gets "not found").
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import gradio as gr

from ..chat import MAX_SEARCH_CHARS, ChatError, ChatService
from . import notices
from .identity import Identity


DOWNLOAD_PREFIX = "persona-studio-download-"
DOWNLOAD_KEEP_SECONDS = 3600  # long enough to be fetched; older downloads go at the next one


def write_download(cache_dir: str | Path, name: str, text: str) -> Path:
    """`text` as the file `name`, readable by this process only, in a folder of its own.

    The folder is private (0700) and in Gradio's cache folder, so Gradio serves the
    file from there instead of copying it into a shared, listable folder of its own;
    the file is 0600. Earlier downloads older than DOWNLOAD_KEEP_SECONDS are removed.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    for old in cache_dir.glob(DOWNLOAD_PREFIX + "*"):
        try:
            if time.time() - old.lstat().st_mtime > DOWNLOAD_KEEP_SECONDS:
                shutil.rmtree(old)
        except OSError:
            pass  # gone already, or not ours to remove
    folder = Path(tempfile.mkdtemp(prefix=DOWNLOAD_PREFIX, dir=cache_dir))  # 0700
    path = folder / name
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8") as handle:
        handle.write(text)
    return path


def _label(conversation) -> str:
    when = conversation.updated_at.strftime("%Y-%m-%d %H:%M")
    return f"{conversation.title or '(untitled)'} · {conversation.persona_id} · {when}"


def create(app: gr.Blocks, service: ChatService, identity: Identity, session_state: gr.State,
           show, show_outputs: list) -> dict:
    """Builds the sidebar; returns the keyword arguments of a `.then(...)` that refreshes its list."""
    # Closed at first: on narrower windows an open sidebar covers the chat.
    with gr.Sidebar(label="Conversations", open=False, elem_id="history-sidebar"):
        search = gr.Textbox(placeholder="Search your conversations", show_label=False, elem_id="history-search",
                            max_length=MAX_SEARCH_CHARS)
        listing = gr.Radio([], label="Your conversations, newest first", elem_id="history-list")
        title = gr.Textbox(label="Title", elem_id="history-title")
        with gr.Row():
            rename = gr.Button("Rename", size="sm", elem_id="history-rename")
            delete = gr.Button("Delete", size="sm", variant="stop", elem_id="history-delete")
        download = gr.DownloadButton("Download JSON", size="sm", elem_id="history-download")

    def refresh(query, session, request: gr.Request):
        user = identity.current(request)
        try:
            conversations = service.conversations(user.id, query or "")
        except ChatError as exc:  # a search too long to run
            raise notices.error(str(exc)) from None
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
            title = service.conversation(user.id, session.conversation_id).title
        except ChatError as exc:
            raise notices.error(str(exc)) from None
        return (*show(session, None), title or "")

    listing.input(on_pick, listing, [*show_outputs, title])

    def on_rename(conversation_id, new_title, query, session, request: gr.Request):
        if conversation_id is None:
            raise notices.error("Pick a conversation first.")
        try:
            service.rename(identity.current(request).id, conversation_id, new_title)
        except ChatError as exc:
            raise notices.error(str(exc)) from None
        return refresh(query, session, request)

    rename.click(on_rename, [listing, title, search, session_state], listing)

    def on_delete(conversation_id, query, session, request: gr.Request):
        if conversation_id is None:
            raise notices.error("Pick a conversation first.")
        try:
            service.delete(identity.current(request).id, conversation_id)
        except ChatError as exc:
            raise notices.error(str(exc)) from None
        notices.info("Conversation deleted.")
        return refresh(query, session, request), ""

    delete.click(on_delete, [listing, search, session_state], [listing, title],
                 js="(id, q, s) => { if (!confirm('Delete this conversation for good?')) throw 'cancelled'; "
                    "return [id, q, s]; }")

    def on_download(conversation_id, request: gr.Request):
        if conversation_id is None:
            raise notices.error("Pick a conversation first.")
        try:
            data = service.export_conversation(identity.current(request).id, conversation_id)
        except ChatError as exc:
            raise notices.error(str(exc)) from None
        return str(write_download(download.GRADIO_CACHE, f"conversation-{conversation_id}.json",
                                  json.dumps(data, ensure_ascii=False, indent=2)))

    download.click(on_download, listing, download)
    return refresh_args
