"""Step kernels. The Adam math lives once in :func:`adam_math`; :func:`adam_step` is the one entry point of a step
(native CPU kernel or compiled torch step, chosen per tensor)."""

from .adam import adam_math, tensor_step
from .step import AdamConfig, Epilogue, Item, adam_step

__all__ = ["adam_math", "tensor_step", "adam_step", "AdamConfig", "Epilogue", "Item"]
