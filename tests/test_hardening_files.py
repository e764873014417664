"""Hostile persona files, cards and images: each is refused with one line, nothing else breaks.

Regression tests for a security review of the personas folder, the card
importer and the files the app writes: deep nesting, aliases, links out of
the folder, decompression bombs, huge images, truncated PNGs, file modes and
the conversation downloads. The last section states the rule as properties
(hypothesis): whatever the input, the loader and the importer either succeed
or raise PersonaError.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import struct
import threading
import zlib
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from chatbot.cli import main as cli_main
from chatbot.persona_cards import dump_persona_yaml, export_card_v2, import_card, png_text_chunks
from chatbot.persona_files import create_persona, save_persona, update_persona_text
from chatbot.persona_form import open_for_editing
from chatbot.personas import (
    MAX_NESTING,
    LoadedPersona,
    PersonaError,
    PersonaLibrary,
    content_hash,
    load_persona,
    parse_persona,
)
from chatbot.ui import history_sidebar
from chatbot.ui.persona_thumbnails import thumbnail

GOOD = "name: Tester\nsystem_prompt: You test.\ngreeting: Hi!\n"
CARD = {"spec": "chara_card_v2", "spec_version": "2.0",
        "data": {"name": "Nova", "first_mes": "Hello.", "description": "A navigator."}}


@pytest.fixture
def folder(tmp_path) -> Path:
    folder = tmp_path / "personas"
    folder.mkdir()
    (folder / "good.yaml").write_text(GOOD)
    return folder


@pytest.fixture
def secret(tmp_path) -> Path:
    """A file outside the personas folder, standing in for chat.db or /etc/passwd."""
    path = tmp_path / "data" / "chat.db"
    path.parent.mkdir()
    path.write_text("name: Leaked\nsystem_prompt: the database\ngreeting: secret rows\n")
    return path


def one_error(library: PersonaLibrary, name: str, expected: str) -> str:
    """The library loaded the good persona and reported `name` in one line containing `expected`."""
    assert library.ids() == ["good"]
    [error] = library.errors
    assert name in error and expected in error and "\n" not in error, error
    return error


# ---------------------------------------------------------------- PNG bytes, chunk by chunk

def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png(*chunks: bytes, width: int = 1, height: int = 1, end: bool = True) -> bytes:
    """A PNG of `width` x `height` grey pixels (1 bit each), with extra chunks before the image data."""
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
    rows = zlib.compress(b"\0" * (1 + (width + 7) // 8) * min(height, 4))  # enough to open, not to decode
    return (b"\x89PNG\r\n\x1a\n" + header + b"".join(chunks) + chunk(b"IDAT", rows)
            + (chunk(b"IEND", b"") if end else b""))


def card_chunk(card: dict = CARD) -> bytes:
    return chunk(b"tEXt", b"chara\0" + base64.b64encode(json.dumps(card).encode()))


def ztxt(keyword: bytes, text: bytes) -> bytes:
    return chunk(b"zTXt", keyword + b"\0\0" + zlib.compress(text, 9))


# ---------------------------------------------------------------- 1. nesting and parser errors

def nested(levels: int) -> list:
    value: list = []
    for _ in range(levels - 1):
        value = [value]
    return value


def test_a_deeply_nested_persona_is_skipped_with_one_line(folder, capsys):
    (folder / "deep.yaml").write_text("name: " + "[" * 1000 + "]" * 1000 + "\n")
    one_error(PersonaLibrary(folder), "deep.yaml", f"nested more than {MAX_NESTING} levels deep")
    # The command line reports it like any other broken file, without a traceback.
    assert cli_main(["personas", "list", "--personas-dir", str(folder)]) == 0
    assert "deep.yaml" in capsys.readouterr().out
    assert cli_main(["personas", "validate", "--personas-dir", str(folder)]) == 1
    assert "deep.yaml: not valid YAML" in capsys.readouterr().err


@pytest.mark.parametrize("text, expected", [
    ("name: " + "[" * (MAX_NESTING + 1) + "]" * (MAX_NESTING + 1), "nested more than"),
    ("name: x\nextensions:\n" + "".join(f"{'  ' * i}k:\n" for i in range(1, 400)), "nested more than"),
    ("name: x\nextensions: {d: 2020-13-45}", "month must be in 1..12"),  # a date that is none
    ("name: x\nextensions: {n: " + "1" * 5000 + "}", "not valid YAML"),  # over int's digit limit
    ('name: "\\ud800"\nsystem_prompt: s\ngreeting: g', "not valid Unicode"),
])
def test_values_the_parser_chokes_on_are_persona_errors(text, expected):
    with pytest.raises(PersonaError, match=expected):
        parse_persona(text, "x.yaml")


def test_nesting_up_to_the_limit_still_loads():
    deep = "[" * (MAX_NESTING - 2) + "1" + "]" * (MAX_NESTING - 2)
    persona = parse_persona(GOOD + f"extensions: {{k: {deep}}}\n", "x.yaml")
    assert persona.extensions["k"]


def test_the_form_editor_refuses_deep_yaml_too():
    with pytest.raises(PersonaError, match="cannot edit the file from the form: not valid YAML: nested"):
        update_persona_text(GOOD + "extensions: " + "[" * 1000 + "]" * 1000, {"name": "x"})


@pytest.mark.parametrize("name, content", [
    ("deep.json", "[" * 100_000 + "]" * 100_000),  # the JSON decoder itself recurses too deep
    ("deep2.json", json.dumps({**CARD, "data": {**CARD["data"], "extensions": {"x": nested(300)}}})),
    ("deep.yaml", "name: x\ngreeting: " + "[" * 1000 + "]" * 1000),
])
def test_a_deeply_nested_card_is_refused(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(PersonaError, match="nested more than"):
        import_card(path)


def test_a_huge_yaml_card_is_refused_before_parsing(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("name: x\ngreeting: hi\ncontext: |\n" + "  words words words\n" * 100_000)
    with pytest.raises(PersonaError, match="larger than 1024 KiB"):
        import_card(path)


def test_a_card_with_a_non_text_field_name_is_refused(tmp_path):
    path = tmp_path / "odd.yaml"
    path.write_text("name: x\ngreeting: hi\n1: one\n")
    with pytest.raises(PersonaError, match="field name 1 is not text"):
        import_card(path)


# ---------------------------------------------------------------- 2. links out of the personas folder

def test_a_linked_persona_file_is_skipped_and_never_shown(folder, secret):
    (folder / "passwd.yaml").symlink_to(secret)
    one_error(PersonaLibrary(folder), "passwd.yaml", "is a symbolic link")
    # The Raw YAML view of a broken file shows the file; not what the link points at.
    editing = open_for_editing(PersonaLibrary(folder), "passwd", {})
    assert editing.text == "" and "symbolic link" in editing.problem


def test_a_linked_avatar_is_refused(folder, secret):
    (folder / "leak.png").symlink_to(secret)
    (folder / "leaky.yaml").write_text(GOOD + "avatar: leak.png\n")
    one_error(PersonaLibrary(folder), "leaky.yaml", "avatar: ")
    assert "symbolic link" in PersonaLibrary(folder).errors[0]
    with pytest.raises(PersonaError, match="symbolic link"):
        save_persona(PersonaLibrary(folder), "good", GOOD + "avatar: leak.png\n")


def test_an_avatar_swapped_for_a_link_after_loading_is_not_handed_out(folder, secret):
    (folder / "face.png").write_bytes(png())
    (folder / "good.yaml").write_text(GOOD + "avatar: face.png\n")
    loaded = PersonaLibrary(folder).get("good")
    assert loaded.avatar_path == folder / "face.png"
    (folder / "face.png").unlink()
    (folder / "face.png").symlink_to(secret)
    # The chat tab hands this path to Gradio, which would copy and serve the database.
    assert loaded.avatar_path is None
    assert thumbnail(loaded).size == (160, 160)  # the placeholder


def test_saving_over_a_linked_file_writes_nothing_through_it(folder, secret):
    (folder / "passwd.yaml").symlink_to(secret)
    before = secret.read_text()
    with pytest.raises(PersonaError, match="symbolic link"):
        save_persona(PersonaLibrary(folder), "passwd", GOOD, expected_version=content_hash(before))
    assert secret.read_text() == before and (folder / "passwd.yaml").is_symlink()


def test_a_fifo_named_like_a_persona_does_not_hang_the_loader(folder):
    os.mkfifo(folder / "pipe.yaml")
    result = []
    worker = threading.Thread(target=lambda: result.append(PersonaLibrary(folder)), daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert result, "loading the folder hung on a FIFO"
    one_error(result[0], "pipe.yaml", "is not a plain file")


# ---------------------------------------------------------------- 3. images and decompression

def avatar_persona(folder: Path, image: bytes) -> LoadedPersona:
    (folder / "face.png").write_bytes(image)
    (folder / "good.yaml").write_text(GOOD + "avatar: face.png\n")
    return PersonaLibrary(folder).get("good")


@pytest.mark.parametrize("image", [
    png(ztxt(b"Comment", b"x" * 2_000_000)),  # PIL: ValueError, "Decompressed data too large"
    png(width=20000, height=20000),  # PIL: DecompressionBombError
    png(width=5000, height=5000),  # only a warning for PIL; 25 million pixels decoded
    b"\x89PNG\r\n\x1a\nnot a png at all",
])
def test_a_hostile_avatar_gets_the_placeholder_instead_of_breaking_the_tab(folder, image):
    loaded = avatar_persona(folder, image)
    thumb = thumbnail(loaded)
    assert isinstance(thumb, Image.Image) and thumb.size == (160, 160)


def test_a_compressed_text_bomb_in_a_card_is_refused(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png(ztxt(b"Comment", b"\0" * (64 * 2**20)), card_chunk()))  # 64 MiB from 64 KB
    assert path.stat().st_size < 200_000
    with pytest.raises(PersonaError, match="text chunks hold more than 32 MiB"):
        import_card(path)


def test_many_text_chunks_share_one_budget(tmp_path):
    bombs = [ztxt(f"c{i}".encode(), b"\0" * (8 * 2**20)) for i in range(5)]  # 5 x 8 MiB
    with pytest.raises(PersonaError, match="more than 32 MiB"):
        png_text_chunks(png(*bombs), "many.png")


def test_a_card_picture_with_too_many_pixels_is_refused(tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(png(card_chunk(), width=20000, height=20000))
    with pytest.raises(PersonaError, match="20000x20000 pixels"):
        import_card(path)


def test_a_png_cut_before_its_end_is_refused(tmp_path):
    path = tmp_path / "cut.png"
    path.write_bytes(png(card_chunk(), end=False))
    with pytest.raises(PersonaError, match="truncated"):
        import_card(path)
    path.write_bytes(png(card_chunk())[:-6])  # IEND itself cut short
    with pytest.raises(PersonaError, match="truncated"):
        import_card(path)
    path.write_bytes(png(card_chunk()))
    assert import_card(path).persona.name == "Nova"


BILLION_LAUGHS = """\
name: lol
greeting: hi
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
"""


def test_aliases_are_refused_in_cards_and_personas(tmp_path):
    path = tmp_path / "laughs.yaml"
    path.write_text(BILLION_LAUGHS)
    with pytest.raises(PersonaError, match=r"found an alias \(\*a\)"):
        import_card(path)
    with pytest.raises(PersonaError, match="aliases are not allowed"):
        parse_persona(GOOD + "tags: &t [a]\nalternate_greetings: *t\n", "x.yaml")


def test_a_shared_value_is_written_without_an_alias():
    """What import writes must load again, so its writer never uses an anchor for a repeated value."""
    shared = {"k": "v"}
    text = dump_persona_yaml({"name": "n", "system_prompt": "s", "greeting": "g",
                              "extensions": {"a": shared, "b": shared}})
    assert "&id" not in text
    assert parse_persona(text, "x.yaml").extensions == {"a": shared, "b": shared}


# ---------------------------------------------------------------- 4. permissions and downloads

@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield 0o644
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_written_persona_files_get_the_usual_permissions(folder, tmp_path, umask_022, capsys):
    library = PersonaLibrary(folder)
    assert mode(save_persona(library, "good", GOOD + "tags: [x]\n").path) == umask_022
    assert mode(create_persona(library, "fresh").path) == umask_022
    card = tmp_path / "card.png"
    card.write_bytes(png(card_chunk()))
    assert cli_main(["personas", "import", str(card), "--personas-dir", str(folder)]) == 0
    assert mode(folder / "nova.yaml") == umask_022 and mode(folder / "nova.png") == umask_022
    out = tmp_path / "out.json"
    assert cli_main(["personas", "export", "nova", "--out", str(out), "--personas-dir", str(folder)]) == 0
    assert mode(out) == umask_022
    out = tmp_path / "out.png"  # a PNG card
    assert cli_main(["personas", "export", "nova", "--out", str(out), "--personas-dir", str(folder)]) == 0
    assert mode(out) == umask_022 and out.read_bytes().startswith(b"\x89PNG")
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_a_download_is_private_and_old_ones_are_removed(tmp_path):
    cache = tmp_path / "gradio"
    first = history_sidebar.write_download(cache, "conversation-1.json", '{"a": 1}')
    assert first.read_text() == '{"a": 1}' and first.name == "conversation-1.json"
    assert mode(first) == 0o600 and mode(first.parent) == 0o700 and first.parent.parent == cache
    old = history_sidebar.DOWNLOAD_KEEP_SECONDS + 60
    os.utime(first.parent, (first.stat().st_atime - old, first.stat().st_mtime - old))
    second = history_sidebar.write_download(cache, "conversation-1.json", "{}")
    assert not first.parent.exists() and second.exists()


def test_the_download_button_writes_through_write_download(tmp_path, monkeypatch):
    import gradio as gr

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))

    class Service:
        def export_conversation(self, user_id, conversation_id):
            return {"id": conversation_id, "messages": ["hi"]}

    class Who:
        id = 1

    class Identity:
        def current(self, request):
            return Who()

    with gr.Blocks() as app:
        history_sidebar.create(app, Service(), Identity(), gr.State(None), lambda *a: (), [])
    [download] = [f.fn for f in app.fns.values() if f.name == "on_download"]
    path = Path(download(7, None))
    assert json.loads(path.read_text()) == {"id": 7, "messages": ["hi"]}
    assert path.parent.parent == tmp_path / "gradio" and mode(path) == 0o600 and mode(path.parent) == 0o700


# ---------------------------------------------------------------- 5. properties: PersonaError or success

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
YAML_BITS = st.text(alphabet=st.sampled_from(list("[]{}:-&*!|>'\"#%@`,? \n\tabc01.~\\")) | st.characters(),
                    max_size=80)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)
CARD_KEYS = ["name", "first_mes", "description", "personality", "scenario", "mes_example", "creator_notes",
             "system_prompt", "post_history_instructions", "alternate_greetings", "tags", "extensions",
             "character_book", "creator", "context", "greeting", "char_name", "your_name"]
card_like = st.dictionaries(st.sampled_from(CARD_KEYS), json_values, max_size=8)


def loads_or_persona_error(action):
    try:
        action()
    except PersonaError as exc:
        message = str(exc)
        assert message and "\n" not in message, message


@FAST
@given(text=st.one_of(st.text(max_size=200), YAML_BITS,
                      json_values.map(lambda v: yaml.safe_dump({"name": "n", "extensions": {"v": v}}))))
def test_any_text_parses_or_is_a_persona_error(text):
    loads_or_persona_error(lambda: parse_persona(text, "x.yaml"))
    loads_or_persona_error(lambda: parse_persona(GOOD + "extensions:\n  x: " + text, "x.yaml"))


@FAST
@given(data=st.binary(max_size=300))
def test_any_file_loads_or_is_a_persona_error(tmp_path, data):
    path = tmp_path / "any.yaml"
    path.write_bytes(data)
    loads_or_persona_error(lambda: load_persona(path))


@FAST
@given(card=st.one_of(card_like, card_like.map(lambda d: {"spec": "chara_card_v2", "data": d}), json_values))
def test_any_card_imports_or_is_a_persona_error(tmp_path, card):
    for name, text in (("c.json", json.dumps(card)), ("c.yaml", yaml.safe_dump(card))):
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")

        def round_trip():
            result = import_card(path, persona_id="x")
            loaded = LoadedPersona("x", result.persona, result.yaml_text, "v", tmp_path / "x.yaml")
            json.dumps(export_card_v2(loaded))  # what was imported also exports

        loads_or_persona_error(round_trip)


@FAST
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".json", ".yaml", ".png"]))
def test_any_bytes_import_or_are_a_persona_error(tmp_path, data, suffix):
    path = tmp_path / f"c{suffix}"
    path.write_bytes(data)
    loads_or_persona_error(lambda: import_card(path))


@FAST
@given(chunks=st.lists(st.tuples(st.sampled_from([b"tEXt", b"zTXt", b"iTXt", b"IHDR", b"IDAT"]),
                                 st.binary(max_size=60)), max_size=5),
       card=st.booleans(), end=st.booleans())
def test_any_png_imports_or_is_a_persona_error(tmp_path, chunks, card, end):
    path = tmp_path / "c.png"
    extra = [chunk(kind, body) for kind, body in chunks] + ([card_chunk()] if card else [])
    path.write_bytes(png(*extra, end=end))
    loads_or_persona_error(lambda: import_card(path))
