"""The drop-in ``torch.optim.Optimizer`` classes: each family (Adam/AdamW, Lion, SGD, RMSprop, AdEMAMix, Muon) in
8-bit, 4-bit, FP8 and full-precision state, with torch's (or bitsandbytes') signatures and defaults written out,
running the functional factories through :class:`~lowbit_fn.TransformOptimizer`."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from .torch_optim import TransformOptimizer, _Spec
from .transforms import GradientTransformation, ademamix, adam, adamw, lion, muon, rmsprop, sgd

__all__ = [
    "Adam8bit", "AdamW8bit", "Adam4bit", "AdamW4bit", "AdamFp8", "AdamWFp8", "AdamW",
    "Lion8bit", "Lion4bit", "LionFp8", "Lion", "SGD8bit", "SGD4bit", "SGDFp8", "SGD",
    "RMSprop8bit", "RMSprop4bit", "RMSpropFp8", "RMSprop", "AdEMAMix8bit", "AdEMAMix4bit", "AdEMAMixFp8", "AdEMAMix",
    "Muon8bit", "Muon4bit", "MuonFp8", "Muon",
]

Params = Iterable[Tensor] | Iterable[dict[str, Any]]


class _DropIn(TransformOptimizer):
    """What the drop-in classes share: the factory and state format are class attributes, the signature is each
    class's own (written out so that it shows the defaults)."""

    _factory_fn: Callable[..., GradientTransformation] = staticmethod(adamw)
    _state_format = "8bit"

    def _build(self, params: Params, lr: float | Tensor, betas: tuple | None,
               bf16_stochastic_round: bool, max_consecutive_errors: int | None, **hyper: Any) -> None:
        """``TransformOptimizer.__init__`` with torch's ``lr`` and ``betas`` as the factory's names, in this
        class's state format (block options dropped for full-precision classes)."""
        if betas is not None:
            names = _Spec(type(self)._factory_fn).betas  # the factory's b1, b2 (b3)
            n = len(names)
            if not isinstance(betas, (tuple, list)) or len(betas) != n:
                what = "a pair (beta1, beta2)" if n == 2 else f"a tuple of {n} (beta1, ..., beta{n})"
                raise ValueError(f"betas must be {what}, got {betas!r}")
            hyper.update(zip(names, betas))
        TransformOptimizer.__init__(
            self, type(self)._factory_fn, params, learning_rate=lr, state_format=self._state_format,
            bf16_stochastic_round=bf16_stochastic_round, max_consecutive_errors=max_consecutive_errors, **hyper,
        )


_DOC = """{title} with {what}, a drop-in for ``torch.optim.{torch}`` ({decay}).

    Same signature as torchao's ``{name}``. Parameters of two or more dimensions with at least
    ``min_quant_size`` elements get quantized state (blocks of ``block_size`` inside each row); the others keep
    float32 state. See :func:`~lowbit_fn.as_torch_optimizer` for the behaviour and :func:`lowbit_fn.scale_by_adam` for the
    formats.

    Example:
        >>> import torch, lowbit_fn
        >>> model = torch.nn.Linear(256, 256)
        >>> opt = lowbit_fn.{name}(model.parameters(), lr=1e-3)
        >>> model(torch.randn(4, 256)).sum().backward()
        >>> opt.step(); opt.zero_grad()
        >>> opt.state[model.weight]["state_format"]
        '{fmt}'
    """
_WHAT = {"8bit": "8-bit (dynamic-tree map) moments", "4bit": "4-bit moments", "fp8": "FP8 (e4m3) moments"}


def _doc(name: str, state_format: str, decoupled: bool) -> str:
    return _DOC.format(
        title="AdamW" if decoupled else "Adam", what=_WHAT[state_format], torch="AdamW" if decoupled else "Adam",
        decay="decoupled weight decay" if decoupled else "L2 weight decay added to the gradient", name=name, fmt=state_format,
    )


