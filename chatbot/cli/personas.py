"""`persona-studio personas ...`: manage the persona files without starting the app.

    persona-studio personas list                      id, name, version, tags; then the broken files
    persona-studio personas validate [PATH]           a file or folder; exit 1 on any error (for CI)
    persona-studio personas new ID                    a commented template to edit
    persona-studio personas import FILE [--id ID] [--force]
                                                      Card V1/V2/V3 (JSON or PNG), text-generation-webui YAML
    persona-studio personas export ID [--out FILE] [--format v2|v3|png]
                                                      a card: V2 JSON to stdout by default; a PNG card
                                                      (the avatar with `chara` and `ccv3` chunks) to --out
    persona-studio personas lorebook ID FILE [--replace]
                                                      attach a SillyTavern world info JSON (or a card's
                                                      character_book) to a persona's lorebook
    persona-studio personas lore ID "MESSAGE"         which lorebook entries would fire for a message
    persona-studio personas index ID [--force]        chunk and embed the persona's knowledge documents
    persona-studio personas search ID "QUERY" [-k N]  the passages its documents hold for a message

Every subcommand takes --personas-dir (or PERSONA_STUDIO_PERSONAS_DIR). Only `index`
and `search` open the database (--db-url, --data-dir: the documents' index lives
there) and load a model (the small embedding model); nothing here loads the chat model. Failures print one `persona-studio: error: ...`
line and exit with status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..knowledge.lorebook import Lorebook
from ..knowledge.world_info import lorebook_from_world_info
from ..persona_cards import export_card_png, export_card_v2, export_card_v3, import_card
from ..persona_files import create_persona, save_persona, update_persona_text
from ..prompting import estimate_tokens
from ..personas import (
    PersonaError,
    PersonaLibrary,
    atomic_write,
    atomic_write_text,
    check_id,
    load_persona,
    lore_for_message,
    read_plain_text,
    safe_json,
)
from .errors import EXIT_FAILED, CommandError
from .options import STORE, print_table, setting_options, settings


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `personas` and its subcommands on the main parser's subparsers."""
    parser = subparsers.add_parser("personas", help="list, validate, create, import and export personas",
                                   description=__doc__.split("\n\n")[0])
    common = setting_options(["personas_dir"], group=parser)  # before or after the subcommand
    commands = parser.add_subparsers(dest="personas_command", required=True, metavar="COMMAND")
    commands.add_parser("list", parents=[common], help="id, name, version and tags of each persona")
    validate = commands.add_parser("validate", parents=[common],
                                   help="check persona files; exit 1 on any error")
    validate.add_argument("path", nargs="?", type=Path,
                          help="a persona file or folder (default: the personas folder)")
    new = commands.add_parser("new", parents=[common], help="write a commented template persona")
    new.add_argument("id", help="persona id: the file name without .yaml")
    imp = commands.add_parser("import", parents=[common],
                              help="import a character card (JSON or PNG, V1 to V3) "
                                   "or a text-generation-webui YAML")
    imp.add_argument("file", type=Path)
    imp.add_argument("--id", default=None, help="persona id (default: from the character's name)")
    imp.add_argument("--force", action="store_true", help="overwrite an existing persona of that id")
    export = commands.add_parser("export", parents=[common], help="write a persona as a character card")
    export.add_argument("id")
    export.add_argument("--out", type=Path, default=None, help="file to write (default: stdout)")
    export.add_argument("--format", choices=("v2", "v3", "png"), default=None,
                        help="v2 or v3 JSON, or a PNG card (default: png when --out ends in .png, else v2)")
    book = commands.add_parser("lorebook", parents=[common],
                               help="attach a world info JSON (SillyTavern) or character_book to a persona")
    book.add_argument("id")
    book.add_argument("file", type=Path)
    book.add_argument("--replace", action="store_true",
                      help="replace the persona's lorebook (default: add the entries to it)")
    lore = commands.add_parser("lore", parents=[common], help="which lorebook entries would fire for a message")
    lore.add_argument("id")
    lore.add_argument("message")
    lore.add_argument("--user", default="User", help="the name {{user}} stands for (default: User)")
    store = setting_options(STORE)
    index = commands.add_parser("index", parents=[common, store],
                                help="chunk and embed a persona's knowledge documents (only what changed)")
    index.add_argument("id")
    index.add_argument("--force", action="store_true", help="look at every file again, even if unchanged")
    search = commands.add_parser("search", parents=[common, store],
                                 help="the passages a persona's documents hold for a message, by meaning")
    search.add_argument("id")
    search.add_argument("query")
    search.add_argument("-k", type=int, default=None, metavar="N",
                        help="how many passages (default: the persona's knowledge top_k)")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run one `personas` subcommand; returns the exit status."""
    handler = {"list": _list, "validate": _validate, "new": _new, "import": _import,
               "export": _export, "lorebook": _attach_lorebook, "lore": _lore, "index": _index,
               "search": _search}[args.personas_command]
    folder = Path(settings(args).personas_dir)
    try:
        return handler(args, folder)
    except (PersonaError, OSError) as exc:
        message = f"{exc.filename}: {exc.strerror}" if isinstance(exc, OSError) and exc.filename else exc
        raise CommandError(message) from None


def _list(args, folder: Path) -> int:
    library = PersonaLibrary(folder)
    rows = [("ID", "NAME", "VERSION", "TAGS")]
    rows += [(p.id, p.persona.name, p.version, ", ".join(p.persona.tags)) for p in library.personas.values()]
    print_table(rows)
    if library.errors:
        print(f"\n{len(library.errors)} file(s) failed to load:")
        for problem in library.errors:
            print(f"  {problem}")
    return 0


def _validate(args, folder: Path) -> int:
    target = args.path or folder
    if target.is_dir():
        library = PersonaLibrary(target)
        count, errors = len(library.personas), list(library.errors)
        # A persona file must end in .yaml; say so rather than skip a .yml silently.
        errors += [f"{path}: ignored: persona files must end in .yaml"
                   for path in sorted(target.glob("*.yml"))]
    else:
        try:
            load_persona(target)
            count, errors = 1, []
        except PersonaError as exc:
            count, errors = 0, [str(exc)]
    for problem in errors:
        print(problem, file=sys.stderr)
    print(f"{count} persona(s) valid, {len(errors)} error(s) in {target}")
    # Not a CommandError: the problems are already listed, one per line, for CI logs.
    return EXIT_FAILED if errors else 0


def _require_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise PersonaError(f"personas folder {folder} does not exist")


def _new(args, folder: Path) -> int:
    _require_folder(folder)
    loaded = create_persona(PersonaLibrary(folder), args.id)
    print(f"wrote {loaded.path}")
    return 0


def _import(args, folder: Path) -> int:
    _require_folder(folder)
    result = import_card(args.file, persona_id=args.id)
    path = folder / f"{result.persona_id}.yaml"
    targets = [path] + ([folder / result.avatar_name] if result.avatar_name else [])
    existing = [str(t) for t in targets if t.exists()]
    if existing and not args.force:
        raise PersonaError(f"{' and '.join(existing)} already {'exist' if len(existing) > 1 else 'exists'}; "
                           "use --force to overwrite or --id to import under another id")
    if result.avatar is not None:  # first, so the persona never points at a missing image
        atomic_write(folder / result.avatar_name, result.avatar)
    atomic_write_text(path, result.yaml_text)
    load_persona(path)
    print(f"imported {args.file} ({result.source_format}) as persona {result.persona_id!r}: {path}")
    if result.avatar_name:
        print(f"avatar: {folder / result.avatar_name}")
    width = max((len(source) for source, _ in result.mapping), default=0)
    for source, target in result.mapping:
        print(f"  {source.ljust(width)} -> {target}")
    return 0


def _load(folder: Path, persona_id: str):
    path = folder / f"{check_id(persona_id)}.yaml"
    if not path.is_file():
        raise PersonaError(f"no persona {persona_id!r} in {folder} (no file {path.name})")
    return load_persona(path)


def _export(args, folder: Path) -> int:
    loaded = _load(folder, args.id)
    kind = args.format or ("png" if args.out is not None and args.out.suffix.lower() == ".png" else "v2")
    if kind == "png":
        if args.out is None:
            raise PersonaError("a PNG card is written to a file: give --out FILE.png")
        atomic_write(args.out, export_card_png(loaded))
        print(f"wrote {args.out}", file=sys.stderr)
        return 0
    card = export_card_v3(loaded) if kind == "v3" else export_card_v2(loaded)
    text = json.dumps(card, ensure_ascii=False, indent=2) + "\n"
    if args.out is None:
        sys.stdout.write(text)
    else:
        atomic_write_text(args.out, text)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _attach_lorebook(args, folder: Path) -> int:
    library = PersonaLibrary(folder)
    loaded = library.get(check_id(args.id))
    where = str(args.file)
    book = lorebook_from_world_info(safe_json(read_plain_text(args.file, 8 * 1024 * 1024), where), where)
    current = loaded.persona.lorebook
    if current is not None and not args.replace:
        book = current.model_copy(update={"entries": [*current.entries, *book.entries]})
    text = update_persona_text(loaded.text, {"lorebook": book.model_dump(exclude_defaults=True)})
    saved = save_persona(library, loaded.id, text)
    print(f"{loaded.id}: lorebook has {len(saved.persona.lorebook.entries)} entries "
          f"({len(book.entries) - (0 if current is None or args.replace else len(current.entries))} from {where})")
    return 0


def _lore(args, folder: Path) -> int:
    loaded = _load(folder, args.id)
    book = loaded.persona.lorebook or Lorebook()
    result = lore_for_message(loaded, args.message, args.user)
    rows = [("ENTRY", "NAME", "FIRED ON", "PLACE")]
    rows += [(str(f.index), f.label, f.key if f.key is not None else "(constant)", f.place) for f in result.fired]
    rows += [(str(f.index), f.label, "left out: over the token budget", f.position) for f in result.over_budget]
    if len(rows) == 1:
        print(f"no entry of {loaded.id}'s lorebook fires for that message ({len(book.entries)} entries)")
        return 0
    print_table(rows)
    return 0


def _knowledge(args, folder: Path):
    """(persona, its knowledge settings, the index service over the store's database)."""
    from ..knowledge.retrieval import PersonaKnowledge
    from ..startup import check_data_dir

    loaded = _load(folder, args.id)
    if loaded.persona.knowledge is None:
        raise PersonaError(f"persona {args.id!r} has no knowledge: documents (add `knowledge: {{files: [...]}}`)")
    config = settings(args)
    if not config.db_url:
        check_data_dir(config.data_dir)
    return loaded, PersonaKnowledge(config.database_url, folder)  # a URL: the index brings the schema up to date


def _index(args, folder: Path) -> int:
    loaded, knowledge = _knowledge(args, folder)

    def progress(done: int, total: int, path: str) -> None:
        if path:
            print(f"[{done + 1}/{total}] {path}", file=sys.stderr, flush=True)

    try:
        report = knowledge.ensure_indexed(loaded.id, loaded.persona.knowledge.files, progress, force=True)
    finally:
        knowledge.close()
    for problem in report.errors:
        print(f"warning: {problem}", file=sys.stderr)
    print(f"{loaded.id}: {len(report.added)} added, {len(report.updated)} updated, {len(report.removed)} removed, "
          f"{len(report.skipped)} unchanged; {report.chunks_embedded} chunks embedded"
          + (f"; {len(report.errors)} file(s) refused" if report.errors else ""))
    return EXIT_FAILED if report.errors else 0


def _search(args, folder: Path) -> int:
    loaded, knowledge = _knowledge(args, folder)
    config = loaded.persona.knowledge
    if args.k is not None:
        if not 1 <= args.k <= 50:
            raise PersonaError(f"-k {args.k}: give 1 to 50")
        config = config.model_copy(update={"top_k": args.k, "token_budget": 10**6})
    try:
        found = knowledge.retrieve(loaded.id, config, args.query, estimate_tokens)
    finally:
        knowledge.close()
    if found.error:
        raise PersonaError(f"cannot search {loaded.id}'s documents: {found.error}")
    if not found.used:
        print(f"no passage of {loaded.id}'s documents scores {config.min_score} or more for that message")
        return 0
    for hit in found.used:
        print(f"{hit.score:.3f}  {hit.citation}")
        print("       " + " ".join(hit.text.split())[:300])
    return 0
