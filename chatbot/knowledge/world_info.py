"""Lorebooks in and out: Card V2/V3 `character_book` and SillyTavern's world info JSON.

    book = lorebook_from_card(card["data"]["character_book"], "data.character_book")
    card["data"]["character_book"] = lorebook_to_card(book)
    book = lorebook_from_world_info(json.load(open("World.json")), "World.json")

A card's entry keeps SillyTavern's settings in its `extensions` (position as a
number, depth, role, selectiveLogic, match_whole_words, case_sensitive,
scan_depth); those become the entry's own fields here and go back on export.
Whatever has no field of its own is kept: an entry's other extensions in
`extensions`, its other fields (V3's `use_regex`, ...) in
`extensions.card_fields`, and the book's likewise, so export gives back the
card's book. SillyTavern positions this app has no place for (author's note
top/bottom, example messages top/bottom) are kept as SillyTavern's number in
`extensions.position` and read as before/after the character.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from ..personas import PersonaError
from .lorebook import Lorebook, LoreEntry

CARD_FIELDS = "card_fields"  # an entry's or book's fields with no LoreEntry/Lorebook equivalent
# SillyTavern's world_info_position numbers and what this app does with them.
ST_POSITIONS = {0: "before_char", 1: "after_char", 2: "before_char", 3: "after_char", 4: "at_depth",
                5: "before_char", 6: "after_char"}
OWN_POSITIONS = {"before_char": 0, "after_char": 1, "at_depth": 4}
ST_LOGIC = {0: "and_any", 1: "not_all", 2: "not_any", 3: "and_all"}
ST_ROLES = {0: "system", 1: "user", 2: "assistant"}
ENTRY_FIELDS = ("keys", "content", "extensions", "enabled", "insertion_order", "case_sensitive", "name",
                "priority", "id", "comment", "selective", "secondary_keys", "constant", "position")
BOOK_FIELDS = ("name", "description", "scan_depth", "token_budget", "recursive_scanning", "extensions", "entries")
# SillyTavern world info entry fields -> LoreEntry fields (the rest is kept in extensions, as named there).
WORLD_INFO_FIELDS = {"key": "keys", "keysecondary": "secondary_keys", "content": "content", "comment": "comment",
                     "constant": "constant", "selective": "selective", "order": "insertion_order", "uid": "id",
                     "depth": "depth", "scanDepth": "scan_depth", "caseSensitive": "case_sensitive",
                     "matchWholeWords": "whole_words"}


def _invert(mapping: dict) -> dict:
    return {value: key for key, value in mapping.items()}


def _number(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _texts(value: Any, where: str) -> list[str]:
    """Keys as a list of non-empty texts; a single text is split at commas (as SillyTavern's editor does)."""
    if value is None:
        return []
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
        raise PersonaError(f"{where}: expected a list of keys")
    return [str(v).strip() for v in value if str(v).strip()]


def _build(model, values: dict, where: str):
    try:
        return model(**values)
    except ValidationError as exc:
        problem = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise PersonaError(f"{where}: {problem}") from None


def _entry_from_card(entry: Any, where: str) -> LoreEntry:
    if not isinstance(entry, dict):
        raise PersonaError(f"{where}: expected an entry object, got {type(entry).__name__}")
    ext = dict(entry.get("extensions") or {}) if isinstance(entry.get("extensions"), dict) else {}
    values: dict[str, Any] = {
        "keys": _texts(entry.get("keys"), f"{where}.keys"),
        "secondary_keys": _texts(entry.get("secondary_keys"), f"{where}.secondary_keys"),
        "content": str(entry.get("content") or ""),
        "name": str(entry.get("name") or ""), "comment": str(entry.get("comment") or ""),
        "enabled": entry.get("enabled", True) is not False,
        "constant": entry.get("constant") is True,
        "selective": entry.get("selective", True) is not False,
    }
    for key in ("insertion_order", "priority", "id"):
        if _number(entry.get(key)) is not None:
            values[key] = entry[key]
    st_position = _number(ext.get("position"))
    values["position"] = ST_POSITIONS.get(st_position) or (
        "before_char" if entry.get("position") == "before_char" else "after_char")
    if st_position in OWN_POSITIONS.values() or st_position is None:
        ext.pop("position", None)  # this app's own field says it; otherwise SillyTavern's number stays
    if _number(ext.get("depth")) is not None:
        values["depth"] = ext.pop("depth")
    if ext.get("role") in ST_ROLES:
        values["role"] = ST_ROLES[ext.pop("role")]
    if ext.get("selectiveLogic") in ST_LOGIC:
        values["selective_logic"] = ST_LOGIC[ext.pop("selectiveLogic")]
    if isinstance(ext.get("match_whole_words"), bool):
        values["whole_words"] = ext.pop("match_whole_words")
    case = entry.get("case_sensitive") if isinstance(entry.get("case_sensitive"), bool) else ext.get("case_sensitive")
    if isinstance(case, bool):
        values["case_sensitive"] = case
    if isinstance(ext.get("case_sensitive"), bool):
        ext.pop("case_sensitive")
    if _number(ext.get("scan_depth")) is not None:
        values["scan_depth"] = ext.pop("scan_depth")
    other = {k: v for k, v in entry.items() if k not in ENTRY_FIELDS}
    if other:
        ext[CARD_FIELDS] = other
    values["extensions"] = ext
    return _build(LoreEntry, values, where)


def lorebook_from_card(book: Any, where: str) -> Lorebook:
    """A card's `character_book` as a Lorebook; PersonaError naming `where` when it is not one."""
    if not isinstance(book, dict) or not isinstance(book.get("entries", []), list):
        raise PersonaError(f"{where}: expected an object with a list of entries (Card V2 character_book), "
                           f"got {type(book).__name__}")
    values: dict[str, Any] = {"name": str(book.get("name") or ""), "description": str(book.get("description") or ""),
                              "recursive_scanning": book.get("recursive_scanning") is True}
    for key in ("scan_depth", "token_budget"):
        if _number(book.get(key)) is not None:
            values[key] = book[key]
    ext = dict(book["extensions"]) if isinstance(book.get("extensions"), dict) else {}
    other = {k: v for k, v in book.items() if k not in BOOK_FIELDS}
    if other:
        ext[CARD_FIELDS] = other
    values["extensions"] = ext
    values["entries"] = [_entry_from_card(e, f"{where}.entries[{i}]") for i, e in enumerate(book.get("entries", []))]
    return _build(Lorebook, values, where)


def _entry_to_card(entry: LoreEntry) -> dict[str, Any]:
    ext = dict(entry.extensions)
    other = ext.pop(CARD_FIELDS, {})
    kept_position = _number(ext.get("position"))
    if kept_position is None or ST_POSITIONS.get(kept_position) != entry.position:
        ext["position"] = OWN_POSITIONS[entry.position]  # edited here since import: ours decides
    ext.update({"depth": entry.depth, "role": _invert(ST_ROLES)[entry.role],
                "selectiveLogic": _invert(ST_LOGIC)[entry.selective_logic],
                "match_whole_words": entry.whole_words, "case_sensitive": entry.case_sensitive})
    if entry.scan_depth is not None:
        ext["scan_depth"] = entry.scan_depth
    card = {"keys": list(entry.keys), "content": entry.content, "extensions": ext, "enabled": entry.enabled,
            "insertion_order": entry.insertion_order, "case_sensitive": entry.case_sensitive,
            "name": entry.name, "priority": entry.priority, "comment": entry.comment,
            "selective": entry.selective, "secondary_keys": list(entry.secondary_keys),
            "constant": entry.constant,
            "position": "before_char" if ST_POSITIONS[ext["position"]] == "before_char" else "after_char"}
    if entry.id is not None:
        card["id"] = entry.id
    return {**other, **card}


def lorebook_to_card(book: Lorebook) -> dict[str, Any]:
    """A Lorebook as a Card V2 `character_book`, SillyTavern's settings in each entry's extensions."""
    ext = dict(book.extensions)
    other = ext.pop(CARD_FIELDS, {})
    return {**other, "name": book.name, "description": book.description, "scan_depth": book.scan_depth,
            "token_budget": book.token_budget, "recursive_scanning": book.recursive_scanning,
            "extensions": ext, "entries": [_entry_to_card(e) for e in book.entries]}


def lorebook_from_world_info(data: Any, where: str) -> Lorebook:
    """SillyTavern's world info file ({"entries": {"0": {...}}}) or a bare character_book, as a Lorebook."""
    if isinstance(data, dict) and isinstance(data.get("entries"), list):
        return lorebook_from_card(data, where)  # a character_book saved on its own
    if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
        raise PersonaError(f"{where}: not a world info file (expected an object whose 'entries' maps ids to entries)")
    entries = []
    for uid, raw in data["entries"].items():
        at = f"{where}: entries.{uid}"
        if not isinstance(raw, dict):
            raise PersonaError(f"{at}: expected an entry object, got {type(raw).__name__}")
        values: dict[str, Any] = {"keys": _texts(raw.get("key"), f"{at}.key"),
                                  "secondary_keys": _texts(raw.get("keysecondary"), f"{at}.keysecondary"),
                                  "content": str(raw.get("content") or ""), "comment": str(raw.get("comment") or ""),
                                  "enabled": raw.get("disable") is not True,
                                  "constant": raw.get("constant") is True,
                                  "selective": raw.get("selective", True) is not False}
        for source, target in (("order", "insertion_order"), ("uid", "id"), ("depth", "depth"),
                               ("scanDepth", "scan_depth")):
            if _number(raw.get(source)) is not None:
                values[target] = raw[source]
        for source, target in (("caseSensitive", "case_sensitive"), ("matchWholeWords", "whole_words")):
            if isinstance(raw.get(source), bool):
                values[target] = raw[source]
        position = _number(raw.get("position"))
        values["position"] = ST_POSITIONS.get(position, "before_char")
        values["selective_logic"] = ST_LOGIC.get(raw.get("selectiveLogic"), "and_any")
        values["role"] = ST_ROLES.get(raw.get("role"), "system")
        ext = {k: v for k, v in raw.items()
               if k not in WORLD_INFO_FIELDS and k not in ("disable", "position", "selectiveLogic", "role")}
        if position is not None and position not in OWN_POSITIONS.values():
            ext["position"] = position
        values["extensions"] = ext
        entries.append(_build(LoreEntry, values, at))
    def shown_at(entry: LoreEntry) -> int:  # the order SillyTavern's editor lists them in
        index = _number(entry.extensions.get("displayIndex"))
        return index if index is not None else entry.id or 0

    entries.sort(key=shown_at)
    name = data.get("name") if isinstance(data.get("name"), str) else ""
    return Lorebook(name=name, entries=entries)
