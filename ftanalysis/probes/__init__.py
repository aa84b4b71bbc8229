"""Probes of what fine-tuning changed.

- weights: spectra of updates and intruder dimensions (``spectral``);
- skills: where a skill lives, by grafting (``localization``), and calibration;
- computation: activation, attribution and path patching, circuits, cross-model patching (``circuits``);
- behaviour: forgetting, fine-tuning contribution (TuCo), representation similarity.

Probes never modify the models they are given.
"""

# Each probe module adds one import line below with its public names.
from .circuits import Circuit, activation_patching, attribution_patching, cmap, dcm, evaluate_circuit, path_patching  # noqa: E402,F401
