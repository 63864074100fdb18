"""Optax-style gradient transformations over TensorDicts."""

from ._moments import STATE_FORMATS, MomentTransformation
from ._tree import params_from_module
from .adam import scale_by_adam
from .ademamix import ademamix, scale_by_ademamix
from .alias import FusedChain, adam, adamw
from .apply import apply_gradients
from .base import Chain, CheckedTransformation, GradientTransformation, apply_updates, chain, identity
from .basic import Schedule, add_decayed_weights, clip_by_global_norm, scale_by_learning_rate
from .conditionality import ApplyIfFinite, apply_if_finite
from .convert import convert_state
from .lion import lion, scale_by_lion
from .muon import MuonTransformation, muon, scale_by_muon
from .offload import offload
from .rms import rmsprop, scale_by_rms
from .sgd import sgd, trace

__all__ = [
    "GradientTransformation", "chain", "identity", "apply_updates", "params_from_module",
    "scale_by_adam", "scale_by_lion", "trace", "scale_by_rms", "scale_by_ademamix", "scale_by_muon",
    "add_decayed_weights", "scale_by_learning_rate", "clip_by_global_norm",
    "adam", "adamw", "lion", "sgd", "rmsprop", "ademamix", "muon", "Schedule", "STATE_FORMATS", "offload",
    "CheckedTransformation", "MomentTransformation", "FusedChain", "MuonTransformation", "convert_state", "apply_gradients", "Chain",
    "apply_if_finite", "ApplyIfFinite",
]
