"""The machinery every lab check shares: argument validation, seeded cases, comparison, reporting.

A check compares a student's function or class with the library (or a closed form) on a few seeded cases.

- The expected value never comes from the student's output.
- The reference runs on the student's device and dtype (the expected tensor is moved to them).
- Success prints one line: ``✓ check_x: 5/5 cases passed``.
- Failure raises :class:`LabCheckFailed` on the first mismatch, naming the case, the tensor, the largest
  error with its index, expected vs got, and a targeted hint. In Jupyter it renders as that message alone
  (no traceback), through IPython's ``_render_traceback_`` protocol.
- A stub that still raises ``NotImplementedError`` gives :class:`NotImplementedYet`: "not implemented yet".
- Called with no argument, a check runs on the reference implementation (so the same check tests itself).
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Any, Callable, Iterable

import torch

Hint = Callable[[torch.Tensor, torch.Tensor, dict], "str | None"]


class LabCheckFailed(AssertionError):
    """A lab check found a mismatch (the message says where and gives a hint)."""

    def _render_traceback_(self) -> list[str]:  # IPython: show the message, not a traceback
        return [f"\x1b[31m{line}\x1b[0m" for line in str(self).splitlines()]


class NotImplementedYet(LabCheckFailed):
    """The exercise still raises ``NotImplementedError``."""


def resolve(student: Any, reference: Any, check_name: str, kind: str, parameters: list[str]) -> Any:
    """The object to check: the student's (validated) or, if ``None``, the reference.

    ``kind`` is ``"function"`` or ``"class"``; ``parameters`` are the names the signature must accept (for a
    class, of ``__init__`` after ``self``).
    """
    if student is None:
        return reference
    if kind == "class" and not inspect.isclass(student):
        raise TypeError(f"{check_name} expects a class (pass the class itself, not an instance). Got {type(student).__name__}.")
    if kind == "function" and (inspect.isclass(student) or not callable(student)):
        raise TypeError(f"{check_name} expects a function. Got {student!r}.")
    target = student.__init__ if kind == "class" else student
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return student
    names = [p for p in signature.parameters if p != "self"]
    has_var = any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in signature.parameters.values())
    missing = [p for p in parameters if p not in names]
    if missing and not has_var:
        raise TypeError(
            f"{check_name}: the signature {getattr(student, '__name__', student)}{signature} lacks {missing}; "
            f"the exercise asks for parameters {parameters}."
        )
    return student


def describe(case: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in case.items() if not isinstance(v, torch.Tensor))


class Check:
    """Runs the cases of one check; use through :func:`running`."""

    def __init__(self, name: str):
        self.name = name
        self.passed = 0
        self.total = 0

    def cases(self, cases: Iterable[dict]) -> Iterable[dict]:
        cases = list(cases)
        self.total = len(cases)
        for index, case in enumerate(cases):
            self.index = index
            yield case
            self.passed += 1

    def fail(self, case: dict, message: str, hint: str | None = None) -> None:
        lines = [f"✗ {self.name} failed on case {self.index + 1} of {self.total} ({describe(case)})", f"  {message}"]
        if hint:
            lines.append(f"  hint: {hint}")
        raise LabCheckFailed("\n".join(lines))

    def compare(
        self,
        what: str,
        expected,
        got,
        case: dict,
        atol: float = 1e-5,
        rtol: float = 1e-4,
        hints: Iterable[Hint] = (),
    ) -> None:
        """Compare two tensors (or numbers); on mismatch fail with the largest error and the first hint that applies."""
        got_t = torch.as_tensor(got.detach() if isinstance(got, torch.Tensor) else got)
        exp_t = torch.as_tensor(expected.detach() if isinstance(expected, torch.Tensor) else expected)
        exp_t = exp_t.to(device=got_t.device, dtype=got_t.dtype if got_t.is_floating_point() else exp_t.dtype)
        if tuple(got_t.shape) != tuple(exp_t.shape):
            self.fail(case, f"{what}: expected shape {tuple(exp_t.shape)}, got {tuple(got_t.shape)}",
                      _first_hint(hints, exp_t, got_t, case))
        if got_t.is_floating_point() or exp_t.is_floating_point():
            if not torch.isfinite(got_t).all():
                self.fail(case, f"{what}: your result contains NaN or inf", _first_hint(hints, exp_t, got_t, case))
            if torch.allclose(got_t.float(), exp_t.float(), atol=atol, rtol=rtol):
                return
        elif torch.equal(got_t, exp_t):
            return
        error = (got_t.float() - exp_t.float()).abs()
        flat = int(error.argmax()) if error.numel() else 0
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), error.shape)) if error.dim() else ()
        message = (
            f"{what}: largest error {float(error.max()):.3g} at index {index}: "
            f"expected {float(exp_t.reshape(-1)[flat]):.6g}, got {float(got_t.reshape(-1)[flat]):.6g}"
        )
        self.fail(case, message, _first_hint(hints, exp_t, got_t, case))

    def require(self, condition: bool, case: dict, message: str, hint: str | None = None) -> None:
        if not condition:
            self.fail(case, message, hint)


def _first_hint(hints: Iterable[Hint], expected: torch.Tensor, got: torch.Tensor, case: dict) -> str | None:
    for hint in hints:
        try:
            text = hint(expected, got, case)
        except Exception:  # a hint must never hide the real failure
            text = None
        if text:
            return text
    return None


def factor_hint(factor: Callable[[dict], float], message: str) -> Hint:
    """A hint that fires when ``got`` is ``factor(case)`` times ``expected`` (e.g. alpha vs alpha / r)."""

    def hint(expected: torch.Tensor, got: torch.Tensor, case: dict) -> str | None:
        if expected.shape != got.shape:
            return None
        k = factor(case)
        if torch.allclose(got.float(), k * expected.float(), atol=1e-4, rtol=1e-3):
            return message
        return None

    return hint


@contextmanager
def running(name: str):
    """Context for one check: reports success, and turns ``NotImplementedError`` into :class:`NotImplementedYet`."""
    check = Check(name)
    try:
        yield check
    except NotImplementedError:
        raise NotImplementedYet(f"✗ {name}: not implemented yet (fill in the code marked YOUR CODE HERE, then run this cell again)") from None
    print(f"✓ {name}: {check.passed}/{check.total} cases passed")


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