class Adam8bit(_DropIn):
    __doc__ = _doc("Adam8bit", "8bit", False)
    _factory_fn = staticmethod(adam)
    _state_format = "8bit"

    def __init__(self, params: Params, lr: float | Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 amsgrad: bool = False, *, block_size: int | None = None, min_quant_size: int = 4096,
                 bf16_stochastic_round: bool = False,
                 max_consecutive_errors: int | None = None):
        self._build(params, lr, betas, bf16_stochastic_round, max_consecutive_errors, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                    block_size=block_size, min_quant_size=min_quant_size)


class AdamW8bit(_DropIn):
    __doc__ = _doc("AdamW8bit", "8bit", True)
    _factory_fn = staticmethod(adamw)
    _state_format = "8bit"

    def __init__(self, params: Params, lr: float | Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 amsgrad: bool = False, *, block_size: int | None = None, min_quant_size: int = 4096,
                 bf16_stochastic_round: bool = False,
                 max_consecutive_errors: int | None = None):
        self._build(params, lr, betas, bf16_stochastic_round, max_consecutive_errors, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                    block_size=block_size, min_quant_size=min_quant_size)


class Adam4bit(_DropIn):
    __doc__ = _doc("Adam4bit", "4bit", False)
    _factory_fn = staticmethod(adam)
    _state_format = "4bit"

    def __init__(self, params: Params, lr: float | Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 amsgrad: bool = False, *, block_size: int | None = None, min_quant_size: int = 4096,
                 bf16_stochastic_round: bool = False,
                 max_consecutive_errors: int | None = None):
        self._build(params, lr, betas, bf16_stochastic_round, max_consecutive_errors, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                    block_size=block_size, min_quant_size=min_quant_size)


class AdamW4bit(_DropIn):
    __doc__ = _doc("AdamW4bit", "4bit", True)
    _factory_fn = staticmethod(adamw)
    _state_format = "4bit"

    def __init__(self, params: Params, lr: float | Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 amsgrad: bool = False, *, block_size: int | None = None, min_quant_size: int = 4096,
                 bf16_stochastic_round: bool = False,
                 max_consecutive_errors: int | None = None):
        self._build(params, lr, betas, bf16_stochastic_round, max_consecutive_errors, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                    block_size=block_size, min_quant_size=min_quant_size)


class AdamFp8(_DropIn):
    __doc__ = _doc("AdamFp8", "fp8", False)
    _factory_fn = staticmethod(adam)
    _state_format = "fp8"

    def __init__(self, params: Params, lr: float | Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 amsgrad: bool = False, *, block_size: int | None = None, min_quant_size: int = 4096,
                 bf16_stochastic_round: bool = False,
                 max_consecutive_errors: int | None = None):
        self._build(params, lr, betas, bf16_stochastic_round, max_consecutive_errors, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                    block_size=block_size, min_quant_size=min_quant_size)


class AdamWFp8(_DropIn):
    __doc__ = _doc("AdamWFp8", "fp8", True)
    _factory_fn = staticmethod(adamw)
    _state_format = "fp8"

    def __init__(self, params: Params, lr: float | Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 amsgrad: bool = False, *, block_size: int | None = None, min_quant_size: int = 4096,
                 bf16_stochastic_round: bool = False,
                 max_consecutive_errors: int | None = None):
        self._build(params, lr, betas, bf16_stochastic_round, max_consecutive_errors, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                    block_size=block_size, min_quant_size=min_quant_size)


class AdamW(_DropIn):
    """``torch.optim.AdamW`` with float32 state, run by lowbit_fn's step: for bfloat16 parameters with
    ``bf16_stochastic_round=True`` (float32 math, unbiased write-back) without quantized state.

    Example:
        >>> import torch, lowbit_fn
        >>> model = torch.nn.Linear(16, 16).to(torch.bfloat16)
        >>> opt = lowbit_fn.AdamW(model.parameters(), lr=1e-3, bf16_stochastic_round=True)
        >>> model(torch.randn(4, 16, dtype=torch.bfloat16)).float().sum().backward()
        >>> opt.step()
        >>> opt.state[model.weight]["exp_avg"].dtype
        torch.float32
    """

    _factory_fn = staticmethod(adamw)
    _state_format = "fp32"

    def __init__(
        self,
        params: Params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        bf16_stochastic_round: bool = False,
        max_consecutive_errors: int | None = None,
    ):
        self._build(params, lr, betas, bf16_stochastic_round, max_consecutive_errors, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)


