"""Adam and AdamW as chains of building blocks (no maths here), with torch.optim's semantics."""

from __future__ import annotations

from .adam import Scalar, scale_by_adam
from .base import GradientTransformation, chain
from .basic import Schedule, add_decayed_weights, scale_by_learning_rate

__all__ = ["adam", "adamw"]


def adam(
    learning_rate: float | Scalar | Schedule = 1e-3,
    b1: Scalar = 0.9,
    b2: Scalar = 0.999,
    eps: Scalar = 1e-8,
    weight_decay: float | Scalar = 0.0,
    *,
    amsgrad: bool = False,
    state_format: str = "8bit",
    block_size: int | None = None,
    min_quant_size: int = 4096,
    rounding: str | None = None,
    seed: int = 0,
) -> GradientTransformation:
    """Adam with L2 weight decay added to the gradient, like ``torch.optim.Adam`` (not bitsandbytes' decoupled).

    ``chain(add_decayed_weights(weight_decay), scale_by_adam(...), scale_by_learning_rate(learning_rate))``.
    See :func:`scale_by_adam` for the state formats; ``state_format="fp32"`` is plain Adam.

    Example:
        >>> import torch, lowbit_fn
        >>> params = {"w": torch.zeros(3)}
        >>> opt = lowbit_fn.adam(learning_rate=0.1, state_format="fp32")
        >>> state = opt.init(params)
        >>> updates, state = opt.update({"w": torch.tensor([1.0, -2.0, 0.0])}, state, params)
        >>> lowbit_fn.apply_updates(params, updates)["w"]
        tensor([-0.1000,  0.1000,  0.0000])
    """
    return chain(
        add_decayed_weights(weight_decay),
        scale_by_adam(
            b1, b2, eps, amsgrad=amsgrad, state_format=state_format, block_size=block_size,
            min_quant_size=min_quant_size, rounding=rounding, seed=seed,
        ),
        scale_by_learning_rate(learning_rate),
    )


def adamw(
    learning_rate: float | Scalar | Schedule = 1e-3,
    b1: Scalar = 0.9,
    b2: Scalar = 0.999,
    eps: Scalar = 1e-8,
    weight_decay: float | Scalar = 1e-2,
    *,
    amsgrad: bool = False,
    state_format: str = "8bit",
    block_size: int | None = None,
    min_quant_size: int = 4096,
    rounding: str | None = None,
    seed: int = 0,
) -> GradientTransformation:
    """AdamW (decoupled weight decay, scaled by the learning rate), like ``torch.optim.AdamW``.

    ``chain(scale_by_adam(...), add_decayed_weights(weight_decay), scale_by_learning_rate(learning_rate))``.

    References:
      Loshchilov, Hutter, "Decoupled Weight Decay Regularization", arXiv:1711.05101.

    Example:
        >>> import torch, lowbit_fn
        >>> model = torch.nn.Linear(128, 64)
        >>> params = lowbit_fn.params_from_module(model)
        >>> opt = lowbit_fn.adamw(learning_rate=1e-3, state_format="4bit")
        >>> state = opt.init(params)
        >>> grads = {k: torch.ones_like(v) for k, v in params.items()}
        >>> updates, state = opt.update(grads, state, params)
        >>> params = lowbit_fn.apply_updates(params, updates)
    """
    return chain(
        scale_by_adam(
            b1, b2, eps, amsgrad=amsgrad, state_format=state_format, block_size=block_size,
            min_quant_size=min_quant_size, rounding=rounding, seed=seed,
        ),
        add_decayed_weights(weight_decay),
        scale_by_learning_rate(learning_rate),
    )
