"""Known-wrong versions of lab 01's exercises: each check must fail on them, with the hint in its message."""

import copy
import math

import torch
from torch import nn

from ftanalysis.labs.checks.lora import ReferenceLoRALinear


def scaling_alpha(alpha, r, rslora=False):
    return alpha


def scaling_always_sqrt(alpha, r, rslora=False):
    return alpha / math.sqrt(r)


def scaling_stub(alpha, r, rslora=False):
    raise NotImplementedError()


class _Base(nn.Module):
    scale_mode = "r"
    add_base = True
    b_init = "zeros"

    def __init__(self, base, r, alpha, rslora=False):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.randn(r, base.in_features) / r)
        init = torch.zeros if self.b_init == "zeros" else torch.randn
        self.lora_B = nn.Parameter(init(base.out_features, r))
        denom = {"r": (math.sqrt(r) if rslora else r), "none": alpha, "alpha": 1}[self.scale_mode]
        self.scaling = alpha / denom

    def forward(self, x):
        update = self.scaling * (x @ self.lora_A.T @ self.lora_B.T)
        return self.base(x) + update if self.add_base else update


class LinearScalesByAlpha(_Base):
    scale_mode = "alpha"


class LinearForgetsBase(_Base):
    add_base = False


class LinearRandomB(_Base):
    b_init = "randn"


class LinearStub(nn.Module):
    def __init__(self, base, r, alpha, rslora=False):
        super().__init__()
        raise NotImplementedError()


def merge_without_scaling(module):
    merged = copy.deepcopy(module.base)
    with torch.no_grad():
        merged.weight.add_(module.lora_B @ module.lora_A)
    return merged


def merge_in_place(module):
    with torch.no_grad():
        module.base.weight.add_(module.scaling * module.lora_B @ module.lora_A)
    return module.base


def count_all(model):
    return sum(p.numel() for p in model.parameters())


def count_tensors(model):
    return sum(1 for p in model.parameters() if p.requires_grad)


def merge_stub(module):
    raise NotImplementedError


def count_stub(model):
    raise NotImplementedError


MUTANTS = {
    "check_lora_scaling": [(scaling_alpha, "you returned alpha"), (scaling_always_sqrt, "rsLoRA")],
    "check_lora_linear": [
        (LinearScalesByAlpha, "off by a factor of r"),
        (LinearForgetsBase, "add the frozen layer's output"),
        (LinearRandomB, "initialise B to zeros"),
    ],
    "check_lora_merge": [(merge_without_scaling, "must include the scaling"), (merge_in_place, "must return a new layer")],
    "check_count_trainable": [(count_all, "only those with requires_grad"), (count_tensors, "count scalars")],
}
STUBS = {
    "check_lora_scaling": scaling_stub, "check_lora_linear": LinearStub,
    "check_lora_merge": merge_stub, "check_count_trainable": count_stub,
}
REFERENCE_ARGS = {"check_lora_merge": ReferenceLoRALinear}
