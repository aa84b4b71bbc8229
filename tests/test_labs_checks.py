"""Every lab check passes on the reference, fails on known-wrong mutants with its hint, and reads a stub as
"not implemented". Lab-specific tests (bad arguments, independent oracles) are in test_labs_checks_<lab>.py."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from ftanalysis.labs.checks import LabCheckFailed, NotImplementedYet

# one mutants module per lab check module: tests/labs/mutants_<lab>.py for ftanalysis/labs/checks/<lab>.py
LAB_MODULES = {p.stem.removeprefix("mutants_"): f"labs.{p.stem}" for p in sorted((Path(__file__).parent / "labs").glob("mutants_*.py"))}


def test_every_check_module_has_mutants():
    import ftanalysis.labs.checks as package

    modules = {p.stem for p in Path(package.__file__).parent.glob("*.py") if not p.stem.startswith("_")}
    assert modules == set(LAB_MODULES), f"check modules {sorted(modules)} vs mutants {sorted(LAB_MODULES)}"


def _cases():
    for lab, mutants_module in LAB_MODULES.items():
        mutants = importlib.import_module(mutants_module)
        for check_name, wrong in mutants.MUTANTS.items():
            for fn, hint in wrong:
                yield lab, check_name, fn, hint


def _check(lab, name):
    return getattr(importlib.import_module(f"ftanalysis.labs.checks.{lab}"), name)


@pytest.mark.parametrize("lab, check_name", sorted({(lab, name) for lab, name, _, _ in _cases()}))
def test_reference_passes(lab, check_name, capsys):
    _check(lab, check_name)()
    assert f"✓ {check_name}" in capsys.readouterr().out


@pytest.mark.parametrize("lab, check_name, mutant, hint", list(_cases()), ids=lambda v: getattr(v, "__name__", str(v))[:30])
def test_mutant_fails_with_hint(lab, check_name, mutant, hint):
    with pytest.raises(LabCheckFailed) as err:
        _check(lab, check_name)(mutant)
    assert not isinstance(err.value, NotImplementedYet)
    assert hint in str(err.value), str(err.value)
    assert "case" in str(err.value)


@pytest.mark.parametrize("lab", sorted(LAB_MODULES))
def test_every_check_has_two_mutants_and_a_stub(lab):
    module = importlib.import_module(f"ftanalysis.labs.checks.{lab}")
    mutants = importlib.import_module(LAB_MODULES[lab])
    checks = sorted(n for n in dir(module) if n.startswith("check_"))
    assert sorted(mutants.MUTANTS) == checks
    assert sorted(mutants.STUBS) == checks
    for name in checks:
        assert len(mutants.MUTANTS[name]) >= 2, f"{lab}.{name} needs two mutants"


@pytest.mark.parametrize(
    "lab, check_name",
    [(lab, n) for lab, module in sorted(LAB_MODULES.items()) for n in sorted(importlib.import_module(module).STUBS)],
)
def test_stub_reads_as_not_implemented(lab, check_name):
    stub = importlib.import_module(LAB_MODULES[lab]).STUBS[check_name]
    with pytest.raises(NotImplementedYet, match="not implemented yet"):
        _check(lab, check_name)(stub)


def test_not_a_function_or_wrong_signature():
    from ftanalysis.labs.checks import lora

    with pytest.raises(TypeError, match="expects a class"):
        lora.check_lora_linear(lambda base, r, alpha, rslora: None)
    with pytest.raises(TypeError, match="expects a function"):
        lora.check_lora_scaling(3)
    with pytest.raises(TypeError, match="lacks \\['rslora'\\]"):
        lora.check_lora_scaling(lambda alpha, r: alpha / r)


def test_failure_renders_without_traceback_in_ipython():
    err = LabCheckFailed("✗ check_x failed on case 1\n  hint: h")
    assert [line.replace("\x1b[31m", "").replace("\x1b[0m", "") for line in err._render_traceback_()] == ["✗ check_x failed on case 1", "  hint: h"]
