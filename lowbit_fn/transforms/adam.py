"""``scale_by_adam``: Adam's moments ``mu``, ``nu`` (and ``nu_max``) on the state codec (:mod:`._moments`)."""

from __future__ import annotations

from ..kernels.rules import Adam
from ._moments import MomentTransformation, Scalar, as_scalar, check_nonnegative, check_unit, moment_transform

__all__ = ["scale_by_adam"]


def scale_by_adam(
    b1: Scalar = 0.9,
    b2: Scalar = 0.999,
    eps: Scalar = 1e-8,
    *,
    amsgrad: bool = False,
    state_format: str = "8bit",
    block_size: int | None = None,
    min_quant_size: int = 4096,
    rounding: str | None = None,
    seed: int = 0,
) -> MomentTransformation:
    """Rescale updates by Adam's bias-corrected moments, with the moments stored block-wise quantized.

    The returned updates are ``m_hat / (sqrt(v_hat) + eps)`` (torch's placement of the bias corrections), in each
    gradient's dtype. The step's math runs in float32 (float64 for float64 params with full-precision state) on
    this step's unquantized moments; the moments are then re-quantized in place. On the CPU one call of the native
    kernel (``lowbit_fn/kernels/native.c``) steps every tensor; elsewhere a compiled torch graph per tensor,
    one graph per format and dtype for any model; both give the same bits. ``b1``/``b2``/``eps`` may be 0-d
    tensors that you change in place without recompiling. The state is donated (see
    :class:`GradientTransformation`); with ``update(..., inplace=True)`` the updates are written into the
    gradients' buffers.

    References:
      Kingma, Ba, "Adam: A Method for Stochastic Optimization", arXiv:1412.6980.
      Reddi, Kale, Kumar, "On the Convergence of Adam and Beyond" (amsgrad), arXiv:1904.09237.
      Dettmers et al., "8-bit Optimizers via Block-wise Quantization", arXiv:2110.02861.

    Args:
      b1, b2: exponential decay rates of the first and second moments.
      eps: added to the denominator.
      amsgrad: keep the running maximum of the second moment (stored in the same format).
      state_format: ``"8bit"``, ``"4bit"``, ``"fp8"`` or ``"fp32"`` (plain Adam state).
      block_size: elements per quantization block (default 256 / 128 / 256); blocks never cross a row.
      min_quant_size: parameters of two or more dimensions with at least this many elements get quantized state
        (0: all of them); the others, and every 1-D parameter, keep full precision.
      rounding: how moments are re-quantized: ``"nearest"``, or ``"stochastic"`` (m and ``sqrt(v)`` stochastically
        rounded, v stored as ``sqrt(v)``: the 4-bit scheme that trains like fp32). Default: ``"stochastic"`` for
        ``"4bit"``, ``"nearest"`` for ``"8bit"`` and ``"fp8"`` (where stochastic rounding did not measurably help).
      seed: selects the random numbers of stochastic rounding, drawn from a hash of (seed, moment, step, the
        parameter's identity (a CRC-32 of its key path), element index): no generator state, so resumed training
        is bit-exact, and two parameters never share noise.

    Returns:
      A :class:`MomentTransformation` (a :class:`CheckedTransformation`).

    Example:
        >>> import torch, lowbit_fn
        >>> params = {"w": torch.randn(64, 128)}
        >>> adam = lowbit_fn.scale_by_adam(state_format="8bit", min_quant_size=0)
        >>> state = adam.init(params)
        >>> updates, state = adam.update({"w": torch.randn(64, 128)}, state, params)
        >>> state["8bit_block256", "mu", "w", "codes"].shape, state["8bit_block256", "mu", "w", "scale"].shape
        (torch.Size([64, 128]), torch.Size([64, 1]))
        >>> int(state["count"])
        1
    """
    if not isinstance(amsgrad, bool):
        raise TypeError(f"amsgrad must be a bool, got {type(amsgrad).__name__}")
    check_unit(b1, "b1")
    check_unit(b2, "b2")
    check_nonnegative(eps, "eps")
    names = (("mu", "exp_avg"), ("nu", "exp_avg_sq"), ("nu_max", "max_exp_avg_sq"))[: 3 if amsgrad else 2]
    return moment_transform(
        "scale_by_adam", Adam(amsgrad), tuple(n for n, _ in names), tuple(t for _, t in names),
        (as_scalar(b1, "b1"), as_scalar(b2, "b2"), as_scalar(eps, "eps")), state_format=state_format,
        block_size=block_size, min_quant_size=min_quant_size, rounding=rounding, seed=seed,
    )