_FAMILY_DOC = """{title} with {what}{torch}.

    Parameters of two or more dimensions with at least ``min_quant_size`` elements get quantized state (blocks of
    ``block_size`` inside each row); the others keep float32 state. The math is :func:`lowbit_fn.{factory}`'s;
    see :func:`~lowbit_fn.as_torch_optimizer` for the behaviour (schedulers, param groups, state_dict).

    Example:
        >>> import torch, lowbit_fn
        >>> model = torch.nn.Linear(256, 256)
        >>> opt = lowbit_fn.{name}(model.parameters(){args})
        >>> model(torch.randn(4, 256)).sum().backward()
        >>> opt.step(); opt.zero_grad()
        >>> sorted(k for k in opt.state[model.weight] if k.endswith("_codes"))
        {codes}
    """
_FP32_DOC = """{title} with float32 state run by lowbit_fn's step{torch}: the same update as the low-bit classes
    of its family without quantization, and bfloat16 parameters written back stochastically with
    ``bf16_stochastic_round=True``.

    Example:
        >>> import torch, lowbit_fn
        >>> model = torch.nn.Linear(16, 16)
        >>> opt = lowbit_fn.{name}(model.parameters(){args})
        >>> model(torch.randn(4, 16)).sum().backward()
        >>> opt.step()
        >>> sorted(opt.state[model.weight])
        {keys}
    """


def _family_doc(name: str, title: str, fmt: str, factory: str, torch: str, args: str, codes: list[str]) -> str:
    torch = f", a drop-in for ``torch.optim.{torch}``" if torch else ""
    return _FAMILY_DOC.format(title=title, what=_WHAT[fmt], torch=torch, factory=factory, name=name, args=args,
                              codes=codes)


def _fp32_doc(name: str, title: str, torch: str, args: str, keys: list[str]) -> str:
    torch = f", a drop-in for ``torch.optim.{torch}``" if torch else ""
    return _FP32_DOC.format(title=title, torch=torch, name=name, args=args, keys=keys)


# Lion: bitsandbytes' signature and defaults


class Lion8bit(_DropIn):
    __doc__ = _family_doc("Lion8bit", "Lion", "8bit", "lion", "", "", ["exp_avg_codes"])
    _factory_fn = staticmethod(lion)
    _state_format = "8bit"

    def __init__(self, params: Params, lr: float | Tensor = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, block_size: int | None = None, min_quant_size: int = 4096,
                 bf16_stochastic_round: bool = False,
                 max_consecutive_errors: int | None = None):
        self._build(params, lr, betas, bf16_stochastic_round, max_consecutive_errors, weight_decay=weight_decay, block_size=block_size,
                    min_quant_size=min_quant_size)


class Lion4bit(_DropIn):
    __doc__ = _family_doc("Lion4bit", "Lion", "4bit", "lion", "", "", ["exp_avg_codes"])
    _factory_fn = staticmethod(lion)
    _state_format = "4bit"

    def __init__(self, params: Params, lr: float | Tensor = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, block_size: int | None = None, min_quant_size: int = 4096,
                 bf16_stochastic_round: bool = False,
                 max_consecutive_errors: int | None = None):
        self._build(params, lr, betas, bf16_stochastic_round, max_consecutive_errors, weight_decay=weight_decay, block_size=block_size,
                    min_quant_size=min_quant_size)


class LionFp8(_DropIn):
    __doc__ = _family_doc("LionFp8", "Lion", "fp8", "lion", "", "", ["exp_avg_codes"])
    _factory_fn = staticmethod(lion)
    _state_format = "fp8"

    def __init__(self, params: Params, lr: float | Tensor = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, block_size: int | None = None, min_quant_size: int = 4096,
                 bf16_stochastic_round: bool = False,
                 max_consecutive_errors: int | None = None):
        self._build(params, lr, betas, bf16_stochastic_round, max_consecutive_errors, weight_decay=weight_decay, block_size=block_size,
                    min_quant_size=min_quant_size)


