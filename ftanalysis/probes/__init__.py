"""Probes of what fine-tuning changed.

- weights: spectra of updates and intruder dimensions (``spectral``);
- skills: where a skill lives, by grafting (``localization``), and calibration;
- computation: activation, attribution and path patching, circuits, cross-model patching (``circuits``);
- behaviour: forgetting, fine-tuning contribution (TuCo), representation similarity.

Probes never modify the models they are given.
"""

from __future__ import annotations

import sys
import types

from .._lazy import lazy_attributes

# Submodules and names are imported on first use (PEP 562), so the command line's ``--help`` does not pay for
# torch. Each probe module adds its public names to this table.
_NAMES = {
    **dict.fromkeys(
        ["CalibrationResult", "calibration", "expected_calibration_error", "reliability_diagram", "task_probabilities"],
        ".calibration",
    ),
    **dict.fromkeys(
        [
            "Circuit",
            "activation_patching",
            "attribution_patching",
            "cmap",
            "dcm",
            "direct_logit_attribution",
            "evaluate_circuit",
            "ioi_batch",
            "path_patching",
        ],
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
__all__ = sorted(_NAMES)


class _ProbesPackage(types.ModuleType):
    """``calibration`` names a function and its submodule. Importing the submodule makes the import system bind
    the module to this attribute; the function keeps it (as it did when this package imported everything)."""

    def __setattr__(self, name: str, value) -> None:
        if name == "calibration" and isinstance(value, types.ModuleType):
            value = value.calibration
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _ProbesPackage


__getattr__, __dir__ = lazy_attributes(__name__, _NAMES)
