"""Circuit probes on plain Hugging Face decoders (GPT-2, Llama, Qwen2, Mistral), with no conversion.

- ``hooks``: read and overwrite activations under TransformerLens' names (``layers.{l}.attn.hook_z``, ...);
- ``patching``: activation patching batched over components -> ``[layer, pos, head]``;
- ``attribution``: attribution patching (gradient estimate) and its comparison with exact patching;
- ``path_patching``: Wang et al.'s path patching through receivers' q/k/v or to the logits;
- ``dla``: direct logit attribution per head (each head's own term in a logit difference, final norm frozen);
- ``circuit``: circuits as grouped heads, mean-ablation faithfulness with a random-circuit control;
- ``dcm``: desiderata-based component masking;
- ``cmap``: cross-model activation patching (fine-tuned head outputs into the base);
- ``attribution_captum``: captum integrated gradients / conductance per head and per layer;
- ``entity``: entity-tracking prompts, position roles, corruptions and desiderata for these probes;
- ``ioi``: indirect-object-identification prompts of one template with aligned corruptions (ABC, name swaps);
- ``entity_circuit``: the entity-tracking circuit found by iterated path patching, grouped by role;
- ``finetunes``: the recipes (and loader) of the fine-tuned checkpoints the entity-tracking notebook uses;
- ``plots``: heatmaps, per-position bars, circuit diagrams.
"""

from .attribution import AttributionComparison, attribution_patching, compare_with_exact
from .attribution_captum import CaptumAttribution, captum_attributions
from .circuit import Circuit, CircuitEvaluation, evaluate_circuit, mean_head_outputs, run_circuit
from .cmap import CMAPResult, cmap
from .dcm import DCMResult, dcm
from .dla import direct_logit_attribution
from .entity import EntityBatch, corrupt_binding, corrupt_query, desiderata, entity_batch
from .entity_circuit import CircuitCompletion, EntityCircuitSearch, complete_circuit, find_entity_circuit
from .finetunes import load_finetuned
from .hooks import ActivationCache, HookPoint, act_name, hook_names, hooks, run_with_cache, run_with_hooks
from .ioi import IOIBatch, ioi_batch
from .metrics import answer_logit, answer_logprob, logit_diff
from .patching import PatchingResult, activation_patching
from .path_patching import PathPatchingResult, path_patching

__all__ = [
    "ActivationCache",
    "AttributionComparison",
    "CMAPResult",
    "CaptumAttribution",
    "Circuit",
    "CircuitEvaluation",
    "DCMResult",
    "EntityBatch",
    "EntityCircuitSearch",
    "HookPoint",
    "IOIBatch",
    "PatchingResult",
    "PathPatchingResult",
    "act_name",
    "activation_patching",
    "answer_logit",
    "answer_logprob",
    "attribution_patching",
    "captum_attributions",
    "cmap",
    "compare_with_exact",
    "corrupt_binding",
    "corrupt_query",
    "dcm",
    "desiderata",
    "direct_logit_attribution",
    "entity_batch",
    "evaluate_circuit",
    "find_entity_circuit",
    "complete_circuit",
    "CircuitCompletion",
    "hook_names",
    "hooks",
    "ioi_batch",
    "load_finetuned",
    "logit_diff",
    "mean_head_outputs",
    "path_patching",
    "run_circuit",
    "run_with_cache",
    "run_with_hooks",
]
