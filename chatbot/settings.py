"""One Settings object for the app, built from environment variables and CLI flags.

Precedence: command-line flag > environment variable > default. Nothing here
is global: each command builds its `Settings` once (chatbot/cli/options.py
``settings(args)``) and passes it to what needs it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

ENV_PREFIX = "PERSONA_STUDIO_"
REPO_PERSONAS = Path(__file__).resolve().parent.parent / "personas"


def _default_data_dir() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "persona-studio"


@dataclass(frozen=True)
class Settings:
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=7860, metadata={"help": "port to listen on"})
    model: str = field(default="", metadata={
        "help": "Hugging Face model id or local checkpoint directory; empty = the bundled SmolLM2-135M-Instruct"})
    engine: str = field(default="transformers", metadata={
        "help": "transformers: the model in this process (default); vllm: a vLLM server the app starts "
                "from .venv-vllm (make vllm)"})
    engine_url: str = field(default="", metadata={
        "help": "URL of a running vLLM OpenAI-compatible server, e.g. http://host:8000/v1 (implies --engine vllm)"})
    dtype: str = field(default="auto", metadata={
        "help": "auto, bfloat16, float32 or float16; auto picks bfloat16 where the CPU/GPU runs it natively"})
    data_dir: Path = field(default_factory=_default_data_dir, metadata={
        "help": "where the database and the converted model live"})
    db_url: str = field(default="", metadata={
        "help": "SQLAlchemy URL; empty = SQLite file chat.db in the data directory"})
    personas_dir: Path = field(default=REPO_PERSONAS, metadata={"help": "folder of persona YAML files"})
    context_tokens: int = field(default=0, metadata={
        "help": "context window in tokens; 0 = the model's own maximum"})
    user: str = field(default="User", metadata={
        "help": "your name: recorded with chats and votes, and what {{user}} in a persona becomes"})
    session_hours: int = field(default=168, metadata={
        "help": "with accounts: hours a sign-in lasts before asking again (default 168, a week)"})
    worker_nice: int = field(default=10, metadata={
        "help": "CPU priority the alignment job worker gives up, 0-19 (default 10: the chat goes first; "
                "0 on a machine that only trains)"})
    job_poll_seconds: float = field(default=2.0, metadata={
        "help": "how often the Alignment tab refreshes a running job's progress and curves, in seconds "
                "(default 2; 0.1-60)"})

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{Path(self.data_dir) / 'chat.db'}"

    @classmethod
    def from_sources(cls, overrides: dict | None = None, environ: dict | None = None) -> "Settings":
        """Defaults, then PERSONA_STUDIO_* environment variables, then non-None overrides."""
        environ = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None and raw != "":
                values[f.name] = raw
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls(**{k: _coerce(f, values[k]) for f in fields(cls) for k in [f.name] if k in values})


def _coerce(f, value):
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    try:
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
        if kind == "Path":
            return Path(value).expanduser()
    except ValueError:
        raise ValueError(f"setting {f.name}: expected {'an integer' if kind == 'int' else 'a number'}, "
                         f"got {value!r}") from None
    return value
