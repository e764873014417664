"""`persona-studio personas ...` as a user runs it (`main(argv)` in this process): real files, no model."""

import base64
import json
from pathlib import Path

import pytest
from cli_helpers import run_cli
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from chatbot.personas import PersonaLibrary, load_persona

REPO = Path(__file__).resolve().parent.parent
GOOD = "name: Tester\nsystem_prompt: You test.\ngreeting: Hi!\ntags: [qa]\n"
CARD = {"spec": "chara_card_v2", "spec_version": "2.0", "data": {
    "name": "Nova Vale", "description": "{{char}} is a ship's navigator.", "personality": "calm",
    "scenario": "", "first_mes": "Course plotted, {{user}}.",
    "mes_example": "<START>\n{{user}}: Where to?\n{{char}}: The stars.",
    "creator_notes": "A navigator.", "system_prompt": "", "post_history_instructions": "",
    "alternate_greetings": [], "tags": ["space"], "creator": "me", "character_version": "1",
    "extensions": {"world": "Orion"}}}


@pytest.fixture
def run():
    """`persona-studio personas ARGS [--personas-dir FOLDER]`, in this process."""
    def personas(*args, folder: Path | None = None):
        extra = ["--personas-dir", str(folder)] if folder is not None else []
        return run_cli("personas", *args, *extra)
    return personas


@pytest.fixture
def folder(tmp_path) -> Path:
    folder = tmp_path / "personas"
    folder.mkdir()
    (folder / "tester.yaml").write_text(GOOD)
    return folder


def test_list_shows_personas_then_errors(folder, run):
    (folder / "broken.yaml").write_text("name: Broken\ngreeting: Hi\n")
    done = run("list", folder=folder)
    assert done.returncode == 0, done.stderr
    header, row, *rest = done.stdout.splitlines()
    assert header.split() == ["ID", "NAME", "VERSION", "TAGS"]
    assert row.split()[:2] == ["tester", "Tester"] and row.split()[-1] == "qa"
    assert load_persona(folder / "tester.yaml").version in row
    errors = "\n".join(rest)
    assert "1 file(s) failed to load" in errors and "broken.yaml: system_prompt: Field required" in errors


def test_validate_fails_on_a_broken_file_and_names_it(folder, run):
    (folder / "broken.yaml").write_text(GOOD + "colour: red\n")
    (folder / "stray.yml").write_text(GOOD)
    done = run("validate", folder=folder)
    assert done.returncode == 1
    assert "broken.yaml: colour: Extra inputs are not permitted" in done.stderr
    assert "stray.yml: ignored" in done.stderr
    one = run("validate", str(folder / "broken.yaml"))
    assert one.returncode == 1 and "broken.yaml: colour" in one.stderr
    assert run("validate", str(folder / "tester.yaml")).returncode == 0


def test_validate_passes_on_the_shipped_personas(run):
    done = run("validate", str(REPO / "personas"))
    assert done.returncode == 0, done.stderr
    assert "0 error(s)" in done.stdout


def test_new_writes_a_valid_template_and_refuses_bad_or_taken_ids(folder, run):
    done = run("new", "space_cat", folder=folder)
    assert done.returncode == 0, done.stderr
    path = folder / "space_cat.yaml"
    assert load_persona(path).persona.name == "Space Cat"
    assert path.read_text().count("#") > 5  # the template explains its fields
    before = path.read_text()
    taken = run("new", "space_cat", folder=folder)
    assert taken.returncode == 1 and "already exists" in taken.stderr and path.read_text() == before
    bad = run("new", "../x", folder=folder)
    assert bad.returncode == 1 and "not a safe file name" in bad.stderr
    assert not (folder.parent / "x.yaml").exists()


def test_import_png_writes_persona_and_avatar_and_reports(folder, tmp_path, run):
    info = PngInfo()
    info.add_text("chara", base64.b64encode(json.dumps(CARD).encode()).decode())
    source = tmp_path / "nova.png"
    Image.new("RGB", (3, 3), (1, 2, 3)).save(source, pnginfo=info)
    done = run("import", str(source), folder=folder)
    assert done.returncode == 0, done.stderr
    assert "as persona 'nova_vale'" in done.stdout
    assert "data.first_mes" in done.stdout and "-> greeting" in done.stdout
    assert "data.extensions" in done.stdout and "-> extensions.extensions" in done.stdout
    loaded = PersonaLibrary(folder).get("nova_vale")
    assert loaded.persona.greeting == "Course plotted, {{user}}."
    assert loaded.avatar_path == folder / "nova_vale.png" and loaded.avatar_path.is_file()
    # Again: refused without --force, the file untouched; --force and --id both work.
    again = run("import", str(source), folder=folder)
    assert again.returncode == 1 and "--force" in again.stderr
    assert run("import", str(source), "--force", folder=folder).returncode == 0
    assert run("import", str(source), "--id", "nova2", folder=folder).returncode == 0
    assert load_persona(folder / "nova2.yaml").persona.avatar == "nova2.png"


def test_import_error_is_one_line(folder, tmp_path, run):
    source = tmp_path / "empty.json"
    source.write_text(json.dumps({**CARD, "data": {**CARD["data"], "first_mes": ""}}))
    done = run("import", str(source), folder=folder)
    assert done.returncode == 1
    assert done.stderr.strip() == (f"persona-studio: error: {source}: "
                                   "data.first_mes: empty; a persona needs a greeting")
    assert sorted(p.name for p in folder.iterdir()) == ["tester.yaml"]


def test_export_to_stdout_and_file(folder, tmp_path, run):
    done = run("export", "tester", folder=folder)
    assert done.returncode == 0, done.stderr
    card = json.loads(done.stdout)
    assert card["spec"] == "chara_card_v2" and card["data"]["name"] == "Tester"
    assert card["data"]["system_prompt"] == "You test." and card["data"]["first_mes"] == "Hi!"
    out = tmp_path / "tester.card.json"
    assert run("export", "tester", "--out", str(out), folder=folder).returncode == 0
    assert json.loads(out.read_text()) == card
    # What was exported imports back to the same persona.
    assert run("import", str(out), "--id", "tester_copy", folder=folder).returncode == 0
    assert load_persona(folder / "tester_copy.yaml").persona == load_persona(folder / "tester.yaml").persona
    missing = run("export", "nobody", folder=folder)
    assert missing.returncode == 1 and "no persona 'nobody'" in missing.stderr


def test_personas_dir_from_the_environment_and_before_the_subcommand(folder, monkeypatch, run):
    monkeypatch.setenv("PERSONA_STUDIO_PERSONAS_DIR", str(folder))
    assert run("list").stdout.splitlines()[1].startswith("tester")
    done = run("--personas-dir", str(folder / "missing"), "list")
    assert done.returncode == 1 and "does not exist" in done.stderr
