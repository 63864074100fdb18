"""Optax-style gradient transformations over TensorDicts."""

from ._tree import params_from_module
from .adam import STATE_FORMATS, scale_by_adam
from .alias import adam, adamw
from .base import GradientTransformation, apply_updates, chain, identity
from .offload import offload
from .basic import Schedule, add_decayed_weights, clip_by_global_norm, scale_by_learning_rate

__all__ = [
    "GradientTransformation", "chain", "identity", "apply_updates", "params_from_module",
    "scale_by_adam", "add_decayed_weights", "scale_by_learning_rate", "clip_by_global_norm",
    "adam", "adamw", "Schedule", "STATE_FORMATS", "offload",
]