class Lion(_DropIn):
    __doc__ = _fp32_doc("Lion", "Lion", "", "", ["exp_avg", "step"])
    _factory_fn = staticmethod(lion)
    _state_format = "fp32"

    def __init__(self, params: Params, lr: float | Tensor = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, bf16_stochastic_round: bool = False,
                 max_consecutive_errors: int | None = None):
        self._build(params, lr, betas, bf16_stochastic_round, max_consecutive_errors, weight_decay=weight_decay)


# SGD: torch.optim.SGD's signature and defaults; without momentum there is no state but the step count


class SGD8bit(_DropIn):
    __doc__ = _family_doc("SGD8bit", "SGD with momentum", "8bit", "sgd", "SGD", ", lr=0.1, momentum=0.9", ["momentum_buffer_codes"])
    _factory_fn = staticmethod(sgd)
    _state_format = "8bit"

    def __init__(self, params: Params, lr: float | Tensor = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, block_size: int | None = None,
                 min_quant_size: int = 4096, bf16_stochastic_round: bool = False,
                 max_consecutive_errors: int | None = None):
        self._build(params, lr, None, bf16_stochastic_round, max_consecutive_errors, momentum=momentum, dampening=dampening,
                    weight_decay=weight_decay, nesterov=nesterov, block_size=block_size, min_quant_size=min_quant_size)


class SGD4bit(_DropIn):
    __doc__ = _family_doc("SGD4bit", "SGD with momentum", "4bit", "sgd", "SGD", ", lr=0.1, momentum=0.9", ["momentum_buffer_codes"])
    _factory_fn = staticmethod(sgd)
    _state_format = "4bit"

    def __init__(self, params: Params, lr: float | Tensor = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, block_size: int | None = None,
                 min_quant_size: int = 4096, bf16_stochastic_round: bool = False,
                 max_consecutive_errors: int | None = None):
        self._build(params, lr, None, bf16_stochastic_round, max_consecutive_errors, momentum=momentum, dampening=dampening,
                    weight_decay=weight_decay, nesterov=nesterov, block_size=block_size, min_quant_size=min_quant_size)


class SGDFp8(_DropIn):
    __doc__ = _family_doc("SGDFp8", "SGD with momentum", "fp8", "sgd", "SGD", ", lr=0.1, momentum=0.9", ["momentum_buffer_codes"])
    _factory_fn = staticmethod(sgd)
    _state_format = "fp8"

    def __init__(self, params: Params, lr: float | Tensor = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, block_size: int | None = None,
                 min_quant_size: int = 4096, bf16_stochastic_round: bool = False,
                 max_consecutive_errors: int | None = None):
        self._build(params, lr, None, bf16_stochastic_round, max_consecutive_errors, momentum=momentum, dampening=dampening,
                    weight_decay=weight_decay, nesterov=nesterov, block_size=block_size, min_quant_size=min_quant_size)


class SGD(_DropIn):
    __doc__ = _fp32_doc("SGD", "SGD", "SGD", ", lr=0.1, momentum=0.9", ["momentum_buffer", "step"])
    _factory_fn = staticmethod(sgd)
    _state_format = "fp32"

    def __init__(self, params: Params, lr: float | Tensor = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, bf16_stochastic_round: bool = False,
                 max_consecutive_errors: int | None = None):
        self._build(params, lr, None, bf16_stochastic_round, max_consecutive_errors, momentum=momentum, dampening=dampening,
                    weight_decay=weight_decay, nesterov=nesterov)


# RMSprop: torch.optim.RMSprop's signature and defaults


