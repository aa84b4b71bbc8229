"""Probes of what fine-tuning changed.

- weights: spectra of updates and intruder dimensions (``spectral``);
- skills: where a skill lives, by grafting (``localization``), and calibration;
- computation: activation, attribution and path patching, circuits, cross-model patching (``circuits``);
- behaviour: forgetting, fine-tuning contribution (TuCo), representation similarity.

Probes never modify the models they are given.
"""

from __future__ import annotations

import importlib

# Submodules and names are imported on first use (PEP 562), so the command line's ``--help`` does not pay for
# torch. Each probe module adds its public names to this table.
_NAMES = {
    **dict.fromkeys(
        ["CalibrationResult", "calibration", "expected_calibration_error", "reliability_diagram", "task_probabilities"],
        ".calibration",
    ),
    **dict.fromkeys(
        ["Circuit", "activation_patching", "attribution_patching", "cmap", "dcm", "evaluate_circuit", "path_patching"],
        ".circuits",
    ),
    **dict.fromkeys(["TuCoResult", "decomposition_hooks", "steer", "tuco"], ".contribution"),
    **dict.fromkeys(
        [
            "LayerProbeResult",
            "PruneResult",
            "RetentionResult",
            "ReverseFinetuneResult",
            "fit_logistic",
            "neuron_scores",
            "probe_layers",
            "prune_neurons",
            "remove_neurons",
            "retention",
            "reverse_finetune",
        ],
        ".forgetting",
    ),
    **dict.fromkeys(
        [
            "LMRetention",
            "WindowMean",
            "continuations",
            "lm_retention",
            "reference_text",
            "text_loss",
            "text_windows",
            "token_kl",
        ],
        ".language_retention",
    ),
    **dict.fromkeys(
        [
            "GraftResult",
            "GraftSweep",
            "apply_mask",
            "chance_jaccard",
            "delta_cosine",
            "evaluate_mask",
            "graft",
            "graft_sweep",
            "jaccard",
            "mask_overlap",
            "mask_profile",
            "plot_recovery",
            "random_mask",
            "top_delta_mask",
        ],
        ".localization",
    ),
    **dict.fromkeys(["CKAResult", "cka_per_layer", "layer_representations", "linear_cka"], ".similarity"),
    **dict.fromkeys(
        [
            "IntruderResult",
            "SVDCache",
            "Spectra",
            "intruder_counts",
            "intruder_dimensions",
            "principal_angles",
            "scale_intruders",
            "singular_values",
            "spectra",
            "spectral_report",
            "subspace_overlap",
            "subspace_similarity",
            "summarize_report",
            "update_statistics",
        ],
        ".spectral",
    ),
}
_SUBMODULES = (
    "calibration",
    "circuits",
    "contribution",
    "forgetting",
    "language_retention",
    "localization",
    "similarity",
    "spectral",
    "spectral_plots",
)

__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    elif name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name], __name__), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
