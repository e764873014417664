"""docs/cli.md is what the argparse parsers say, and the command table is what `main` dispatches on."""

from pathlib import Path

from chatbot.cli import COMMANDS, build_parser
from chatbot.cli.reference import REGENERATE, render

REPO = Path(__file__).resolve().parent.parent


def test_cli_reference_is_up_to_date():
    stored = (REPO / "docs" / "cli.md").read_text(encoding="utf-8")
    assert stored == render(), f"docs/cli.md is stale: run `{REGENERATE}` (or `make cli-docs`)"


def test_the_reference_lists_every_command_and_subcommand():
    text = render()
    for name in COMMANDS:
        assert f"## `persona-studio {name}`" in text
    for sub in ("personas import", "align evaluate", "models canary-status", "users api-key", "feedback stats"):
        assert f"## `persona-studio {sub}`" in text


def test_every_command_is_dispatched_from_the_table():
    parser = build_parser()
    names = next(a for a in parser._actions if a.dest == "command").choices
    assert list(names) == list(COMMANDS)
    for module in COMMANDS.values():
        assert callable(module.add_parser) and callable(module.run)


def test_the_module_docstring_lists_every_command():
    import chatbot.cli

    for name in COMMANDS:
        assert f"persona-studio {name} " in chatbot.cli.__doc__
