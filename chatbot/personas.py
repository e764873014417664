"""Personas: YAML files with a strict schema, loaded into a PersonaLibrary.

A persona's id is its file name without `.yaml`; its version is the hash of
the file's text, so every reply can be traced to the exact persona text.
A broken file is reported by name and skipped; the others still load.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class GenerationSettings(BaseModel):
    """Sampling settings; a persona may set any of them, the rest use engine defaults."""

    model_config = ConfigDict(extra="forbid")
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    top_k: int = Field(50, ge=0)
    repetition_penalty: float = Field(1.1, ge=1.0, le=2.0)
    max_new_tokens: int = Field(256, ge=1, le=4096)
    seed: int | None = None


class Persona(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    system_prompt: str = Field(min_length=1)
    greeting: str = Field(min_length=1)
    description: str = ""
    generation: GenerationSettings = Field(default_factory=GenerationSettings)


class PersonaError(Exception):
    """A persona file is invalid; the message names the file and the field."""


@dataclass(frozen=True)
class LoadedPersona:
    id: str
    persona: Persona
    text: str  # the file as read, stored with every conversation that uses it
    version: str  # content hash of `text`
    path: Path


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def load_persona(path: Path) -> LoadedPersona:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PersonaError(f"{path}: cannot read file: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PersonaError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise PersonaError(f"{path}: expected a mapping of fields (name, system_prompt, greeting, ...)")
    try:
        persona = Persona(**data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise PersonaError(f"{path}: {problems}") from None
    return LoadedPersona(id=path.stem, persona=persona, text=text, version=content_hash(text), path=path)


class PersonaLibrary:
    """The personas of one folder. `errors` lists the files that failed to load."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.personas: dict[str, LoadedPersona] = {}
        self.errors: list[str] = []
        self.reload()

    def reload(self) -> None:
        if not self.folder.is_dir():
            raise PersonaError(f"personas folder {self.folder} does not exist")
        personas, errors = {}, []
        for path in sorted(self.folder.glob("*.yaml")):
            try:
                loaded = load_persona(path)
            except PersonaError as exc:
                errors.append(str(exc))
                continue
            personas[loaded.id] = loaded
        self.personas, self.errors = personas, errors

    def ids(self) -> list[str]:
        return list(self.personas)

    def get(self, persona_id: str) -> LoadedPersona:
        try:
            return self.personas[persona_id]
        except KeyError:
            known = ", ".join(self.personas) or "none"
            raise PersonaError(f"unknown persona {persona_id!r} (known: {known})") from None
