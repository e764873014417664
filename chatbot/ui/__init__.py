"""The browser UI: `build_app(service, identity)` returns the Gradio Blocks."""

from .app import build_app

__all__ = ["build_app"]
