"""Probes of what fine-tuning changed.

- weights: spectra of updates and intruder dimensions (``spectral``);
- skills: where a skill lives, by grafting (``localization``), and calibration;
- computation: activation, attribution and path patching, circuits, cross-model patching (``circuits``);
- behaviour: forgetting, fine-tuning contribution (TuCo), representation similarity.

Probes never modify the models they are given.
"""

# Each probe module adds one import line below with its public names.
from .calibration import (  # noqa: E402,F401
    CalibrationResult,
    calibration,
    expected_calibration_error,
    reliability_diagram,
    task_probabilities,
)
from .circuits import Circuit, activation_patching, attribution_patching, cmap, dcm, evaluate_circuit, path_patching  # noqa: E402,F401
from .contribution import TuCoResult, decomposition_hooks, steer, tuco  # noqa: E402,F401
from .forgetting import (  # noqa: E402,F401
    LayerProbeResult,
    PruneResult,
    RetentionResult,
    ReverseFinetuneResult,
    fit_logistic,
    neuron_scores,
    probe_layers,
    prune_neurons,
    remove_neurons,
    retention,
    reverse_finetune,
)
from .language_retention import (  # noqa: E402,F401
    LMRetention,
    WindowMean,
    continuations,
    lm_retention,
    reference_text,
    text_loss,
    text_windows,
    token_kl,
)
from .localization import (  # noqa: E402,F401
    GraftResult,
    GraftSweep,
    apply_mask,
    chance_jaccard,
    delta_cosine,
    evaluate_mask,
    graft,
    graft_sweep,
    jaccard,
    mask_overlap,
    mask_profile,
    plot_recovery,
    random_mask,
    top_delta_mask,
)
from .similarity import CKAResult, cka_per_layer, layer_representations, linear_cka  # noqa: E402,F401
from .spectral import (  # noqa: E402,F401
    IntruderResult,
    Spectra,
    SVDCache,
    intruder_counts,
    intruder_dimensions,
    principal_angles,
    scale_intruders,
    singular_values,
    spectra,
    spectral_report,
    subspace_overlap,
    subspace_similarity,
    summarize_report,
    update_statistics,
)
