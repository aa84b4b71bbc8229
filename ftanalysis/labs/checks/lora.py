"""Checks for lab 01, LoRA from scratch.

The expected values come from :class:`ftanalysis.methods.LoRALayer` (and from PEFT when it is installed),
always with a non-zero B: at B = 0 the classic "alpha instead of alpha / r" bug is invisible.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ...methods.lora import LoRA, LoRALayer
from ._core import factor_hint, resolve, running, seeded


# ---------------------------------------------------------------------- reference (the library)
def reference_lora_scaling(alpha: float, r: int, rslora: bool = False) -> float:
    return LoRA(r=r, alpha=alpha, rslora=rslora).scaling


class ReferenceLoRALinear(nn.Module):
    """The exercise's API (``lora_A``, ``lora_B``, ``scaling``, ``forward``, ``merge``) over the library layer."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, rslora: bool = False):
        super().__init__()
        for p in base.parameters():
            p.requires_grad_(False)
        self.layer = LoRALayer(base, {"full": slice(0, base.out_features)}, r, reference_lora_scaling(alpha, r, rslora), 0.0)
        nn.init.normal_(self.layer.lora_A["full"], std=1 / r)
        self.base = base
        self.lora_A, self.lora_B = self.layer.lora_A["full"], self.layer.lora_B["full"]
        self.scaling = self.layer.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    def merge(self) -> nn.Linear:
        merged = copy.deepcopy(self.layer.base_layer)
        with torch.no_grad():
            merged.weight.copy_(self.layer.merged_weight())
        return merged


def reference_merge_lora(module: nn.Module) -> nn.Linear:
    """A new ``nn.Linear`` with weight ``W0 + scaling * B @ A`` (the module's ``base``, ``lora_A``, ``lora_B``, ``scaling``)."""
    merged = copy.deepcopy(module.base)
    with torch.no_grad():
        merged.weight.add_(module.scaling * module.lora_B @ module.lora_A)
    return merged


def reference_count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------- cases
def _linear_cases():
    for seed, (d_in, d_out, r, alpha, rslora, bias) in enumerate(
        [(16, 12, 4, 8.0, False, True), (32, 32, 8, 16.0, False, False), (20, 9, 3, 1.0, False, True),
         (24, 40, 16, 16.0, True, True), (8, 8, 1, 2.0, False, True)]
    ):
        yield {"seed": seed, "in": d_in, "out": d_out, "r": r, "alpha": alpha, "rslora": rslora, "bias": bias}


def _base_linear(case) -> nn.Linear:
    g = seeded(100 + case["seed"])
    base = nn.Linear(case["in"], case["out"], bias=case["bias"])
    with torch.no_grad():
        base.weight.copy_(torch.randn(base.weight.shape, generator=g) / math.sqrt(case["in"]))
        if case["bias"]:
            base.bias.copy_(torch.randn(case["out"], generator=g) * 0.1)
    return base


def _set_random_adapter(module: nn.Module, case, g) -> tuple[torch.Tensor, torch.Tensor]:
    A = torch.randn(case["r"], case["in"], generator=g) * 0.3
    B = torch.randn(case["out"], case["r"], generator=g) * 0.3  # non-zero B: the scaling matters
    with torch.no_grad():
        module.lora_A.copy_(A)
        module.lora_B.copy_(B)
    return A, B


def _library_output(case, A, B, x) -> tuple[torch.Tensor, torch.Tensor]:
    layer = LoRALayer(_base_linear(case), {"full": slice(0, case["out"])}, case["r"], reference_lora_scaling(case["alpha"], case["r"], case["rslora"]), 0.0)
    with torch.no_grad():
        layer.lora_A["full"].copy_(A)
        layer.lora_B["full"].copy_(B)
        return layer(x), layer.merged_weight()


def _peft_output(case, A, B, x) -> torch.Tensor | None:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return None

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = _base_linear(case)

        def forward(self, x):
            return self.lin(x)

    config = LoraConfig(r=case["r"], lora_alpha=case["alpha"], target_modules=["lin"], use_rslora=case["rslora"], init_lora_weights=False)
    model = get_peft_model(Wrapper(), config)
    lin = model.base_model.model.lin
    with torch.no_grad():
        lin.lora_A["default"].weight.copy_(A)
        lin.lora_B["default"].weight.copy_(B)
        return model(x)


