"""Personas: YAML files with a strict schema, loaded into a PersonaLibrary.

A persona's id is its file name without `.yaml`; its version is the hash of
the file's text, so every reply can be traced to the exact persona text.
A broken file is reported by name and field and skipped; the others load.
The library rescans the folder when a file changed (`refresh()`), so edits on
disk reach the next new chat without a restart.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_FILE_BYTES = 256 * 1024  # a persona is a page of text, not a novel
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
AVATAR_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif")
ARCHIVE_DIR = ".archive"


class GenerationSettings(BaseModel):
    """Sampling settings; the defaults of the chat's settings panel."""

    model_config = ConfigDict(extra="forbid")
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    top_k: int = Field(50, ge=0)
    repetition_penalty: float = Field(1.1, ge=1.0, le=2.0)
    max_new_tokens: int = Field(256, ge=1, le=4096)
    seed: int | None = None


class ExampleExchange(BaseModel):
    """One example exchange, sent to the model as a real user and assistant message."""

    model_config = ConfigDict(extra="forbid")
    user: str = Field(min_length=1)
    assistant: str = Field(min_length=1)


class Persona(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=100)
    system_prompt: str = Field(min_length=1)
    greeting: str = Field(min_length=1)
    description: str = ""  # shown to people, not sent to the model
    alternate_greetings: list[str] = Field(default_factory=list)
    scenario: str = ""  # appended to the system prompt
    example_dialogue: list[ExampleExchange] = Field(default_factory=list)
    post_history_instructions: str = ""  # a system message after the conversation
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    tags: list[str] = Field(default_factory=list)
    avatar: str | None = None  # an image file in the personas folder
    model: str | None = None  # base model this persona wants (the server serves one)
    adapter: str | None = None  # LoRA adapter folder served for this persona
    extensions: dict[str, Any] = Field(default_factory=dict)  # imported fields with no equivalent

    @field_validator("avatar")
    @classmethod
    def _avatar_is_a_plain_image_name(cls, value):
        if value is not None:
            if Path(value).name != value or value.startswith("."):
                raise ValueError("must be a file name next to the persona file, without folders")
            if not value.lower().endswith(AVATAR_SUFFIXES):
                raise ValueError(f"must be an image ({', '.join(AVATAR_SUFFIXES)})")
        return value

    @field_validator("alternate_greetings", "tags")
    @classmethod
    def _no_empty_entries(cls, value):
        if any(not item.strip() for item in value):
            raise ValueError("entries must not be empty")
        return value


class PersonaError(Exception):
    """A persona is invalid or missing; the message names the file and the field."""


@dataclass(frozen=True)
class LoadedPersona:
    id: str
    persona: Persona
    text: str  # the file as read, stored with every conversation that uses it
    version: str  # content hash of `text`
    path: Path

    @property
    def avatar_path(self) -> Path | None:
        return self.path.parent / self.persona.avatar if self.persona.avatar else None

    @property
    def greetings(self) -> list[str]:
        return [self.persona.greeting, *self.persona.alternate_greetings]


@dataclass(frozen=True)
class RenderedPersona:
    """What is sent to the model, with {{char}} and {{user}} expanded."""

    system_prompt: str
    examples: list[dict]  # alternating user/assistant messages
    greetings: list[str]
    post_history_instructions: str


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def check_id(persona_id: str) -> str:
    """A persona id is a safe file name: letters, digits, - and _, no folders, no `..`."""
    if not ID_PATTERN.fullmatch(persona_id or ""):
        raise PersonaError(
            f"persona id {persona_id!r} is not a safe file name: use 1-64 letters, digits, "
            "'-' or '_', starting with a letter or digit")
    return persona_id


_MACRO = re.compile(r"\{\{\s*(char|user)\s*\}\}", re.IGNORECASE)


def expand_macros(text: str, char: str, user: str) -> str:
    """Replace {{char}} with the persona's name and {{user}} with the user's (any case)."""
    return _MACRO.sub(lambda m: char if m.group(1).lower() == "char" else user, text)


