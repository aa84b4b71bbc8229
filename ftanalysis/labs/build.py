"""Build student and solution notebooks from the labs' single sources.

Each lab has one source, a jupytext percent script ``notebooks/labs/NN_topic.py`` that runs top to bottom as
the solution. Markers, compatible with nbgrader:

- ``### BEGIN SOLUTION`` / ``### END SOLUTION`` inside a code cell: in the student copy the region becomes
  ``# YOUR CODE HERE`` and ``raise NotImplementedError()`` at the indentation of the ``BEGIN`` line.
- a cell tagged ``solution`` appears in the solution copy only (e.g. a written answer);
- a cell tagged ``check`` runs a check from :mod:`ftanalysis.labs.checks`; every exercise cell (one with a
  ``BEGIN SOLUTION`` region) must be followed by one.

The conversion itself is jupytext's (``jupytext.reads``); this module only rewrites cells and validates the
markers. ``build(check=True)`` refuses unbalanced or nested markers, an exercise without a check cell, and
any solution line that leaks into a student copy.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import nbformat

BEGIN = "### BEGIN SOLUTION"
END = "### END SOLUTION"
STUB = ["# YOUR CODE HERE", "raise NotImplementedError()"]
SOLUTION_TAG = "solution"
CHECK_TAG = "check"
EXERCISE_TAG = "exercise"
_LAB_FILE = re.compile(r"^(\d\d)_([a-z0-9_]+)\.py$")


class MarkerError(ValueError):
    """A lab source has malformed solution markers or an exercise without its check."""


@dataclass(frozen=True)
class Lab:
    number: str  # "01"
    slug: str  # "lora_from_scratch"
    path: Path

    @property
    def name(self) -> str:
        return f"{self.number}_{self.slug}"

    @property
    def title(self) -> str:
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if line.startswith("# # "):
                return line[4:].strip()
        return self.slug.replace("_", " ")


def labs_dir() -> Path:
    """Folder of the lab sources: ``$FTA_LABS_DIR`` or ``notebooks/labs`` of the source checkout."""
    env = os.environ.get("FTA_LABS_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "notebooks" / "labs"


def available() -> list[Lab]:
    """The labs, in order."""
    root = labs_dir()
    if not root.is_dir():
        return []
    labs = []
    for path in sorted(root.iterdir()):
        match = _LAB_FILE.match(path.name)
        if match:
            labs.append(Lab(match.group(1), match.group(2), path))
    return labs


def find(lab: str) -> Lab:
    """A lab by number (``"3"``, ``"03"``) or name (``"03_activation_patching"``)."""
    labs = available()
    for candidate in labs:
        if lab in (candidate.number, candidate.name, candidate.slug) or (lab.isdigit() and int(lab) == int(candidate.number)):
            return candidate
    raise ValueError(f"Unknown lab {lab!r}. Available labs: {[x.name for x in labs]}.")


def read_source(lab: Lab) -> nbformat.NotebookNode:
    """The lab's source as a notebook (jupytext percent format), markers validated."""
    import jupytext

    notebook = jupytext.reads(lab.path.read_text(encoding="utf-8"), fmt="py:percent")
    validate(notebook, lab.name)
    return notebook


def _solution_regions(source: str, where: str) -> list[tuple[int, int]]:
    """``[(begin_line, end_line)]`` of the solution regions of one cell (0-based line numbers)."""
    regions, open_at = [], None
    for i, line in enumerate(source.split("\n")):
        stripped = line.strip()
        if stripped == BEGIN:
            if open_at is not None:
                raise MarkerError(f"{where}, line {i + 1}: nested '{BEGIN}' (the previous one opened at line {open_at + 1}).")
            open_at = i
        elif stripped == END:
            if open_at is None:
                raise MarkerError(f"{where}, line {i + 1}: '{END}' without a matching '{BEGIN}'.")
            regions.append((open_at, i))
            open_at = None
        elif BEGIN.lower() in stripped.lower() or END.lower() in stripped.lower():
            raise MarkerError(f"{where}, line {i + 1}: malformed marker {stripped!r}; write exactly '{BEGIN}' / '{END}'.")
    if open_at is not None:
        raise MarkerError(f"{where}, line {open_at + 1}: '{BEGIN}' is never closed by '{END}'.")
    return regions


def validate(notebook: nbformat.NotebookNode, name: str = "lab") -> None:
    """Raise :class:`MarkerError` for malformed markers or an exercise cell not followed by a check cell."""
    cells = notebook.cells
    for index, cell in enumerate(cells):
        where = f"{name}, cell {index + 1}"
        if cell.cell_type != "code":
            if BEGIN in cell.source or END in cell.source:
                raise MarkerError(f"{where}: solution markers belong in code cells; tag a markdown answer 'solution' instead.")
            continue
        regions = _solution_regions(cell.source, where)
        if regions:
            if SOLUTION_TAG in cell.metadata.get("tags", []):
                raise MarkerError(f"{where}: a cell tagged 'solution' is already hidden from students; remove its markers.")
            following = [c for c in cells[index + 1 :] if c.cell_type == "code"]
            if not following or CHECK_TAG not in following[0].metadata.get("tags", []):
                raise MarkerError(f"{where}: an exercise must be followed by a code cell tagged 'check'.")


