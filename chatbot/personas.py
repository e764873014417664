"""Personas: YAML files with a strict schema, loaded into a PersonaLibrary.

A persona's id is its file name without `.yaml`; its version is the hash of
the file's text, so every reply can be traced to the exact persona text.
A broken file is reported by name and field and skipped; the others load.
The library rescans the folder when a file changed (`refresh()`), so edits on
disk reach the next new chat without a restart.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import stat
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .knowledge.lorebook import Activation, Lorebook, activate
from .prompting import estimate_tokens

MAX_FILE_BYTES = 256 * 1024  # a persona is a page of text, not a novel
# Letters and digits of any script, `_` and `-`: a file name with no folder, no `..`, no dot file.
ID_PATTERN = re.compile(r"[^\W_][\w-]{0,63}")
AVATAR_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif")
ARCHIVE_DIR = ".archive"
# Limits on what users hand us (persona files, cards): each failure is one PersonaError line.
MAX_NESTING = 64  # lists and mappings inside each other; the parsers recurse once per level
MAX_YAML_BYTES = 1024 * 1024  # the pure-Python YAML parser takes seconds per MB
MAX_JSON_BYTES = 8 * 1024 * 1024  # a card is a few hundred KB; its avatar travels in the PNG
MAX_AVATAR_PIXELS = 4096 * 4096  # decoded, 64 MB of RGBA; a 20000x20000 picture would be 1.6 GB
# What `{{original}}` in a system prompt stands for: the app's own main prompt, as a card's
# system_prompt means it (a frontend's main prompt, which the card wraps or extends).
DEFAULT_SYSTEM_PROMPT = ("You are {{char}}. Stay in character and write {{char}}'s next reply "
                         "in this chat with {{user}}.")
# The system message between two example chats (SillyTavern's words), so each is a chat of its own.
# None before the first or after the last: SillyTavern also sends "[Start a new Chat]" before the
# real chat, but with it the bundled SmolLM2 stopped following its examples (the code reviewer's
# bullet points, 9 of 9 replies without it, 0 of 9 with it), so the greeting follows the examples.
EXAMPLE_CHAT_MARK = "[Example Chat]"


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
    """One example exchange, sent to the model as a real user and assistant message.
    Consecutive exchanges form one example chat."""

    model_config = ConfigDict(extra="forbid")
    user: str = Field(min_length=1)
    assistant: str = Field(min_length=1)


class ExampleMessage(BaseModel):
    """One message of an example chat written as a list: `user:` or `assistant:`, not both."""

    model_config = ConfigDict(extra="forbid")
    user: str | None = Field(None, min_length=1)
    assistant: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _exactly_one_speaker(self):
        if (self.user is None) == (self.assistant is None):
            raise ValueError("give either user: or assistant:, one per list item")
        return self

    @property
    def role(self) -> str:
        return "user" if self.user is not None else "assistant"

    @property
    def content(self) -> str:
        return self.user if self.user is not None else self.assistant


class DepthPrompt(BaseModel):
    """A note sent inside the chat, `depth` messages from its end (a card's depth_prompt,
    SillyTavern's character note)."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1)
    depth: int = Field(4, ge=0, le=1000)
    role: Literal["system", "user", "assistant"] = "system"


class KnowledgeSettings(BaseModel):
    """Documents a persona answers from: found by meaning for each message (chatbot/knowledge/)."""

    model_config = ConfigDict(extra="forbid")
    files: list[str] = Field(min_length=1)  # files or folders, relative to the personas folder
    top_k: int = Field(3, ge=1, le=20)  # at most this many passages per message
    min_score: float = Field(0.35, ge=-1.0, le=1.0)  # cosine similarity a passage needs
    token_budget: int = Field(400, ge=1, le=8000)  # all passages of one message together

    @field_validator("files")
    @classmethod
    def _no_empty_files(cls, value):
        if any(not item.strip() for item in value):
            raise ValueError("entries must not be empty")
        return value


class Persona(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=100)
    system_prompt: str = Field(min_length=1)
    greeting: str = Field(min_length=1)
    description: str = ""  # shown to people, not sent to the model
    character: str = ""  # who {{char}} is (a card's description): sent after the system prompt
    personality: str = ""  # sent as "{{char}}'s personality: ..." after the character
    alternate_greetings: list[str] = Field(default_factory=list)
    scenario: str = ""  # appended to the system prompt
    # Example chats: consecutive {user, assistant} exchanges make one; a list of messages is one of
    # its own (and may have lone assistant messages, as a card's `{{char}}:`-only examples do).
    example_dialogue: list[ExampleExchange | list[ExampleMessage]] = Field(default_factory=list)
    post_history_instructions: str = ""  # added to the newest user message
    depth_prompt: DepthPrompt | None = None
    lorebook: Lorebook | None = None
    knowledge: KnowledgeSettings | None = None
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
        """The avatar file, checked again now: Gradio serves this path to everyone as it is,
        so a file swapped for a link since loading must not be handed over (None then)."""
        if not self.persona.avatar:
            return None
        path = self.path.parent / self.persona.avatar
        try:
            check_plain_file(path)
        except PersonaError:
            return None
        return path

    @property
    def greetings(self) -> list[str]:
        return [self.persona.greeting, *self.persona.alternate_greetings]


@dataclass(frozen=True)
class RenderedPersona:
    """What is sent to the model, with {{char}} and {{user}} expanded (`{{original}}` too)."""

    main_prompt: str
    definition: list[str]  # character, personality, scenario: what lore goes before or after
    examples: list[dict]  # the example chats as messages, EXAMPLE_CHAT_MARK between two
    greetings: list[str]
    post_history_instructions: str
    depth_prompt: DepthPrompt | None = None
    lorebook: Lorebook | None = None
    expand: Callable[[str], str] = lambda text: text

    def system(self, lore: Activation | None = None, passages: str = "") -> str:
        """The system message, as SillyTavern's story string orders it: main prompt, lore placed
        before the character, the character, personality and scenario, lore placed after; then
        the passages found in the persona's documents for this message."""
        lore = lore or Activation()
        parts = [self.main_prompt, lore.text("before_char"), *self.definition, lore.text("after_char"),
                 self.expand(passages)]
        return "\n\n".join(part for part in parts if part)

    @property
    def system_prompt(self) -> str:
        """The system message when no lore fires."""
        return self.system()


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def check_id(persona_id: str) -> str:
    """A persona id is a safe file name: letters, digits, - and _, no folders, no `..`."""
    if not ID_PATTERN.fullmatch(persona_id or "") or unicodedata.normalize("NFC", persona_id) != persona_id:
        raise PersonaError(
            f"persona id {persona_id!r} is not a safe file name: use 1-64 letters, digits, "
            "'-' or '_', starting with a letter or digit")
    return persona_id


_MACRO = re.compile(r"\{\{\s*(char|user)\s*\}\}", re.IGNORECASE)


def expand_macros(text: str, char: str, user: str) -> str:
    """Replace {{char}} with the persona's name and {{user}} with the user's (any case)."""
    return _MACRO.sub(lambda m: char if m.group(1).lower() == "char" else user, text)


def example_chats(persona: Persona) -> list[list[dict]]:
    """The persona's example chats as lists of {role, content} messages (macros not expanded)."""
    chats: list[list[dict]] = []
    run: list[dict] | None = None  # the chat that consecutive exchanges are adding to
    for item in persona.example_dialogue:
        if isinstance(item, ExampleExchange):
            if run is None:
                run = []
                chats.append(run)
            run += [{"role": "user", "content": item.user}, {"role": "assistant", "content": item.assistant}]
        else:
            run = None
            if item:
                chats.append([{"role": m.role, "content": m.content} for m in item])
    return chats


def render(loaded: LoadedPersona, user: str) -> RenderedPersona:
    p = loaded.persona

    def expand(text: str) -> str:
        return expand_macros(text, p.name, user)

    # `{{original}}`: what the card's own prompt wraps, resolved now, at send time (an edit of the
    # app's main prompt reaches every card); post-history instructions have no app default.
    main = expand(p.system_prompt.replace("{{original}}", DEFAULT_SYSTEM_PROMPT))
    definition = [expand(p.character)] if p.character else []
    definition += [expand(f"{{{{char}}}}'s personality: {p.personality}")] if p.personality else []
    definition += ["Scenario: " + expand(p.scenario)] if p.scenario else []
    examples = []
    for chat in example_chats(p):
        examples += [{"role": "system", "content": EXAMPLE_CHAT_MARK}] if examples else []
        examples += [{"role": m["role"], "content": expand(m["content"])} for m in chat]
    depth_prompt = p.depth_prompt and p.depth_prompt.model_copy(update={"prompt": expand(p.depth_prompt.prompt)})
    return RenderedPersona(main.strip(), definition, examples, [expand(g) for g in loaded.greetings],
                           expand(p.post_history_instructions.replace("{{original}}", "")).strip(),
                           depth_prompt, p.lorebook, expand)


def lore_for_message(loaded: LoadedPersona, message: str, user: str = "User") -> Activation:
    """Which lorebook entries fire for `message` sent right after the greeting: the Personas tab's and
    `personas lore`'s try-out (a chat counts the budget with the model's tokenizer, this about right)."""
    rendered = render(loaded, user)
    conversation = [{"role": "assistant", "content": rendered.greetings[0]}, {"role": "user", "content": message}]
    if rendered.lorebook is None:
        return Activation()
    return activate(rendered.lorebook, conversation, estimate_tokens, rendered.expand)


# ---------------------------------------------------------------- reading what users give us

class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases and nesting deeper than MAX_NESTING, before building anything.

    PyYAML's composer recurses once per level, so `name: [[[[...]]]]` 1000 deep is a
    RecursionError; and an alias is the same node again, which whatever walks the data
    (validation, export) expands again: nine levels of `&a [*b, *b, ...]` ("billion
    laughs") become billions of items. Personas and cards need neither.
    """

    _depth = 0  # lists and mappings open around the node being composed

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, f"found an alias (*{event.anchor}); "
                                              "anchors and aliases are not allowed here", event.start_mark)
        collection = isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent))
        self._depth += collection
        try:
            if self._depth > MAX_NESTING:
                raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_NESTING} levels deep",
                                                  event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= collection


def _one_line(problem: object) -> str:
    return " ".join(str(problem).split()) or type(problem).__name__


def _utf8_size(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))  # a lone surrogate is refused later, by the parser


def check_plain_data(value: Any, source: str) -> None:
    """Parsed data must nest at most MAX_NESTING levels and hold only valid Unicode text.

    Deeper data overflows the recursive code that handles it later (validation, YAML
    and JSON writers); a lone surrogate ("\\ud800" in JSON) cannot be written out as UTF-8.
    """
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list, tuple, set, frozenset)):  # the last three: !!omap, !!set
            if depth >= MAX_NESTING:
                raise PersonaError(f"{source}: nested more than {MAX_NESTING} levels deep")
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            stack += [(child, depth + 1) for child in children]
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise PersonaError(f"{source}: text with an unpaired surrogate "
                                   f"({item[:40]!r}) is not valid Unicode") from None


def safe_yaml(text: str, source: str) -> Any:
    """Parse YAML that a user wrote (a persona, a card): the one way such YAML is read.

    Bounded in size, nesting and aliases (see _BoundedLoader); whatever goes wrong is
    one PersonaError line starting with `source`.
    """
    if _utf8_size(text) > MAX_YAML_BYTES:
        raise PersonaError(f"{source}: YAML is larger than {MAX_YAML_BYTES // 1024} KiB")
    try:
        data = yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        raise PersonaError(f"{source}: not valid YAML: {_one_line(exc)}") from None
    except (ValueError, TypeError, OverflowError, RecursionError, MemoryError) as exc:
        # Raised while building values: `2020-13-45` (a date), a number of 5000 digits.
        raise PersonaError(f"{source}: not valid YAML: {_one_line(exc)}") from None
    check_plain_data(data, source)
    return data


def safe_json(text: str, source: str) -> Any:
    """Parse JSON that a user gave us (a card), bounded like safe_yaml; PersonaError otherwise."""
    if _utf8_size(text) > MAX_JSON_BYTES:
        raise PersonaError(f"{source}: JSON is larger than {MAX_JSON_BYTES // 2**20} MiB")
    try:
        data = json.loads(text)
    except RecursionError:  # the decoder recurses per level; ours is a clean error anyway
        raise PersonaError(f"{source}: nested more than {MAX_NESTING} levels deep") from None
    except (ValueError, MemoryError) as exc:  # JSONDecodeError, a number of 5000 digits
        raise PersonaError(f"{source}: not valid JSON: {_one_line(exc)}") from None
    check_plain_data(data, source)
    return data


def parse_persona(text: str, source: str) -> Persona:
    """Validate YAML text; `source` (a file name) starts every error message."""
    if _utf8_size(text) > MAX_FILE_BYTES:
        raise PersonaError(f"{source}: file is larger than {MAX_FILE_BYTES // 1024} KiB")
    data = safe_yaml(text, source)
    if not isinstance(data, dict):
        raise PersonaError(f"{source}: expected a mapping of fields (name, system_prompt, greeting, ...)")
    try:
        return Persona(**data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise PersonaError(f"{source}: {_one_line(problems)}") from None
    except TypeError as exc:  # e.g. non-string keys
        raise PersonaError(f"{source}: {exc}") from None


# ---------------------------------------------------------------- files in the personas folder

# O_NOFOLLOW: a link is refused by the open itself, so none can be swapped in after a check;
# O_NONBLOCK: a FIFO named like a persona must not hang the open.
_OPEN_NO_LINK = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)


def _refuse(path: Path, mode: int) -> None:
    """PersonaError unless `mode` (from lstat/fstat) is a regular file's.

    Everything in the personas folder is shown or served to every user: a link
    (`leak.png -> chat.db`, `x.yaml -> /etc/passwd`) would publish what it points at.
    Names in the folder have no `/` or `..` (check_id, the avatar validator), so a
    file that is no link is in the folder.
    """
    if stat.S_ISLNK(mode):
        raise PersonaError(f"{path}: is a symbolic link; persona files and avatars must be "
                           "plain files in the personas folder")
    if not stat.S_ISREG(mode):
        raise PersonaError(f"{path}: is not a plain file")


def check_plain_file(path: Path) -> None:
    """`path` exists and is a plain file, not a link: for paths handed to code that opens them itself."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        raise PersonaError(f"{path}: file not found") from None
    except OSError as exc:
        raise PersonaError(f"{path}: cannot read file: {exc.strerror or exc}") from None
    _refuse(path, mode)


def open_plain_file(path: Path) -> BinaryIO:
    """Open a plain file for reading, never through a link (see _refuse); PersonaError otherwise."""
    try:
        fd = os.open(path, _OPEN_NO_LINK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # what O_NOFOLLOW says about a link
            _refuse(path, stat.S_IFLNK)
        if isinstance(exc, FileNotFoundError):
            raise PersonaError(f"{path}: file not found") from None
        raise PersonaError(f"{path}: cannot read file: {exc.strerror or exc}") from None
    handle = os.fdopen(fd, "rb")  # O_NONBLOCK changes nothing for a plain file, the only kind kept
    try:
        _refuse(path, os.fstat(fd).st_mode)
    except BaseException:
        handle.close()
        raise
    return handle


def check_avatar(folder: Path, name: str, source: str) -> None:
    """The avatar `name` is a plain file in `folder` (see _refuse); PersonaError for `source` otherwise."""
    path = Path(folder) / name
    if not os.path.lexists(path):
        raise PersonaError(f"{source}: avatar: file {name} not found next to the persona")
    try:
        check_plain_file(path)
    except PersonaError as exc:
        raise PersonaError(f"{source}: avatar: {exc}") from None


def read_plain_text(path: Path, limit: int = MAX_FILE_BYTES) -> str:
    """A persona file's text: a plain file (no link) of at most `limit` bytes, in UTF-8."""
    with open_plain_file(path) as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise PersonaError(f"{path}: file is larger than {limit // 1024} KiB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PersonaError(f"{path}: cannot read file: not UTF-8 text "
                           f"({exc.reason} at byte {exc.start})") from None


def load_persona(path: Path) -> LoadedPersona:
    path = Path(path)
    try:
        check_id(path.stem)
    except PersonaError as exc:
        raise PersonaError(f"{path}: {exc}") from None
    text = read_plain_text(path)
    persona = parse_persona(text, str(path))
    if persona.avatar:
        check_avatar(path.parent, persona.avatar, str(path))
    return LoadedPersona(id=path.stem, persona=persona, text=text, version=content_hash(text), path=path)


def _new_temporary(path: Path) -> tuple[int, Path]:
    """A new file next to `path`, with the permissions open() would give it (0666 less the umask).

    Not tempfile.mkstemp: its files are 0600, and the rename keeps that, so saved
    personas, avatars and exported cards became readable by their owner only.
    """
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(path))


def atomic_write(path: Path, data: str | bytes, exclusive: bool = False) -> None:
    """Write via a temporary file and rename, so a crash never leaves half a file.

    `exclusive`: the file must not exist yet (FileExistsError otherwise), also
    when two writers race: the temporary file is hard-linked into place, which
    fails if the name is taken.
    """
    path = Path(path)
    fd, tmp = _new_temporary(path)
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
