"""The command line and the demo."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from ftanalysis.cli import main


def test_help_lists_commands(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    assert "demo" in out and "zoo" in out


def test_no_command_prints_help_to_stderr_and_fails(capsys):
    import pytest

    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert "usage: ftanalysis" in captured.err and "merge" in captured.err and captured.out == ""


def test_zoo_list_and_tasks(capsys):
    main(["zoo", "list"])
    out = capsys.readouterr().out
    assert "gpt2-tiny" in out and "minilm" in out
    main(["tasks"])
    assert "entity_tracking" in capsys.readouterr().out


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "ftanalysis.cli", "--help"], capture_output=True, text=True, check=True)
    assert "usage: ftanalysis" in out.stdout


def test_demo_runs_small_and_writes_table_and_figure(tmp_path):
    from ftanalysis.demo import run_demo

    table = run_demo(steps=4, eval_n=32, out=tmp_path, progress=False)
    assert isinstance(table, pd.DataFrame) and len(table) == 2
    assert {"trainable params", "task acc before", "task acc after", "mix acc before", "mix acc after", "seconds"} <= set(table.columns)
    assert (tmp_path / "demo_training_curves.png").stat().st_size > 1000
    assert table["trainable params"].iloc[1] < table["trainable params"].iloc[0]


@pytest.mark.parametrize("command", [[], ["spectral"], ["compare"], ["merge"], ["zoo"], ["labs"], ["tasks"]])
def test_help_does_not_import_torch(command):
    """``import ftanalysis`` and its subpackages are lazy (PEP 562): ``ftanalysis [command] --help`` answers without
    loading torch or transformers."""
    code = (f"import sys\nfrom ftanalysis.cli import main\ntry:\n    main({command + ['--help']!r})\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "usage:" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_lazy_package_attributes():
    import ftanalysis as fta

    assert fta.finetune is fta.train.finetune and fta.load_model is fta.zoo.loading.load_model
    assert "probes" in dir(fta)
    import pytest

    with pytest.raises(AttributeError, match="has no attribute 'finetunes'"):
        _ = fta.finetunes


def test_lazy_subpackages_give_names_and_submodules():
    """``fta.probes`` and ``fta.merging`` import on first use, and still give what the eager packages gave: public
    names, submodules as attributes, and ``calibration`` the function even after its submodule was imported."""
    code = (
        "import types, ftanalysis as fta, ftanalysis.probes.calibration as m\n"
        "assert isinstance(m, types.FunctionType) and fta.probes.calibration is m\n"
        "from ftanalysis.probes.calibration import expected_calibration_error\n"
        "assert fta.probes.calibration.__name__ == 'calibration' and callable(fta.probes.calibration)\n"
        "assert fta.probes.spectral.__name__ == 'ftanalysis.probes.spectral' and fta.merging.ties.__name__ == 'ftanalysis.merging.ties'\n"
        "assert fta.merging.TIES is fta.merging.ties.TIES and fta.probes.graft is fta.probes.localization.graft\n"
        "try:\n    fta.merging.nope\nexcept AttributeError:\n    print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