class RMSprop8bit(_DropIn):
    __doc__ = _family_doc("RMSprop8bit", "RMSprop", "8bit", "rmsprop", "RMSprop", "", ["square_avg_codes"])
    _factory_fn = staticmethod(rmsprop)
    _state_format = "8bit"

    def __init__(self, params: Params, lr: float | Tensor = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.0, centered: bool = False, *,
                 block_size: int | None = None, min_quant_size: int = 4096, bf16_stochastic_round: bool = False,
                 max_consecutive_errors: int | None = None):
        self._build(params, lr, None, bf16_stochastic_round, max_consecutive_errors, alpha=alpha, eps=eps, weight_decay=weight_decay,
                    momentum=momentum, centered=centered, block_size=block_size, min_quant_size=min_quant_size)


class RMSprop4bit(_DropIn):
    __doc__ = _family_doc("RMSprop4bit", "RMSprop", "4bit", "rmsprop", "RMSprop", "", ["square_avg_codes"])
    _factory_fn = staticmethod(rmsprop)
    _state_format = "4bit"

    def __init__(self, params: Params, lr: float | Tensor = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.0, centered: bool = False, *,
                 block_size: int | None = None, min_quant_size: int = 4096, bf16_stochastic_round: bool = False,
                 max_consecutive_errors: int | None = None):
        self._build(params, lr, None, bf16_stochastic_round, max_consecutive_errors, alpha=alpha, eps=eps, weight_decay=weight_decay,
                    momentum=momentum, centered=centered, block_size=block_size, min_quant_size=min_quant_size)


class RMSpropFp8(_DropIn):
    __doc__ = _family_doc("RMSpropFp8", "RMSprop", "fp8", "rmsprop", "RMSprop", "", ["square_avg_codes"])
    _factory_fn = staticmethod(rmsprop)
    _state_format = "fp8"

    def __init__(self, params: Params, lr: float | Tensor = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.0, centered: bool = False, *,
                 block_size: int | None = None, min_quant_size: int = 4096, bf16_stochastic_round: bool = False,
                 max_consecutive_errors: int | None = None):
        self._build(params, lr, None, bf16_stochastic_round, max_consecutive_errors, alpha=alpha, eps=eps, weight_decay=weight_decay,
                    momentum=momentum, centered=centered, block_size=block_size, min_quant_size=min_quant_size)


class RMSprop(_DropIn):
    __doc__ = _fp32_doc("RMSprop", "RMSprop", "RMSprop", "", ["square_avg", "step"])
    _factory_fn = staticmethod(rmsprop)
    _state_format = "fp32"

    def __init__(self, params: Params, lr: float | Tensor = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.0, centered: bool = False, *,
                 bf16_stochastic_round: bool = False,
                 max_consecutive_errors: int | None = None):
        self._build(params, lr, None, bf16_stochastic_round, max_consecutive_errors, alpha=alpha, eps=eps, weight_decay=weight_decay,
                    momentum=momentum, centered=centered)


# AdEMAMix: bitsandbytes' signature and defaults


class AdEMAMix8bit(_DropIn):
    __doc__ = _family_doc("AdEMAMix8bit", "AdEMAMix", "8bit", "ademamix", "", "", ["exp_avg_codes", "exp_avg_slow_codes", "exp_avg_sq_codes"])
    _factory_fn = staticmethod(ademamix)
    _state_format = "8bit"

    def __init__(self, params: Params, lr: float | Tensor = 1e-3, betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
                 alpha: float = 5.0, t_alpha: int | None = None, t_beta3: int | None = None, eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, block_size: int | None = None, min_quant_size: int = 4096,
                 bf16_stochastic_round: bool = False,
                 max_consecutive_errors: int | None = None):
        self._build(params, lr, betas, bf16_stochastic_round, max_consecutive_errors, alpha=alpha, t_alpha=t_alpha, t_beta3=t_beta3, eps=eps,
                    weight_decay=weight_decay, block_size=block_size, min_quant_size=min_quant_size)


