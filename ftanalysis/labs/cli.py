"""``ftanalysis labs list | get | build``."""

from __future__ import annotations

import argparse
import sys

from .build import MarkerError, available, build, get


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ftanalysis labs", description="Teaching labs: student and solution notebooks.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the labs")
    get_parser = sub.add_parser("get", help="write one lab's student (or solution) notebook")
    get_parser.add_argument("lab", help="lab number or name, e.g. 01")
    get_parser.add_argument("--solutions", action="store_true", help="the solution copy instead of the student copy")
    get_parser.add_argument("--dest", default=".", help="destination folder (default: current folder)")
    get_parser.add_argument("--force", action="store_true", help="overwrite an existing notebook")
    build_parser = sub.add_parser("build", help="rebuild every student and solution copy")
    build_parser.add_argument("--dest", default=None, help="output folder (default: notebooks/labs/build)")
    build_parser.add_argument("--check", action="store_true", help="fail on leaks, malformed markers or stale copies")
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            for lab in available():
                print(f"{lab.number}  {lab.title}")
        elif args.command == "get":
            print(get(args.lab, solutions=args.solutions, dest=args.dest, force=args.force))
        else:
            paths = build(dest=args.dest, check=args.check)
            print(f"built {len(paths)} notebooks" + (" (checked: markers balanced, no solution leaks, copies fresh)" if args.check else ""))
    except (ValueError, FileExistsError, MarkerError) as err:
        print(f"ftanalysis labs: {err}", file=sys.stderr)
        return 2
    return 0
