"""Changing persona files on disk: edit, save, create, duplicate, archive.

Every change is validated before anything is written, and written through a
temporary file and a rename, so a crash never leaves half a persona behind.
Edits made from a form go through `update_persona_text`, which changes only
the fields that changed and keeps the file's comments, key order and the
formatting of everything else (ruamel.yaml round-trip mode). Nothing is ever
deleted: "delete" moves the file into `<folder>/.archive/`.

    text = update_persona_text(loaded.text, {"system_prompt": "...", "generation": {"top_k": 20}})
    save_persona(library, "pirate", text)
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import CommentMark
from ruamel.yaml.error import YAMLError as RuamelYAMLError
from ruamel.yaml.scalarstring import DoubleQuotedScalarString, FoldedScalarString, LiteralScalarString, ScalarString
from ruamel.yaml.tokens import CommentToken

from .personas import (
    ARCHIVE_DIR,
    GenerationSettings,
    LoadedPersona,
    Persona,
    PersonaError,
    PersonaLibrary,
    atomic_write,
    atomic_write_text,
    check_avatar,
    check_id,
    content_hash,
    parse_persona,
    read_plain_text,
    safe_yaml,
)

# Field order of the schema: new keys are appended in this order.
FIELD_ORDER = list(Persona.model_fields)
GENERATION_ORDER = list(GenerationSettings.model_fields)
REQUIRED = {name for name, f in Persona.model_fields.items() if f.is_required()}
GENERATION_DEFAULTS = {name: f.default for name, f in GenerationSettings.model_fields.items()}
# Fields whose new lists are written inline (`tags: [a, b]`); the others as blocks.
FLOW_LISTS = {"tags"}
FOLD_WIDTH = 80  # a new long single-line text is folded (`>-`) to about this many columns
_NO_DEFAULT = object()  # "no schema default": a new key is written whatever its value
NAME_MAX = next(m.max_length for m in Persona.model_fields["name"].metadata if hasattr(m, "max_length"))

# The same template as `persona-studio personas new` (chatbot/cli/personas.py).
TEMPLATE = """\
# Persona {id}: edit the text, then check it with `persona-studio personas validate`.
# {{{{char}}}} and {{{{user}}}} are replaced by the persona's and the user's names when sent.
name: {name}                        # required: shown in the picker
description: A one-line summary.    # optional: shown under the picker, never sent to the model
system_prompt: >-                   # required: sent to the model first
  You are {{{{char}}}}. Say who {{{{char}}}} is, how they talk and what they care about,
  and how long their replies should be.
greeting: Hello, I'm {{{{char}}}}! What shall we talk about?   # required: the first message of a chat
# alternate_greetings:              # optional: other first messages
#   - Oh, it's you again, {{{{user}}}}!
# scenario: Where and when the chat takes place.   # optional: added to the system prompt
# example_dialogue:                 # optional: sent before the chat as real messages
#   - user: What do you do?
#     assistant: An answer in {{{{char}}}}'s voice.
# post_history_instructions: ...    # optional: added to the newest user message
generation:                         # optional: defaults of the settings panel
  temperature: 0.7                  # 0..2, 0 = greedy
  top_p: 0.9                        # (0, 1]
  top_k: 50                         # >= 0, 0 = off
  repetition_penalty: 1.1           # 1..2
  max_new_tokens: 256               # 1..4096
  # seed: 42                        # a fixed seed
