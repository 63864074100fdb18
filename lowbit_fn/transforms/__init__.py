"""Optax-style gradient transformations over TensorDicts."""

from ._tree import params_from_module
from .adam import STATE_FORMATS, ScaleByAdam, scale_by_adam
from .alias import FusedAdam, adam, adamw
from .apply import apply_gradients
from .base import Chain, CheckedTransformation, GradientTransformation, apply_updates, chain, identity
from .convert import convert_state
from .offload import offload
from .basic import Schedule, add_decayed_weights, clip_by_global_norm, scale_by_learning_rate

__all__ = [
    "GradientTransformation", "chain", "identity", "apply_updates", "params_from_module",
    "scale_by_adam", "add_decayed_weights", "scale_by_learning_rate", "clip_by_global_norm",
    "adam", "adamw", "Schedule", "STATE_FORMATS", "offload", "CheckedTransformation", "ScaleByAdam", "FusedAdam",
    "convert_state", "apply_gradients", "Chain",
]