class AdEMAMix4bit(_DropIn):
    __doc__ = _family_doc("AdEMAMix4bit", "AdEMAMix", "4bit", "ademamix", "", "", ["exp_avg_codes", "exp_avg_slow_codes", "exp_avg_sq_codes"])
    _factory_fn = staticmethod(ademamix)
    _state_format = "4bit"

    def __init__(self, params: Params, lr: float | Tensor = 1e-3, betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
                 alpha: float = 5.0, t_alpha: int | None = None, t_beta3: int | None = None, eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, block_size: int | None = None, min_quant_size: int = 4096,
                 bf16_stochastic_round: bool = False,
                 max_consecutive_errors: int | None = None):
        self._build(params, lr, betas, bf16_stochastic_round, max_consecutive_errors, alpha=alpha, t_alpha=t_alpha, t_beta3=t_beta3, eps=eps,
                    weight_decay=weight_decay, block_size=block_size, min_quant_size=min_quant_size)


class AdEMAMixFp8(_DropIn):
    __doc__ = _family_doc("AdEMAMixFp8", "AdEMAMix", "fp8", "ademamix", "", "", ["exp_avg_codes", "exp_avg_slow_codes", "exp_avg_sq_codes"])
    _factory_fn = staticmethod(ademamix)
    _state_format = "fp8"

    def __init__(self, params: Params, lr: float | Tensor = 1e-3, betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
                 alpha: float = 5.0, t_alpha: int | None = None, t_beta3: int | None = None, eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, block_size: int | None = None, min_quant_size: int = 4096,
                 bf16_stochastic_round: bool = False,
                 max_consecutive_errors: int | None = None):
        self._build(params, lr, betas, bf16_stochastic_round, max_consecutive_errors, alpha=alpha, t_alpha=t_alpha, t_beta3=t_beta3, eps=eps,
                    weight_decay=weight_decay, block_size=block_size, min_quant_size=min_quant_size)


class AdEMAMix(_DropIn):
    __doc__ = _fp32_doc("AdEMAMix", "AdEMAMix", "", "", ["exp_avg", "exp_avg_slow", "exp_avg_sq", "step"])
    _factory_fn = staticmethod(ademamix)
    _state_format = "fp32"

    def __init__(self, params: Params, lr: float | Tensor = 1e-3, betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
                 alpha: float = 5.0, t_alpha: int | None = None, t_beta3: int | None = None, eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, bf16_stochastic_round: bool = False,
                 max_consecutive_errors: int | None = None):
        self._build(params, lr, betas, bf16_stochastic_round, max_consecutive_errors, alpha=alpha, t_alpha=t_alpha, t_beta3=t_beta3, eps=eps,
                    weight_decay=weight_decay)


# Muon: torch.optim.Muon's signature and defaults (2-D parameters only, as torch's); ns_dtype selects the
# Newton-Schulz iteration's dtype (torch's bfloat16 by default)

_NS = (3.4445, -4.775, 2.0315)
_MUON_DOC = """Muon with {what}, a drop-in for ``torch.optim.Muon`` (2-D parameters only; give the others to an
    AdamW, as torch's Muon requires).

    The momentum buffer is stored quantized (blocks of ``block_size`` inside each row, matrices of at least
    ``min_quant_size`` elements); the Newton-Schulz orthogonalization runs per matrix as torch's does, in
    ``ns_dtype``. The math is :func:`lowbit_fn.muon`'s. Sharded (DTensor) parameters are refused: the iteration
    needs whole matrices.

    Example:
        >>> import torch, lowbit_fn
        >>> model = torch.nn.Linear(256, 256, bias=False)
        >>> opt = lowbit_fn.{name}(model.parameters(), lr=0.02)
        >>> model(torch.randn(4, 256)).sum().backward()
        >>> opt.step(); opt.zero_grad()
        >>> sorted(k for k in opt.state[model.weight] if k.startswith("momentum"))
        {keys}
    """


