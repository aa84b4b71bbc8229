"""Run every lab: the solution copy passes nbval at FTA_SCALE=ci; in the student copy every cell before the
first exercise runs cleanly and every check cell reports "not implemented" (nbgrader's ``validate --invert``)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from nbclient import NotebookClient

import ftanalysis.labs as labs
from ftanalysis.labs.build import CHECK_TAG, EXERCISE_TAG, make_copy, read_source

LABS = labs.available()
ENV = {**os.environ, "FTA_SCALE": "ci"}


@pytest.mark.parametrize("lab", LABS, ids=[lab.name for lab in LABS])
def test_solution_copy_passes_nbval(lab, tmp_path):
    path = labs.get(lab.number, solutions=True, dest=tmp_path)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "--nbval-lax", str(path)],
        capture_output=True, text=True, env=ENV, cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]


@pytest.mark.parametrize("lab", LABS, ids=[lab.name for lab in LABS])
def test_student_copy_runs_until_the_first_exercise_and_checks_say_not_implemented(lab, monkeypatch):
    monkeypatch.setenv("FTA_SCALE", "ci")
    notebook = make_copy(read_source(lab), solutions=False)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", allow_errors=True)
    first_exercise = next(i for i, c in enumerate(notebook.cells) if EXERCISE_TAG in c.metadata.get("tags", []))
    checks_seen = 0
    with client.setup_kernel():
        for index, cell in enumerate(notebook.cells):
            if cell.cell_type != "code":
                continue
            tags = cell.metadata.get("tags", [])
            if index > first_exercise and EXERCISE_TAG not in tags and CHECK_TAG not in tags:
                continue  # later set-up and experiments may need the exercises' results
            client.execute_cell(cell, index)
            errors = [o for o in cell.outputs if o.output_type == "error"]
            if index < first_exercise or EXERCISE_TAG in tags:
                assert not errors, f"cell {index + 1} of the student copy failed: {errors[0].ename}: {errors[0].evalue}"
            else:
                checks_seen += 1
                text = " ".join(o.get("evalue", "") + o.get("text", "") for o in cell.outputs)
                assert "not implemented yet" in text, f"check cell {index + 1} did not report 'not implemented': {text[:300]}"
    assert checks_seen >= 1