tags: []
"""


# ---------------------------------------------------------------- editing text

def update_persona_text(original_text: str, changes: dict[str, Any]) -> str:
    """Apply form changes to persona YAML text, keeping comments and untouched formatting.

    `changes` maps field names to new values; fields not in it are left as
    they are. `generation` is a partial mapping updated key by key. A value
    of None, or an empty string/list/mapping for an optional field, removes
    the key. A new key whose value is the schema default is not added, and a
    key whose value did not change is not touched. New keys go at the end,
    in schema order. The result is not validated: `save_persona` does that.
    """
    editor = _Editor(original_text or "")
    doc = editor.doc
    for key in sorted(changes, key=_order(FIELD_ORDER)):
        value = changes[key]
        if key == "generation" and isinstance(value, dict):
            value = {k: value[k] for k in sorted(value, key=_order(GENERATION_ORDER))}
            if not isinstance(doc.get("generation"), CommentedMap):
                # A new (or non-mapping) generation block holds only what differs from the defaults.
                value = {k: v for k, v in value.items() if v is not None and v != GENERATION_DEFAULTS.get(k)}
                editor.set_key(doc, key, value or None, optional=True, depth=0)
                continue
            for sub, sub_value in value.items():
                editor.set_key(doc["generation"], sub, sub_value, optional=True, depth=1,
                               default=GENERATION_DEFAULTS.get(sub, _NO_DEFAULT))
            continue
        editor.set_key(doc, key, value, optional=key not in REQUIRED, depth=0)
    if not editor.touched:
        return original_text
    text = editor.dump()
    _check_faithful(text, doc, changes)
    return text


def _order(names: list[str]):
    return lambda key: (names.index(key) if key in names else len(names), key)


def _empty(value) -> bool:
    return value is None or (isinstance(value, (str, list, dict)) and not value)


def _plain(node):
    """ruamel's round-trip objects -> plain Python values, for comparing."""
    if isinstance(node, dict):
        return {str(k) if isinstance(k, ScalarString) else k: _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    if isinstance(node, str):
        return str(node)
    if isinstance(node, bool) or node is None:
        return node
    if isinstance(node, float):
        return float(node)
    if isinstance(node, int):
        return int(node)
    return node


class _Editor:
    """One YAML document in round-trip form, edited key by key."""

    def __init__(self, text: str):
        self.yaml = YAML()  # round-trip mode
        self.yaml.width = 4096  # never re-wrap untouched long lines
        self.yaml.preserve_quotes = True
        # The same bounds as the loader first (nesting, aliases, size): ruamel's composer recurses too.
        safe_yaml(text, "cannot edit the file from the form")
        try:
            doc = self.yaml.load(text) if text.strip() else None
        except (RuamelYAMLError, ValueError, TypeError, OverflowError, RecursionError) as exc:
            raise PersonaError(f"cannot edit the file from the form, it is not valid YAML: "
                               f"{' '.join(str(exc).split())}") from None
        if doc is None:
            doc = CommentedMap()
        if not isinstance(doc, CommentedMap):
            raise PersonaError("cannot edit the file from the form: it is not a mapping of fields")
        # Dumping re-indents the whole file: use the file's own indentation.
        self.indent, sequence, offset = _guess_indent(doc)
        self.yaml.indent(mapping=self.indent, sequence=sequence, offset=offset)
        self.yaml.explicit_start = text.lstrip().startswith("---")
        self.doc = doc
        self.touched = False

    def dump(self) -> str:
        out = io.StringIO()
        self.yaml.dump(self.doc, out)
        return out.getvalue()

    # -- mappings

    def set_key(self, mapping: CommentedMap, key: str, value, *, optional: bool, depth: int,
                default=_NO_DEFAULT) -> None:
        if key in mapping:
            old = mapping[key]
            if (optional and _empty(value)) or value is None:
                self.delete_key(mapping, key)
            elif _plain(old) == value:
                return
            elif isinstance(value, list) and isinstance(old, CommentedSeq):
                self.update_seq(old, value, flow=old.fa.flow_style(), depth=depth + 1)
            else:
                self.replace_value(mapping, key, self.node(value, old, flow=key in FLOW_LISTS, depth=depth))
            self.touched = True
            return
        if (optional and _empty(value)) or value is None or value == default:
            return
        self.append_key(mapping, key, self.node(value, None, flow=key in FLOW_LISTS, depth=depth))
        self.touched = True

    def replace_value(self, mapping: CommentedMap, key: str, new) -> None:
        old = mapping[key]
        # `mapping[key] = str` would silently keep the old scalar's style; go through None.
        mapping[key] = None
        mapping[key] = new
        slots = mapping.ca.items.get(key)
        if not slots:
            return
        slots.extend([None] * (4 - len(slots)))
        if _is_block_scalar(old) and not _is_block_scalar(new):
            # `key: >-  # note` had its note after the indicator: it becomes end-of-line.
            note = " ".join("".join(c if isinstance(c, str) else c.value for c in slots[3] or []).split())
            following = slots[2].value if slots[2] else ""
            column = self._note_column(mapping, key, slots)
            slots[3] = None
            slots[2] = _token(note + "\n" + following, column) if note or following else None
        elif _is_block_scalar(new) and not _is_block_scalar(old) and slots[2] is not None:
            first, _, following = slots[2].value.partition("\n")
            if first.strip():
                slots[3] = ["  " + first.strip()]
            slots[2] = _token(following) if following else None

    @staticmethod
    def _note_column(mapping: CommentedMap, key: str, slots: list) -> int:
        """Where a block scalar's note stood (after `key: >-`), so it stays in the same column."""
        try:
            line = slots[3][0] if isinstance(slots[3][0], str) else slots[3][0].value
            return mapping.lc.key(key)[1] + len(key) + len(": >-") + len(line) - len(line.lstrip())
        except (TypeError, IndexError, KeyError, AttributeError):
            return 0

    def append_key(self, mapping: CommentedMap, key: str, new) -> None:
        # Comment lines after the last entry belong to the end of the file, not to it:
        # keep them after the new last entry.
        trailing = _split_tail(mapping)
        mapping[key] = new
        _attach_tail(mapping, trailing)

    def delete_key(self, mapping: CommentedMap, key: str) -> None:
        keys = list(mapping)
        index = keys.index(key)
        # What follows the entry (comments before the next key) must stay.
        trailing = _split_tail_of(mapping, key)
        del mapping[key]
        mapping.ca.items.pop(key, None)
        if not trailing:
            return
        if index > 0:
            _attach_tail(mapping, trailing, at=keys[index - 1])
        else:
            before = mapping.ca.comment
            if before is None:
                mapping.ca.comment = [None, []]
            elif before[1] is None:
                before[1] = []
            mapping.ca.comment[1].append(_token(trailing))

    # -- sequences

    def update_seq(self, seq: CommentedSeq, values: list, *, flow: bool, depth: int) -> None:
        """Change a list in place, item by item, so comments on unchanged items stay."""
        for i, value in enumerate(values[:len(seq)]):
            old = seq[i]
            if _plain(old) == value:
                continue
            if isinstance(value, dict) and isinstance(old, CommentedMap):
                for sub in [k for k in old if k not in value]:
                    self.delete_key(old, sub)
                for sub, sub_value in value.items():
                    self.set_key(old, sub, sub_value, optional=False, depth=depth + 1)
            else:
                seq[i] = None
                seq[i] = self.node(value, old, flow=flow, depth=depth)
        if len(values) < len(seq):
            trailing = _split_tail(seq)
            del seq[len(values):]
            _attach_tail(seq, trailing)
        elif len(values) > len(seq):
            trailing = _split_tail(seq)
            for value in values[len(seq):]:
                seq.append(self.node(value, None, flow=flow, depth=depth))
            _attach_tail(seq, trailing)

    # -- new nodes

    def node(self, value, old, *, flow: bool, depth: int):
        if isinstance(value, dict):
            mapping = CommentedMap()
            for key, sub in value.items():
                mapping[key] = self.node(sub, None, flow=False, depth=depth + 1)
            return mapping
        if isinstance(value, list):
            seq = CommentedSeq(self.node(v, None, flow=flow, depth=depth + 1) for v in value)
            seq.fa.set_flow_style() if flow else seq.fa.set_block_style()
            return seq
        if isinstance(value, str):
            return self.scalar(value, old, in_flow=flow, depth=depth)
        return value

    def scalar(self, text: str, old, *, in_flow: bool, depth: int):
        """The most readable style that reads back (with PyYAML) as exactly `text`."""
        candidates = []
        if not in_flow:
            if "\n" in text:
                candidates.append(LiteralScalarString(text))
            elif isinstance(old, FoldedScalarString) or (old is None and len(text) > FOLD_WIDTH - 20):
                candidates.append(_folded(text, FOLD_WIDTH - self.indent * (depth + 1)))
        if isinstance(old, ScalarString) and not isinstance(old, (LiteralScalarString, FoldedScalarString)):
            candidates.append(type(old)(text))  # keep the file's quoting
        candidates += [text, DoubleQuotedScalarString(text)]
        for candidate in candidates:
            if self._reads_back(candidate, text, in_flow):
                return candidate
        return DoubleQuotedScalarString(text)

    def _reads_back(self, candidate, text: str, in_flow: bool) -> bool:
        probe = CommentedMap()
        if in_flow:
            seq = CommentedSeq([candidate])
            seq.fa.set_flow_style()
            probe["k"] = seq
        else:
            probe["k"] = candidate
        out = io.StringIO()
        try:
            self.yaml.dump(probe, out)
            loaded = yaml.safe_load(out.getvalue())
        except Exception:  # noqa: BLE001 - any failure just rules this style out
            return False
        return loaded == {"k": [text] if in_flow else text}


def _guess_indent(doc: CommentedMap) -> tuple[int, int, int]:
    """(mapping indent, list item indent, dash offset) of the first nested block of each kind.

    Defaults are PyYAML's: two spaces, dashes under the parent key (`- a`).
    """
    mapping = sequence = offset = None
    stack = [doc]
    while stack and (mapping is None or sequence is None):
        node = stack.pop(0)
        if not isinstance(node, CommentedMap):
            if isinstance(node, CommentedSeq):
                stack += [v for v in node if _is_block_collection(v)]
            continue
        for key, value in node.items():
            if not _is_block_collection(value):
                continue
            try:
                key_column = node.lc.key(key)[1]
                if isinstance(value, CommentedMap) and mapping is None:
                    mapping = value.lc.col - key_column
                elif isinstance(value, CommentedSeq) and sequence is None:
                    offset = value.lc.col - key_column
                    sequence = value.lc.item(0)[1] - key_column
            except (TypeError, KeyError, IndexError, AttributeError):
                pass  # built in memory, not read: no positions
            stack.append(value)
    mapping = mapping if mapping and mapping > 0 else 2
    if not sequence or sequence <= (offset or 0):
        sequence, offset = 2, 0
    return mapping, sequence, offset or 0


def _folded(text: str, width: int):
    """A `>-` block folded at single spaces so that lines stay under `width` columns."""
    scalar = FoldedScalarString(text)
    if text != text.strip() or "  " in text or "\t" in text:
        return scalar  # folding would change the text; _reads_back decides
    positions, line_start, last_space = [], 0, None
    for i, char in enumerate(text):
        if char == " ":
            if i - line_start > width and last_space is not None:
                positions.append(last_space)
                line_start = last_space + 1
            last_space = i
    if len(text) - line_start > width and last_space is not None and last_space > line_start:
        positions.append(last_space)
    scalar.fold_pos = positions
    return scalar


# Where ruamel keeps comments: a mapping entry's comment slots are
# `mapping.ca.items[key]`, a list entry's `seq.ca.items[index]`. Slot 2 (0 for a
# list entry) holds the end-of-line comment *and* every comment line after the
# entry up to the next one: "  # note\n# about the next key\n". After a block
# scalar (`|`, `>`) there is no end-of-line part (its note sits in slot 3, after
# the indicator), so the whole token is what follows. Moving, adding or
# removing entries therefore has to move those following lines explicitly.


def _token(text: str, column: int = 0) -> CommentToken:
    return CommentToken(text, CommentMark(column), None)


def _is_block_scalar(value) -> bool:
    return isinstance(value, (LiteralScalarString, FoldedScalarString))


def _is_block_collection(value) -> bool:
    return isinstance(value, (CommentedMap, CommentedSeq)) and bool(value) and not value.fa.flow_style()


def _last_slot(node):
    """(comment slots, index, value) of the entry that ends `node`, looking into nested blocks."""
    while _is_block_collection(node):
        if isinstance(node, CommentedMap):
            key = list(node)[-1]
            index = 2
        else:
            key = len(node) - 1
            index = 0
        value = node[key]
        if _is_block_collection(value):
            node = value
            continue
        slots = node.ca.items.setdefault(key, [None] * 4)
        slots.extend([None] * (4 - len(slots)))
        return slots, index, value
    return None


def _split_following(slots: list, index: int, value) -> str:
    """Detach and return the comment lines after an entry, keeping its end-of-line comment."""
    token = slots[index]
    if token is None:
        return ""
    if _is_block_scalar(value):
        slots[index] = None
        return token.value
    first, _, rest = token.value.partition("\n")
    if first.strip():
        token.value = first + "\n"
    else:
        slots[index] = None
    return rest


def _split_tail(node) -> str:
    """Detach the comment lines after the last entry of a block mapping or list."""
    found = _last_slot(node)
    return _split_following(*found) if found else ""


def _split_tail_of(mapping: CommentedMap, key: str) -> str:
    """Detach the comment lines after the entry `key` (what precedes the next key)."""
    value = mapping[key]
    if _is_block_collection(value):
        return _split_tail(value)
    slots = mapping.ca.items.get(key)
    if not slots or len(slots) < 3:
        return ""
    return _split_following(slots, 2, value)


def _attach_tail(node, text: str, at=None) -> None:
    """Put comment lines after the last entry of `node` (or after the entry `at`)."""
    if not text:
        return
    if at is not None and _is_block_collection(node[at]):
        node, at = node[at], None
    if at is None:
        found = _last_slot(node)
        if not found:
            return
        slots, index, value = found
    else:
        slots, index, value = node.ca.items.setdefault(at, [None] * 4), 2, node[at]
        slots.extend([None] * (4 - len(slots)))
    token = slots[index]
    if token is not None:
        token.value = (token.value if token.value.endswith("\n") else token.value + "\n") + text
    elif _is_block_scalar(value):
        slots[index] = _token(text)  # a block scalar ends its own line
    else:
        slots[index] = _token("\n" + text)  # "\n" first: no end-of-line comment


def _check_faithful(text: str, doc: CommentedMap, changes: dict) -> None:
    """The new text must read back (with the loader the app uses) as the edited fields."""
    loaded = safe_yaml(text, "could not write the changes as valid YAML")
    for key in changes:
        want = _plain(doc.get(key))
        got = loaded.get(key) if isinstance(loaded, dict) else None
        if got != want:
            raise PersonaError(f"{key}: could not write this value faithfully; edit it as raw YAML")


# ---------------------------------------------------------------- files

def _validate(library: PersonaLibrary, persona_id: str, yaml_text: str) -> tuple[Path, Persona]:
    check_id(persona_id)
    path = library.path_for(persona_id)
    persona = parse_persona(yaml_text, path.name)
    if persona.avatar:
        check_avatar(library.folder, persona.avatar, path.name)
    return path, persona


def _loaded_after_write(library: PersonaLibrary, persona_id: str, yaml_text: str) -> LoadedPersona:
    library.refresh()
    loaded = library.personas.get(persona_id)
    if loaded is None or loaded.text != yaml_text:
        library.reload()  # the file's size and mtime can match the old ones on a coarse clock
    return library.get(persona_id)


def save_persona(library: PersonaLibrary, persona_id: str, yaml_text: str,
                 expected_version: str | None = None) -> LoadedPersona:
    """Validate, then write atomically; nothing is written when the text is invalid.

    With `expected_version`, refuse to overwrite a file that changed on disk
    since that version was read (someone else saved in between).
    """
    path, _ = _validate(library, persona_id, yaml_text)
    if expected_version is not None:
        current = read_plain_text(path) if os.path.lexists(path) else None  # never through a link
        if current is None or content_hash(current) != expected_version:
            raise PersonaError(f"{path.name} changed on disk since it was opened; "
                               "reload it and make the change again")
    try:
        atomic_write_text(path, yaml_text)
    except OSError as exc:
        raise PersonaError(f"{path.name}: cannot write file: {exc.strerror or exc}") from None
    return _loaded_after_write(library, persona_id, yaml_text)


def _write_new(path: Path, text: str) -> None:
    """Write a file that must not exist yet, even if two people create it at once."""
    try:
        atomic_write(path, text, exclusive=True)
    except FileExistsError:
        raise PersonaError(f"{path.name} already exists") from None


def create_persona(library: PersonaLibrary, persona_id: str, yaml_text: str | None = None) -> LoadedPersona:
    """A new persona file, from `yaml_text` or a commented template; refuses an existing id."""
    check_id(persona_id)
    if yaml_text is None:
        name = json.dumps(persona_id.replace("_", " ").replace("-", " ").title())  # quoted: "123", "Yes" stay text
        yaml_text = TEMPLATE.format(id=persona_id, name=name)
    path, _ = _validate(library, persona_id, yaml_text)
    if path.exists():
        raise PersonaError(f"a persona with the id {persona_id!r} already exists")
    try:
        _write_new(path, yaml_text)
    except OSError as exc:
        raise PersonaError(f"{path.name}: cannot write file: {exc.strerror or exc}") from None
    return _loaded_after_write(library, persona_id, yaml_text)


def _free_name(folder: Path, stem: str, suffix: str) -> Path:
    candidate, n = folder / f"{stem}{suffix}", 2
    while candidate.exists():
        candidate, n = folder / f"{stem}-{n}{suffix}", n + 1
    return candidate


def duplicate_persona(library: PersonaLibrary, source_id: str, new_id: str) -> LoadedPersona:
    """A copy named "<name> (copy)" under `new_id`, with its own copy of the avatar."""
    check_id(new_id)
    library.refresh()
    source = library.get(source_id)
    if library.path_for(new_id).exists():
        raise PersonaError(f"a persona with the id {new_id!r} already exists")
    name = source.persona.name
    changes: dict[str, Any] = {"name": name[:NAME_MAX - len(" (copy)")] + " (copy)"}
    avatar, avatar_copy = source.avatar_path, None  # None also when it has become a link
    if avatar is not None:
        # Its own file: archiving one persona must not take the other's picture away.
        avatar_copy = _free_name(library.folder, new_id, avatar.suffix.lower())
        changes["avatar"] = avatar_copy.name
    text = update_persona_text(source.text, changes)
    if avatar_copy is not None:
        try:
            shutil.copy2(avatar, avatar_copy, follow_symlinks=False)
        except OSError as exc:
            raise PersonaError(f"cannot copy avatar {avatar.name}: {exc.strerror or exc}") from None
    try:
        return create_persona(library, new_id, text)
    except BaseException:
        if avatar_copy is not None:
            avatar_copy.unlink(missing_ok=True)  # the copy we just made, nothing else
        raise


def _move_no_clobber(source: Path, target: Path) -> None:
    """Rename that never overwrites: a hard link fails if the target exists."""
    try:
        os.link(source, target)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links
        if target.exists():
            raise FileExistsError(errno.EEXIST, "file exists", str(target)) from None
        os.rename(source, target)
        return
    os.unlink(source)


def archive_persona(library: PersonaLibrary, persona_id: str) -> list[Path]:
    """Move the persona file (and its avatar) into `<folder>/.archive/`; returns the new paths.

    Nothing is destroyed: the files get a timestamp suffix
    (`pirate-20250101-120000.yaml`); move them back to restore. An avatar
    that another persona also uses is copied, not moved.
    """
    path = library.path_for(persona_id)
    if not path.is_file():
        raise PersonaError(f"there is no persona {persona_id!r} to delete")
    library.refresh()
    loaded = library.personas.get(persona_id)
    archive = library.folder / ARCHIVE_DIR
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = []
    try:
        archive.mkdir(exist_ok=True)
        target = _free_name(archive, f"{persona_id}-{stamp}", ".yaml")
        _move_no_clobber(path, target)
        moved.append(target)
        avatar = loaded.avatar_path if loaded else None
        if avatar is not None and avatar.is_file():
            avatar_target = _free_name(archive, f"{avatar.stem}-{stamp}", avatar.suffix)
            shared = any(p.persona.avatar == avatar.name for p in library.personas.values()
                         if p.id != persona_id)
            if shared:
                shutil.copy2(avatar, avatar_target, follow_symlinks=False)
            else:
                _move_no_clobber(avatar, avatar_target)
            moved.append(avatar_target)
    except OSError as exc:
        raise PersonaError(f"cannot move {path.name} to {ARCHIVE_DIR}/: {exc.strerror or exc}") from None
    library.refresh()
    return moved