class Muon8bit(_DropIn):
    __doc__ = _MUON_DOC.format(what=_WHAT["8bit"].replace("moments", "momentum"), name="Muon8bit",
                               keys=["momentum_buffer_codes", "momentum_buffer_scale"])
    _factory_fn = staticmethod(muon)
    _state_format = "8bit"

    def __init__(self, params: Params, lr: float | Tensor = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients: tuple[float, float, float] = _NS, eps: float = 1e-7,
                 ns_steps: int = 5, adjust_lr_fn: str | None = None, *, ns_dtype: torch.dtype = torch.bfloat16,
                 block_size: int | None = None, min_quant_size: int = 4096, bf16_stochastic_round: bool = False,
                 max_consecutive_errors: int | None = None):
        self._build(params, lr, None, bf16_stochastic_round, max_consecutive_errors, weight_decay=weight_decay, momentum=momentum,
                    nesterov=nesterov, ns_coefficients=tuple(ns_coefficients), eps=eps, ns_steps=ns_steps,
                    adjust_lr_fn=adjust_lr_fn, ns_dtype=ns_dtype, block_size=block_size, min_quant_size=min_quant_size)


class Muon4bit(_DropIn):
    __doc__ = _MUON_DOC.format(what=_WHAT["4bit"].replace("moments", "momentum"), name="Muon4bit",
                               keys=["momentum_buffer_codes", "momentum_buffer_scale"])
    _factory_fn = staticmethod(muon)
    _state_format = "4bit"

    def __init__(self, params: Params, lr: float | Tensor = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients: tuple[float, float, float] = _NS, eps: float = 1e-7,
                 ns_steps: int = 5, adjust_lr_fn: str | None = None, *, ns_dtype: torch.dtype = torch.bfloat16,
                 block_size: int | None = None, min_quant_size: int = 4096, bf16_stochastic_round: bool = False,
                 max_consecutive_errors: int | None = None):
        self._build(params, lr, None, bf16_stochastic_round, max_consecutive_errors, weight_decay=weight_decay, momentum=momentum,
                    nesterov=nesterov, ns_coefficients=tuple(ns_coefficients), eps=eps, ns_steps=ns_steps,
                    adjust_lr_fn=adjust_lr_fn, ns_dtype=ns_dtype, block_size=block_size, min_quant_size=min_quant_size)


class MuonFp8(_DropIn):
    __doc__ = _MUON_DOC.format(what=_WHAT["fp8"].replace("moments", "momentum"), name="MuonFp8",
                               keys=["momentum_buffer_codes", "momentum_buffer_scale"])
    _factory_fn = staticmethod(muon)
    _state_format = "fp8"

    def __init__(self, params: Params, lr: float | Tensor = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients: tuple[float, float, float] = _NS, eps: float = 1e-7,
                 ns_steps: int = 5, adjust_lr_fn: str | None = None, *, ns_dtype: torch.dtype = torch.bfloat16,
                 block_size: int | None = None, min_quant_size: int = 4096, bf16_stochastic_round: bool = False,
                 max_consecutive_errors: int | None = None):
        self._build(params, lr, None, bf16_stochastic_round, max_consecutive_errors, weight_decay=weight_decay, momentum=momentum,
                    nesterov=nesterov, ns_coefficients=tuple(ns_coefficients), eps=eps, ns_steps=ns_steps,
                    adjust_lr_fn=adjust_lr_fn, ns_dtype=ns_dtype, block_size=block_size, min_quant_size=min_quant_size)


class Muon(_DropIn):
    __doc__ = _MUON_DOC.format(what="float32 momentum", name="Muon", keys=["momentum_buffer"])
    _factory_fn = staticmethod(muon)
    _state_format = "fp32"

    def __init__(self, params: Params, lr: float | Tensor = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients: tuple[float, float, float] = _NS, eps: float = 1e-7,
                 ns_steps: int = 5, adjust_lr_fn: str | None = None, *, ns_dtype: torch.dtype = torch.bfloat16,
                 bf16_stochastic_round: bool = False,
                 max_consecutive_errors: int | None = None):
        self._build(params, lr, None, bf16_stochastic_round, max_consecutive_errors, weight_decay=weight_decay, momentum=momentum,
                    nesterov=nesterov, ns_coefficients=tuple(ns_coefficients), eps=eps, ns_steps=ns_steps,
                    adjust_lr_fn=adjust_lr_fn, ns_dtype=ns_dtype)