def render(loaded: LoadedPersona, user: str) -> RenderedPersona:
    p = loaded.persona

    def expand(text: str) -> str:
        return expand_macros(text, p.name, user)

    system = expand(p.system_prompt)
    if p.scenario:
        system += "\n\nScenario: " + expand(p.scenario)
    examples = []
    for exchange in p.example_dialogue:
        examples += [{"role": "user", "content": expand(exchange.user)},
                     {"role": "assistant", "content": expand(exchange.assistant)}]
    return RenderedPersona(system, examples, [expand(g) for g in loaded.greetings],
                           expand(p.post_history_instructions))


def parse_persona(text: str, source: str) -> Persona:
    """Validate YAML text; `source` (a file name) starts every error message."""
    if len(text.encode("utf-8")) > MAX_FILE_BYTES:
        raise PersonaError(f"{source}: file is larger than {MAX_FILE_BYTES // 1024} KiB")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PersonaError(f"{source}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise PersonaError(f"{source}: expected a mapping of fields (name, system_prompt, greeting, ...)")
    try:
        return Persona(**data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise PersonaError(f"{source}: {problems}") from None
    except TypeError as exc:  # e.g. non-string keys
        raise PersonaError(f"{source}: {exc}") from None


def load_persona(path: Path) -> LoadedPersona:
    path = Path(path)
    try:
        check_id(path.stem)
    except PersonaError as exc:
        raise PersonaError(f"{path}: {exc}") from None
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise PersonaError(f"{path}: file is larger than {MAX_FILE_BYTES // 1024} KiB")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PersonaError(f"{path}: cannot read file: {exc}") from None
    persona = parse_persona(text, str(path))
    if persona.avatar and not (path.parent / persona.avatar).is_file():
        raise PersonaError(f"{path}: avatar: file {persona.avatar} not found next to the persona")
    return LoadedPersona(id=path.stem, persona=persona, text=text, version=content_hash(text), path=path)


def atomic_write(path: Path, data: str | bytes, exclusive: bool = False) -> None:
    """Write via a temporary file and rename, so a crash never leaves half a file.

    `exclusive`: the file must not exist yet (FileExistsError otherwise), also
    when two writers race: the temporary file is hard-linked into place, which
    fails if the name is taken.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w",
                       **({} if isinstance(data, bytes) else {"encoding": "utf-8"})) as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if not exclusive:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links: check, then rename
            if path.exists():
                raise FileExistsError(path) from None
            os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, text)


class PersonaLibrary:
    """The personas of one folder. `errors` lists the files that failed to load."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.personas: dict[str, LoadedPersona] = {}
        self.errors: list[str] = []
        self._stamp: tuple = ()
        self.reload()

    def _scan_stamp(self) -> tuple:
        """Names, sizes and mtimes of the YAML files: changes when any file does."""
        entries = []
        for path in sorted(self.folder.glob("*.yaml")):
            try:
                st = path.stat()
            except OSError:
                continue
            entries.append((path.name, st.st_size, st.st_mtime_ns))
        return tuple(entries)

    def reload(self) -> None:
        if not self.folder.is_dir():
            raise PersonaError(f"personas folder {self.folder} does not exist")
        stamp = self._scan_stamp()
        personas, errors = {}, []
        for path in sorted(self.folder.glob("*.yaml")):
            try:
                loaded = load_persona(path)
            except PersonaError as exc:
                errors.append(str(exc))
                continue
            personas[loaded.id] = loaded
        # Swapped in whole: a reader in another thread sees the old set or the new one.
        self.personas, self.errors, self._stamp = personas, errors, stamp

    def refresh(self) -> bool:
        """Reload if any file was added, removed or changed; True when it did."""
        if self._scan_stamp() == self._stamp:
            return False
        self.reload()
        return True

    def ids(self) -> list[str]:
        return list(self.personas)

    def get(self, persona_id: str) -> LoadedPersona:
        try:
            return self.personas[persona_id]
        except KeyError:
            known = ", ".join(self.personas) or "none"
            raise PersonaError(f"unknown persona {persona_id!r} (known: {known})") from None

    def path_for(self, persona_id: str) -> Path:
        return self.folder / f"{check_id(persona_id)}.yaml"
