"""Step kernels. Each rule's math lives once in :mod:`lowbit_fn.kernels.rules`; :func:`moment_step` is the one
entry point of a step over codec state (native CPU kernel or compiled torch step, chosen per tensor)."""

from . import rules
from .reference import tensor_step
from .step import Epilogue, Item, StepConfig, moment_step

__all__ = ["rules", "tensor_step", "moment_step", "StepConfig", "Epilogue", "Item"]
