"""The ``ftanalysis`` command line: ``demo``, ``zoo``, ``tasks`` (and the commands later issues add)."""

from __future__ import annotations

import sys


def _zoo(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: ftanalysis zoo {list,pretrain} ...\n  list       the shipped bases\n  pretrain   pretrain a base (see --help)")
        return
    if argv[0] == "list":
        from .zoo import available, read_card, zoo_dir

        for name in available():
            if name == "minilm":
                print("minilm        all-MiniLM-L6-v2 (BERT encoder, 22.7M parameters; needs the 'real' extra)")
                continue
            card = read_card(zoo_dir() / name)
            et = card["evaluation"]["entity_tracking_3"]["accuracy"]
            print(f"{name:13s} {card['parameters']:,} parameters; entity tracking (3 boxes) {et:.3f}")
        return
    if argv[0] == "pretrain":
        from .zoo.pretrain import main

        main(argv[1:])
        return
    raise SystemExit(f"ftanalysis zoo: unknown command {argv[0]!r}; use 'list' or 'pretrain'.")


def _tasks(argv: list[str]) -> None:
    from . import tasks

    for name in tasks.available():
        print(f"{name:20s} {tasks.make(name).describe()[:140]}")


COMMANDS = {
    "demo": ("fine-tune the shipped GPT-2 base two ways and compare (about 2 minutes on a CPU)", "ftanalysis.demo"),
    "zoo": ("list or pretrain the zoo's base models", None),
    "tasks": ("list the procedural tasks with an example each", None),
    "labs": ("teaching labs: list, get a student or solution notebook, build --check", None),
    "spectral": ("intruder dimensions and update spectra of a fine-tune: BASE FT --out DIR", "ftanalysis.probes.spectral_cli"),
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        lines = [f"  {name:10s} {help_}" for name, (help_, _) in COMMANDS.items()]
        print("usage: ftanalysis <command> [options]\n\ncommands:\n" + "\n".join(lines))
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
    else:
        raise SystemExit(f"ftanalysis: unknown command {command!r}. Commands: {sorted(COMMANDS)}.")


if __name__ == "__main__":
    main()
