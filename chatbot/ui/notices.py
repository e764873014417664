"""Toasts (gr.Error, gr.Warning, gr.Info) whose message shows as text.

Gradio renders a toast's message as HTML. The messages here carry what people
and files gave: an id typed into a form, a value from a persona file (one
imported from a card, say) that the validator quotes back. So each is escaped
first; otherwise ``<img src=x onerror=...>`` there would run in the page of
whoever is shown the refusal. Every toast of the UI goes through here.
"""

from __future__ import annotations

import html

import gradio as gr


def _text(message: str) -> str:
    # Element content only (never an attribute): <, > and & are what can start markup.
    return html.escape(str(message), quote=False)


def error(message: str, **options) -> gr.Error:
    """The exception to raise: ``raise notices.error(...)``."""
    return gr.Error(_text(message), **options)


def warning(message: str, **options) -> None:
    gr.Warning(_text(message), **options)


def info(message: str, **options) -> None:
    gr.Info(_text(message), **options)
