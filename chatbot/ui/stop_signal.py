"""The Stop button's signal, shared by the tabs that stream a reply (Chat, and the Personas tab's Try it)."""

from __future__ import annotations

import threading


class StopSignal:
    """A per-session threading.Event, kept in gr.State: Stop sets it, the running reply reads it.

    gr.State deep-copies initial values and an Event cannot be copied, so each
    copy is simply a fresh signal.
    """

    def __init__(self):
        self.event = threading.Event()

    def __deepcopy__(self, memo):
        return StopSignal()