def _scaling_hints(base_out: torch.Tensor):
    def delta_factor(factor, message):
        def hint(expected, got, case):
            if expected.shape != got.shape:
                return None
            k = factor(case)
            return message if torch.allclose(got - base_out, k * (expected - base_out), atol=1e-4, rtol=1e-3) else None
        return hint

    return [
        delta_factor(lambda c: c["r"] if not c["rslora"] else math.sqrt(c["r"]), "off by a factor of r: scale B A x by alpha / r, not by alpha."),
        delta_factor(lambda c: 1 / (c["alpha"] / (math.sqrt(c["r"]) if c["rslora"] else c["r"])), "the low-rank term is not scaled: multiply B A x by alpha / r."),
        delta_factor(lambda c: math.sqrt(c["r"]) if not c["rslora"] else 1.0, "with rslora=False the scaling is alpha / r (alpha / sqrt(r) is rsLoRA)."),
        delta_factor(lambda c: 1 / math.sqrt(c["r"]) if c["rslora"] else 1.0, "with rslora=True the scaling is alpha / sqrt(r)."),
        lambda e, g, c: "your output is the frozen layer alone: add the low-rank update." if torch.allclose(g, base_out, atol=1e-6) else None,
        lambda e, g, c: "the low-rank update alone is not the output: add the frozen layer's output W0 x + b." if torch.allclose(g + base_out, e, atol=1e-4) else None,
    ]


# ---------------------------------------------------------------------- checks
def check_lora_scaling(lora_scaling=None) -> None:
    """``lora_scaling(alpha, r, rslora=False)`` returns the factor in front of ``B @ A``."""
    fn = resolve(lora_scaling, reference_lora_scaling, "check_lora_scaling", "function", ["alpha", "r", "rslora"])
    cases = [{"alpha": 16.0, "r": 8, "rslora": False}, {"alpha": 8.0, "r": 4, "rslora": True}, {"alpha": 1.0, "r": 1, "rslora": False},
             {"alpha": 32.0, "r": 64, "rslora": True}, {"alpha": 12.0, "r": 3, "rslora": False}]
    hints = [
        factor_hint(lambda c: c["r"] if not c["rslora"] else math.sqrt(c["r"]), "you returned alpha: LoRA scales by alpha / r (alpha / sqrt(r) with rsLoRA)."),
        factor_hint(lambda c: math.sqrt(c["r"]) if not c["rslora"] else 1.0, "alpha / sqrt(r) is rsLoRA's scaling; plain LoRA uses alpha / r."),
        factor_hint(lambda c: 1 / math.sqrt(c["r"]) if c["rslora"] else 1.0, "with rslora=True the scaling is alpha / sqrt(r), which keeps updates stable as r grows."),
    ]
    with running("check_lora_scaling") as check:
        for case in check.cases(cases):
            got = fn(case["alpha"], case["r"], rslora=case["rslora"])
            check.require(isinstance(got, (int, float)) or (isinstance(got, torch.Tensor) and got.numel() == 1), case,
                          f"lora_scaling must return a number. Got {type(got).__name__}.")
            expected = reference_lora_scaling(case["alpha"], case["r"], case["rslora"])
            check.compare("scaling", torch.tensor(float(expected)), torch.tensor(float(got)), case, atol=1e-9, rtol=1e-6, hints=hints)


def check_lora_linear(LoRALinear=None) -> None:
    """``LoRALinear(base, r, alpha, rslora)``: frozen base, ``lora_A`` (r, in), ``lora_B`` (out, r) zero at init,
    ``forward(x) = base(x) + scaling * x A^T B^T``; compared with the library layer (and PEFT if installed)."""
    cls = resolve(LoRALinear, ReferenceLoRALinear, "check_lora_linear", "class", ["base", "r", "alpha", "rslora"])
    with running("check_lora_linear") as check:
        for case in check.cases(_linear_cases()):
            g = seeded(case["seed"])
            torch.manual_seed(case["seed"])
            module = cls(_base_linear(case), case["r"], case["alpha"], rslora=case["rslora"])
            for name, shape in (("lora_A", (case["r"], case["in"])), ("lora_B", (case["out"], case["r"]))):
                param = getattr(module, name, None)
                check.require(isinstance(param, nn.Parameter), case, f"{name} must be an nn.Parameter attribute of the module.",
                              "create it with nn.Parameter(torch.zeros(...)) in __init__.")
                check.require(tuple(param.shape) == shape, case, f"{name} must have shape {shape}; got {tuple(param.shape)}.",
                              "A maps the input down to r dimensions: (r, in); B maps back up: (out, r).")
                check.require(param.requires_grad, case, f"{name} must be trainable.")
            frozen = [n for n, p in module.named_parameters() if p.requires_grad and "lora_" not in n]
            check.require(not frozen, case, f"only lora_A and lora_B may train; also trainable: {frozen}.", "freeze the base layer: p.requires_grad_(False).")
            x = torch.randn(3, 5, case["in"], generator=g)
            base_out = _base_linear(case)(x).detach()
            check.compare("output at initialisation (B = 0 must give the base layer's output)", base_out, module(x), case,
                          hints=[lambda e, o, c: "your output is only the low-rank update: add the frozen layer's output W0 x + b."
                                 if torch.allclose(o, torch.zeros_like(o)) else None,
                                 lambda e, o, c: "initialise B to zeros so that LoRA starts at the pretrained model."])
            A, B = _set_random_adapter(module, case, g)
            expected, _ = _library_output(case, A, B, x)
            check.compare("output with non-zero B", expected, module(x), case, hints=_scaling_hints(base_out))
            peft_out = _peft_output(case, A, B, x)
            if peft_out is not None:
                check.compare("output against PEFT's LoRA layer", peft_out, module(x), case)


