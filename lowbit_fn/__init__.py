"""lowbit_fn: memory-saving Adam/AdamW with 8-bit, 4-bit and FP8 block-quantized states, as optax-style
functional transforms over TensorDicts (``init`` / ``update`` / ``chain`` / ``apply_updates``, and ``apply_gradients`` for a whole step in one pass).

Example:
    >>> import torch, lowbit_fn
    >>> model = torch.nn.Linear(256, 256)
    >>> params = lowbit_fn.params_from_module(model)
    >>> opt = lowbit_fn.adamw(learning_rate=1e-3, state_format="8bit")
    >>> state = opt.init(params)
"""

from ._compile import compile_enabled
from .cpu_offload import CPUOffloadOptimizer
from .formats import FORMATS, codebook, dequantize, quantize
from .optimizers import (
    SGD,
    AdEMAMix,
    AdEMAMix4bit,
    AdEMAMix8bit,
    AdEMAMixFp8,
    Adam4bit,
    Adam8bit,
    AdamFp8,
    AdamW,
    AdamW4bit,
    AdamW8bit,
    AdamWFp8,
    Lion,
    Lion4bit,
    Lion8bit,
    LionFp8,
    Muon,
    Muon4bit,
    Muon8bit,
    MuonFp8,
    RMSprop,
    RMSprop4bit,
    RMSprop8bit,
    RMSpropFp8,
    SGD4bit,
    SGD8bit,
    SGDFp8,
)
from .torch_optim import TransformOptimizer, as_torch_optimizer, to_torch_state_dict
from .transforms import (
    STATE_FORMATS,
    ApplyIfFinite,
    CheckedTransformation,
    FusedChain,
    GradientTransformation,
    MomentTransformation,
    MuonTransformation,
    Schedule,
    Chain,
    adam,
    adamw,
    ademamix,
    lion,
    muon,
    rmsprop,
    scale_by_ademamix,
    scale_by_lion,
    scale_by_muon,
    scale_by_rms,
    sgd,
    trace,
    add_decayed_weights,
    apply_gradients,
    apply_if_finite,
    apply_updates,
    chain,
    clip_by_global_norm,
    convert_state,
    identity,
    offload,
    params_from_module,
    scale_by_adam,
    scale_by_learning_rate,
)

__version__ = "0.1.0"

__all__ = [
    "GradientTransformation", "CheckedTransformation", "MomentTransformation", "FusedChain", "MuonTransformation", "convert_state", "Chain", "chain", "identity", "apply_updates", "apply_gradients", "params_from_module",
    "scale_by_adam", "scale_by_lion", "trace", "scale_by_rms", "scale_by_ademamix", "scale_by_muon", "add_decayed_weights", "scale_by_learning_rate", "clip_by_global_norm", "Schedule",
    "apply_if_finite", "ApplyIfFinite",
    "adam", "adamw", "lion", "sgd", "rmsprop", "ademamix", "muon", "STATE_FORMATS", "offload",
    "quantize", "dequantize", "codebook", "FORMATS",
    "compile_enabled",
    "as_torch_optimizer", "TransformOptimizer", "to_torch_state_dict", "CPUOffloadOptimizer",
    "Adam8bit", "AdamW8bit", "Adam4bit", "AdamW4bit", "AdamFp8", "AdamWFp8", "AdamW",
    "Lion8bit", "Lion4bit", "LionFp8", "Lion", "SGD8bit", "SGD4bit", "SGDFp8", "SGD",
    "RMSprop8bit", "RMSprop4bit", "RMSpropFp8", "RMSprop", "AdEMAMix8bit", "AdEMAMix4bit", "AdEMAMixFp8", "AdEMAMix",
    "Muon8bit", "Muon4bit", "MuonFp8", "Muon",
]
