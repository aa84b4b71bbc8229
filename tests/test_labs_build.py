"""The labs builder: markers, student / solution copies, leak and drift checks, the CLI."""

from __future__ import annotations

import textwrap

import nbformat
import pytest

import ftanalysis.labs as labs
from ftanalysis.labs.build import MarkerError, leaked_lines, make_copy, student_source
from ftanalysis.labs.cli import main as labs_cli

GOOD = textwrap.dedent('''\
    # %% [markdown]
    # # Lab 99 · A test lab

    # %%
    import math

    # %%
    def area(r):
        ### BEGIN SOLUTION
        return math.pi * r ** 2
        ### END SOLUTION

    # %% tags=["check"]
    assert abs(area(1.0) - math.pi) < 1e-9

    # %% [markdown] tags=["solution"]
    # The answer is pi r squared.
    ''')


@pytest.fixture()
def lab_dir(tmp_path, monkeypatch):
    (tmp_path / "99_test_lab.py").write_text(GOOD)
    monkeypatch.setenv("FTA_LABS_DIR", str(tmp_path))
    return tmp_path


def test_student_stub_keeps_indentation():
    src = "def f(x):\n    y = 1\n    ### BEGIN SOLUTION\n    return x + y\n    ### END SOLUTION\n"
    assert student_source(src) == "def f(x):\n    y = 1\n    # YOUR CODE HERE\n    raise NotImplementedError()\n"


def test_student_and_solution_copies(lab_dir):
    nb = labs.read_source(labs.find("99"))
    student, solution = make_copy(nb, False), make_copy(nb, True)
    student_text = "\n".join(c.source for c in student.cells)
    assert "math.pi * r ** 2" not in student_text and "raise NotImplementedError()" in student_text
    assert "The answer is pi" not in student_text
    assert "The answer is pi" in "\n".join(c.source for c in solution.cells)
    exercise = [c for c in student.cells if "exercise" in c.metadata.get("tags", [])]
    assert len(exercise) == 1
    assert not leaked_lines(nb, student)


@pytest.mark.parametrize(
    "bad, match",
    [
        (GOOD.replace("    ### END SOLUTION\n", ""), "never closed"),
        (GOOD.replace("    ### BEGIN SOLUTION\n", ""), "without a matching"),
        (GOOD.replace("### BEGIN SOLUTION", "### BEGIN SOLUTION\n    ### BEGIN SOLUTION"), "nested"),
        (GOOD.replace("### END SOLUTION", "### END SOLUTIONS"), "malformed marker"),
        (GOOD.replace('# %% tags=["check"]', "# %%"), "followed by a code cell tagged 'check'"),
    ],
)
def test_malformed_markers_are_clear_errors(lab_dir, bad, match):
    (lab_dir / "99_test_lab.py").write_text(bad)
    with pytest.raises(MarkerError, match=match):
        labs.read_source(labs.find("99"))
    assert labs_cli(["build", "--dest", str(lab_dir / "out")]) == 2


def test_leak_is_detected(lab_dir):
    leaky = GOOD.replace("# %% [markdown]\n# # Lab 99", "# %% [markdown]\n# # Lab 99").replace(
        "# %%\nimport math\n", "# %%\nimport math\n# a copy: return math.pi * r ** 2\n"
    )
    nb = labs.read_source(labs.Lab("99", "test_lab", lab_dir / "99_test_lab.py"))
    student = make_copy(nb, False)
    student.cells[1].source += "\nreturn math.pi * r ** 2"
    assert leaked_lines(nb, student) == ["return math.pi * r ** 2"]
    assert leaky  # the source itself is fine; the leak was planted in the copy


def test_build_check_detects_stale_copies(lab_dir):
    out = lab_dir / "out"
    paths = labs.build(dest=out, check=True)
    assert len(paths) == 2
    assert labs.build(dest=out, check=True)  # fresh copies pass
    stale = nbformat.read(str(out / "99_test_lab_student.ipynb"), as_version=4)
    stale.cells[0].source += " (edited)"
    nbformat.write(stale, str(out / "99_test_lab_student.ipynb"))
    with pytest.raises(MarkerError, match="differs from a fresh build"):
        labs.build(dest=out, check=True)


def test_get_and_overwrite_protection(lab_dir, capsys):
    dest = lab_dir / "students"
    assert labs_cli(["get", "99", "--dest", str(dest)]) == 0
    assert (dest / "99_test_lab_student.ipynb").is_file()
    assert labs_cli(["get", "99", "--dest", str(dest)]) == 2
    assert "--force" in capsys.readouterr().err
    assert labs_cli(["get", "99", "--dest", str(dest), "--force"]) == 0
    assert labs_cli(["get", "99", "--solutions", "--dest", str(dest)]) == 0
    assert (dest / "99_test_lab_solution.ipynb").is_file()


def test_unknown_lab_lists_valid_ones(lab_dir, capsys):
    assert labs_cli(["get", "42"]) == 2
    assert "99_test_lab" in capsys.readouterr().err
    with pytest.raises(ValueError, match="Available labs"):
        labs.find("nope")


def test_list(lab_dir, capsys):
    labs_cli(["list"])
    assert "99  Lab 99 · A test lab" in capsys.readouterr().out


def test_the_real_labs_build_cleanly(tmp_path):
    labs.build(dest=tmp_path, check=True)
    assert len(list(tmp_path.glob("*_student.ipynb"))) == len(labs.available()) == 7
