"""Muon: ``scale_by_muon`` (its momentum buffer ``mu`` on the state codec, then the Newton-Schulz
orthogonalization of each matrix) and the ``muon`` alias, with ``torch.optim.Muon``'s semantics.

The momentum is elementwise and runs in the codec's step like every other core's moments
(:class:`~lowbit_fn.kernels.rules.MuonMomentum`). The orthogonalization is not: it needs the whole matrix after the
momentum step and before the parameter update, so ``muon`` is a plain :func:`~lowbit_fn.chain`, not a fused
one-pass alias (:class:`~lowbit_fn.FusedChain`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from tensordict import TensorDictBase
from torch import Tensor

from ..kernels import Epilogue
from ..kernels.rules import MuonMomentum
from ._moments import Scalar, as_scalar, check_unit, moment_transform
from ._tree import Key, Tree, as_tensordict, build, leaves, name
from .base import Chain, CheckedTransformation, chain
from .basic import Schedule, add_decayed_weights, scale_by_learning_rate

__all__ = ["scale_by_muon", "muon", "MuonTransformation"]

# Keller Jordan's quintic coefficients (a, b, c), torch.optim.Muon's defaults
DEFAULT_NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)
ADJUST_LR_FNS = (None, "original", "match_rms_adamw")
NS_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
MAX_NS_STEPS = 100  # torch.optim.Muon refuses ns_steps >= 100


class MuonTransformation(CheckedTransformation):
    """What :func:`scale_by_muon` returns: a :class:`~lowbit_fn.CheckedTransformation` whose state is its
    momentum core's (``core``, a :class:`~lowbit_fn.transforms.MomentTransformation`: the state layout of every
    core, the buffer named ``mu``, torch.optim's ``momentum_buffer``), and whose ``check`` is the core's plus the
    refusal of tensors that are not 2-D. It names its orthogonalization settings: ``ns_coefficients``,
    ``ns_steps``, ``eps``, ``ns_dtype`` and ``adjust_lr_fn``."""


def lr_ratio(shape: torch.Size | tuple[int, ...], adjust_lr_fn: str | None) -> float:
    """``adjusted_lr / lr`` of ``torch.optim.Muon`` for a matrix of ``shape`` ``(A, B)``: ``sqrt(max(1, A / B))``
    (``"original"``, ``None``) or ``0.2 * sqrt(max(A, B))`` (``"match_rms_adamw"``), with torch's float
    operations."""
    rows, cols = shape[0], shape[1]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, rows / cols))
    return 0.2 * math.sqrt(max(rows, cols))


def newton_schulz(
    x: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float | Tensor,
    dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """The Newton-Schulz orthogonalization of the matrix ``x`` (an approximation of ``U V^T`` for ``x = U S V^T``:
    with Jordan's coefficients the singular values land roughly in ``[0.5, 1.5]``, not at 1, a trade of accuracy
    for few steps that the paper finds harmless), computed in ``dtype``
    with the operations of ``torch.optim.Muon`` in the same order, so that the same input gives the same bits:
    cast, transpose a tall matrix, divide by the Frobenius norm (at least ``eps``), then ``steps`` times
    ``G = X X^T``, ``X = a X + (b G + c G G) X``. Returns a new tensor of ``dtype`` (``x`` is not modified)."""
    a, b, c = coefficients
    tall = x.size(0) > x.size(1)
    o = x.to(dtype)
    if tall:  # the Gram matrix of the smaller side
        o = o.T
    norm = o.norm()
    if isinstance(eps, Tensor):  # a 0-d hyperparameter tensor (the torch.optim front end's), on norm's device
        eps = eps.to(device=norm.device, dtype=norm.dtype)
    o = o / norm.clamp(min=eps)  # Frobenius norm >= spectral norm: singular values at most 1
    for _ in range(steps):
        gram = o @ o.T
        gram_update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        o = torch.addmm(o, gram_update, o, beta=a)
    return o.T if tall else o


def _check_2d(tree: TensorDictBase, what: str) -> None:
    for key, value in zip(*leaves(tree)):
        _refuse(key, value.shape, what)


def _refuse(key: Key, shape: torch.Size, what: str) -> None:
    if len(shape) != 2:
        raise ValueError(
            f"scale_by_muon: {what}[{name(key)!r}] has shape {tuple(shape)}; Muon orthogonalizes 2-D matrices only "
            "(as torch.optim.Muon): optimize biases, norms, embeddings and other non-2-D parameters with another "
            "transform (e.g. lowbit_fn.adamw), or reshape them"
        )


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_ns(
    ns_coefficients: tuple[float, float, float], eps: float | Tensor, ns_steps: int, adjust_lr_fn: str | None,
    ns_dtype: torch.dtype,
) -> tuple[float, float, float]:
    if not isinstance(ns_coefficients, (tuple, list)) or len(ns_coefficients) != 3 or not all(
        _is_real(v) and math.isfinite(v) for v in ns_coefficients
    ):
        raise ValueError(
            f"ns_coefficients must be a tuple of exactly 3 finite floats (a, b, c), got {ns_coefficients!r}"
        )
    if isinstance(eps, Tensor):
        as_scalar(eps, "eps")  # a 0-d floating tensor, the caller's to keep > 0 (it may be changed in place)
    elif not _is_real(eps) or not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite float > 0 or a 0-d tensor, got {eps!r}")
    if isinstance(ns_steps, bool) or not isinstance(ns_steps, int) or not 0 <= ns_steps < MAX_NS_STEPS:
        raise ValueError(f"ns_steps must be an int in [0, {MAX_NS_STEPS}) (as torch.optim.Muon), got {ns_steps!r}")
    if adjust_lr_fn not in ADJUST_LR_FNS:
        raise ValueError(f"adjust_lr_fn must be one of {list(ADJUST_LR_FNS)}, got {adjust_lr_fn!r}")
    if ns_dtype not in NS_DTYPES:
        raise ValueError(f"ns_dtype must be one of {[str(d) for d in NS_DTYPES]}, got {ns_dtype!r}")
    return tuple(float(v) for v in ns_coefficients)  # type: ignore[return-value]


def scale_by_muon(
    momentum: Scalar = 0.95,
    nesterov: bool = True,
    ns_coefficients: tuple[float, float, float] = DEFAULT_NS_COEFFICIENTS,
    eps: float | Tensor = 1e-7,
    ns_steps: int = 5,
    adjust_lr_fn: Optional[str] = None,
    *,
    ns_dtype: torch.dtype = torch.bfloat16,
    state_format: str = "8bit",
    block_size: int | None = None,
    min_quant_size: int = 4096,
    rounding: str | None = None,
    seed: int = 0,
) -> MuonTransformation:
    """Rescale each 2-D update to Muon's orthogonalized momentum, times torch's learning-rate adjustment for its
    shape, with the momentum buffer ``mu`` stored block-wise quantized (the formats and options of
    :func:`~lowbit_fn.scale_by_adam`).

    Per matrix of shape ``(A, B)``: ``mu = lerp(mu, g, 1 - momentum)``; ``d = lerp(g, mu, momentum)`` (nesterov)
    or ``mu``; ``O = NS(d)``, ``ns_steps`` Newton-Schulz iterations with ``ns_coefficients`` computed in
    ``ns_dtype`` (bfloat16 as torch does, with torch's operations in torch's order; ``torch.float32`` for a more
    precise one); the update is ``O * ratio`` in the gradient's dtype, ``ratio = adjusted_lr / lr``:
    ``sqrt(max(1, A / B))`` (``adjust_lr_fn`` ``None`` or ``"original"``) or ``0.2 * sqrt(max(A, B))``
    (``"match_rms_adamw"``). So ``chain(scale_by_muon(...), add_decayed_weights(wd), scale_by_learning_rate(lr))``
    (:func:`muon`) steps ``p - lr * wd * p - adjusted_lr * O``, as ``torch.optim.Muon``.

    Every parameter must be a matrix (2-D), as torch.optim.Muon requires: ``init`` and ``update`` raise a
    ``ValueError`` naming any other. Keep biases, norms and embeddings on another optimizer.

    ``momentum`` and ``eps`` may be 0-d tensors, changed in place between steps (the torch.optim front end,
    ``lowbit_fn.as_torch_optimizer(lowbit_fn.muon, ...)``, passes them so). The update has the gradient's dtype.

    References:
      Jordan et al., "Muon: An optimizer for hidden layers in neural networks" (2024),
      https://kellerjordan.github.io/posts/muon/; ``torch.optim.Muon``.

    Example:
        >>> import torch, lowbit_fn
        >>> params = {"w": torch.zeros(64, 128)}
        >>> t = lowbit_fn.scale_by_muon(state_format="8bit", min_quant_size=0)
        >>> state = t.init(params)
        >>> sorted(state["8bit_block256"].keys())
        ['mu']
        >>> updates, state = t.update({"w": torch.randn(64, 128)}, state, params)
        >>> s = torch.linalg.svdvals(updates["w"])  # orthogonalized: singular values near 1
        >>> bool(s.min() > 0.5 and s.max() < 1.5)
        True
    """
    check_unit(momentum, "momentum", closed=True)
    if not isinstance(nesterov, bool):
        raise TypeError(f"nesterov must be a bool, got {type(nesterov).__name__}")
    coefficients = _check_ns(ns_coefficients, eps, ns_steps, adjust_lr_fn, ns_dtype)
    core = moment_transform(
        "scale_by_muon", MuonMomentum(nesterov), ("mu",), ("momentum_buffer",), (as_scalar(momentum, "momentum"),),
        state_format=state_format, block_size=block_size, min_quant_size=min_quant_size, rounding=rounding, seed=seed,
    )

    def init(params: Tree) -> TensorDictBase:
        params = as_tensordict(params, "params")
        _check_2d(params, "params")
        return core.init(params)

    def check(updates: TensorDictBase, state: TensorDictBase, params: TensorDictBase | None) -> None:
        _check_2d(updates, "updates")  # first: a clear message rather than a shape mismatch against the layout
        if params is not None:
            _check_2d(params, "params")
        core.check(updates, state, params)

    def step(updates: TensorDictBase, state: TensorDictBase, params: TensorDictBase | None, inplace: bool):
        places, flat, grads, _ = core.prepared(updates, state, params)
        directions = core.run(places, flat, grads, [], Epilogue(), inplace)  # the momentum step, state in place
        results = []
        with torch.no_grad():
            for d in directions:
                assert d is not None  # a plain epilogue returns every direction
                o = newton_schulz(d, coefficients, ns_steps, eps, ns_dtype)
                # the ratio applied in float32 (float64 for float64 updates), rounded once to the update's dtype
                wide = torch.float64 if d.dtype == torch.float64 else torch.float32
                u = o.to(wide) * lr_ratio(d.shape, adjust_lr_fn)
                results.append(d.copy_(u) if inplace else u.to(d.dtype))
        return build([p.key for p in places], results), state

    return MuonTransformation(
        init, step, check, core=core, ns_coefficients=coefficients, ns_steps=ns_steps, eps=eps, ns_dtype=ns_dtype,
        adjust_lr_fn=adjust_lr_fn,
    )


def muon(
    learning_rate: float | Scalar | Schedule = 1e-3,
    weight_decay: float | Scalar = 0.1,
    momentum: Scalar = 0.95,
    nesterov: bool = True,
    ns_coefficients: tuple[float, float, float] = DEFAULT_NS_COEFFICIENTS,
    eps: float | Tensor = 1e-7,
    ns_steps: int = 5,
    adjust_lr_fn: Optional[str] = None,
    *,
    ns_dtype: torch.dtype = torch.bfloat16,
    state_format: str = "8bit",
    block_size: int | None = None,
    min_quant_size: int = 4096,
    rounding: str | None = None,
    seed: int = 0,
) -> Chain:
    """Muon with decoupled weight decay, like ``torch.optim.Muon`` (same defaults):
    ``p = p - lr * weight_decay * p - adjusted_lr * NS(momentum direction)``.

    ``chain(scale_by_muon(...), add_decayed_weights(weight_decay), scale_by_learning_rate(learning_rate))``; see
    :func:`scale_by_muon` for the orthogonalization, the learning-rate adjustment and the state formats. Only 2-D
    parameters: give the others to another optimizer. It is a plain chain (the Newton-Schulz iteration needs the
    whole matrix between the momentum and the update), so :func:`~lowbit_fn.apply_gradients` runs it as
    ``update`` then ``apply_updates``.

    References:
      Jordan et al., "Muon: An optimizer for hidden layers in neural networks" (2024),
      https://kellerjordan.github.io/posts/muon/; ``torch.optim.Muon``.

    Example:
        >>> import torch, lowbit_fn
        >>> params = {"w": torch.ones(4, 8)}
        >>> opt = lowbit_fn.muon(learning_rate=0.02, weight_decay=0.0, state_format="fp32")
        >>> state = opt.init(params)
        >>> params, state = lowbit_fn.apply_gradients(opt, {"w": torch.ones(4, 8)}, state, params)
        >>> params["w"][0, :3]  # 1 - 0.02 * s / sqrt(32): 5 Newton-Schulz steps take singular value 1 to s ~ 0.68
        tensor([0.9976, 0.9976, 0.9976])
    """
    core = scale_by_muon(
        momentum, nesterov, ns_coefficients, eps, ns_steps, adjust_lr_fn, ns_dtype=ns_dtype, state_format=state_format,
        block_size=block_size, min_quant_size=min_quant_size, rounding=rounding, seed=seed,
    )
    return chain(core, add_decayed_weights(weight_decay), scale_by_learning_rate(learning_rate))