def student_source(source: str) -> str:
    """The student version of one code cell: each solution region replaced by the stub."""
    lines = source.split("\n")
    regions = _solution_regions(source, "cell")
    out, cursor = [], 0
    for begin, end in regions:
        out.extend(lines[cursor:begin])
        indent = re.match(r"\s*", lines[begin]).group(0)
        out.extend(indent + stub for stub in STUB)
        cursor = end + 1
    out.extend(lines[cursor:])
    return "\n".join(out)


def make_copy(notebook: nbformat.NotebookNode, solutions: bool) -> nbformat.NotebookNode:
    """A new notebook: the solution copy (every cell) or the student copy (stubs, no 'solution' cells)."""
    cells = []
    for cell in notebook.cells:
        tags = list(cell.metadata.get("tags", []))
        if not solutions and SOLUTION_TAG in tags:
            continue
        new = nbformat.v4.new_code_cell(cell.source) if cell.cell_type == "code" else nbformat.v4.new_markdown_cell(cell.source)
        if cell.cell_type == "code" and _solution_regions(cell.source, "cell"):
            tags = sorted(set(tags) | {EXERCISE_TAG})
            if not solutions:
                new.source = student_source(cell.source)
        if tags:
            new.metadata["tags"] = tags
        cells.append(new)
    copy = nbformat.v4.new_notebook(cells=cells)
    copy.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    copy.metadata["language_info"] = {"name": "python"}
    return copy


def leaked_lines(notebook: nbformat.NotebookNode, student: nbformat.NotebookNode) -> list[str]:
    """Solution lines (of 12+ characters, not shared with non-solution code) found in the student copy."""
    solution_lines, public_lines = set(), set()
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        lines = cell.source.split("\n")
        inside = set()
        for begin, end in _solution_regions(cell.source, "cell"):
            inside.update(range(begin + 1, end))
        hidden = SOLUTION_TAG in cell.metadata.get("tags", [])
        for i, line in enumerate(lines):
            (solution_lines if (i in inside or hidden) else public_lines).add(line.strip())
    secret = {line for line in solution_lines - public_lines if len(line) >= 12 and not line.startswith("#")}
    found = []
    for cell in student.cells:
        for line in cell.source.split("\n"):
            if line.strip() in secret:
                found.append(line.strip())
    return found


def write(notebook: nbformat.NotebookNode, path: Path, force: bool = False) -> Path:
    """Write a notebook atomically; refuse to overwrite unless ``force``."""
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass --force (force=True) to overwrite it.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    nbformat.write(notebook, str(tmp))
    os.replace(tmp, path)
    return path


def get(lab: str, solutions: bool = False, dest: str | Path = ".", force: bool = False) -> Path:
    """Write one lab's student (or solution) notebook into ``dest``; returns its path."""
    found = find(lab)
    notebook = read_source(found)
    kind = "solution" if solutions else "student"
    return write(make_copy(notebook, solutions), Path(dest) / f"{found.name}_{kind}.ipynb", force=force)


def build(dest: str | Path | None = None, check: bool = False) -> list[Path]:
    """(Re)build every lab's student and solution copy into ``dest`` (default: ``notebooks/labs/build/``,
    git-ignored).

    With ``check=True``, fail on solution lines that leak into a student copy and on existing copies in
    ``dest`` (e.g. committed ones) whose cells differ from a fresh build; those are left as they are.
    Malformed markers always fail.
    """
    dest = Path(dest) if dest is not None else labs_dir() / "build"
    written, problems = [], []
    for lab in available():
        notebook = read_source(lab)
        for solutions in (False, True):
            copy = make_copy(notebook, solutions)
            if not solutions and check:
                leaks = leaked_lines(notebook, copy)
                if leaks:
                    problems.append(f"{lab.name}: solution lines leak into the student copy: {leaks[:3]}")
            path = dest / f"{lab.name}_{'solution' if solutions else 'student'}.ipynb"
            if check and path.exists():
                existing = nbformat.read(str(path), as_version=4)
                if [(c.cell_type, c.source) for c in existing.cells] != [(c.cell_type, c.source) for c in copy.cells]:
                    problems.append(f"{path} differs from a fresh build of {lab.path.name}: run 'ftanalysis labs build'.")
                    continue
            written.append(write(copy, path, force=True))
    if problems:
        raise MarkerError("\n".join(problems))
    return written