def check_lora_merge(merge_lora=None) -> None:
    """``merge_lora(module)`` returns a new ``nn.Linear`` with weight ``W0 + scaling * B @ A`` and the same outputs.

    It is checked on the reference ``LoRALinear`` (attributes ``base``, ``lora_A``, ``lora_B``, ``scaling``), so a
    bug in your class does not fail this exercise; the expected weight comes from the library's merge.
    """
    fn = resolve(merge_lora, reference_merge_lora, "check_lora_merge", "function", ["module"])
    with running("check_lora_merge") as check:
        for case in check.cases(_linear_cases()):
            g = seeded(case["seed"])
            torch.manual_seed(case["seed"])
            module = ReferenceLoRALinear(_base_linear(case), case["r"], case["alpha"], rslora=case["rslora"])
            A, B = _set_random_adapter(module, case, g)
            x = torch.randn(4, case["in"], generator=g)
            _, expected_weight = _library_output(case, A, B, x)
            base_weight = _base_linear(case).weight.detach()
            merged = fn(module)
            check.require(isinstance(merged, nn.Linear), case, f"merge_lora must return an nn.Linear. Got {type(merged).__name__}.")
            check.require(merged is not module.base, case, "merge_lora must return a new layer, not modify and return the module's base.",
                          "copy.deepcopy(module.base), then add the update to the copy's weight.")
            check.require(torch.equal(module.base.weight.detach(), base_weight), case, "merge_lora changed the module's frozen base weight.",
                          "work on a copy: the unmerged module must stay usable.")
            check.compare("merged weight", expected_weight, merged.weight, case, hints=[
                lambda e, got, c: "the merged weight must include the scaling: W0 + scaling * B @ A."
                if torch.allclose(got, base_weight + B @ A, atol=1e-5) else None,
                lambda e, got, c: "merge returned the base weight unchanged." if torch.allclose(got, base_weight, atol=1e-6) else None,
                lambda e, got, c: "you returned only the update scaling * B @ A: add W0." if torch.allclose(got, e - base_weight, atol=1e-5) else None,
            ])
            if case["bias"]:
                check.compare("merged bias (unchanged)", module.base.bias, merged.bias, case)
            check.compare("merged forward == unmerged forward", module(x), merged(x), case)


def check_count_trainable(count_trainable=None) -> None:
    """``count_trainable(model)`` is the number of scalars the optimiser updates."""
    fn = resolve(count_trainable, reference_count_trainable, "check_count_trainable", "function", ["model"])
    with running("check_count_trainable") as check:
        for case in check.cases([{"seed": s, "frozen": f} for s, f in ((0, "none"), (1, "first"), (2, "lora"))]):
            torch.manual_seed(case["seed"])
            model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3))
            if case["frozen"] == "first":
                model[0].requires_grad_(False)
            if case["frozen"] == "lora":
                model[0].requires_grad_(False)
                model[0] = ReferenceLoRALinear(model[0], 2, 4.0)
            got = fn(model)
            expected = reference_count_trainable(model)
            total = sum(p.numel() for p in model.parameters())
            check.compare("trainable parameters", torch.tensor(expected), torch.tensor(int(got)), case, hints=[
                lambda e, o, c: "you counted every parameter: count only those with requires_grad=True." if int(o) == total else None,
                lambda e, o, c: "count scalars (p.numel()), not tensors." if int(o) == sum(1 for p in model.parameters() if p.requires_grad) else None,
            ])
