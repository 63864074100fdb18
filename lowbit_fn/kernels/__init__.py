"""Step kernels. The Adam math lives once in :func:`adam_math`; the compiled group steps call it."""

from .adam import adam_math, full_step, quant_step

__all__ = ["adam_math", "full_step", "quant_step"]
