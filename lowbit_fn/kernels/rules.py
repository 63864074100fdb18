"""The elementwise update rules of the optimizer family, each written once: its moments (signed or not), the
per-step scalars it derives from its hyperparameters and the step count, and its math on one tensor.

A rule is a frozen dataclass: a constant of the compiled graphs (one graph per rule, format and flags) and the
``rule``/``flags`` of the native kernel (``native.c``), which computes the same float32 operations in the
same order on the same scalars. The quantized storage, the row layout, stochastic rounding and the epilogue
(weight decay, learning rate, the parameter's update) are the codec's (:mod:`lowbit_fn.kernels.step`), shared by
every rule: a rule only says what its moments are and how they move.

Unsigned moments are second moments (running means of squares, each new square weighted as ``(g * sqrt(w))**2``
so that it overflows only for gradients beyond ``sqrt(float32 max / w)``): with stochastic rounding they are
stored as their square roots, the 4-bit scheme that trains like fp32.

Scalars are computed eagerly in float64 from 0-d tensors and rounded once to the math dtype (float32, or float64
for float64 parameters with full-precision state); the native kernel receives exactly these values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

__all__ = ["Rule", "Adam", "Lion", "Trace", "RMS", "AdEMAMix", "MuonMomentum", "sqrt", "RULES_MAX_SCALARS"]

RULES_MAX_SCALARS = 8  # the native kernel's scalar slots per rule


def sqrt(x: Tensor) -> Tensor:
    """Correctly rounded float32 sqrt in eager and compiled code alike.

    Eager ``torch.sqrt`` on CPU is not always correctly rounded (vectorized math library), inductor's is, so
    float32 goes through float64: a float64 sqrt within 1 ulp, rounded to float32, is the correctly rounded result.
    """
    return torch.sqrt(x.double()).to(x.dtype) if x.dtype != torch.float64 else torch.sqrt(x)


def _f64(x: Tensor) -> Tensor:
    return x.to(torch.float64)


def _square(x: Tensor) -> Tensor:
    """``x * x``. A running mean of squares adds ``(g * sqrt(w))**2``, not ``g * g * w``: the same value, but
    finite for every gradient up to ``sqrt(float32 max / w)`` (5.8e20 for Adam's ``w = 1 - 0.999``) where
    ``g * g`` overflows from 1.8e19."""
    return x * x


def _saturate(v: Tensor, g: Tensor) -> Tensor:
    """A second moment that overflowed although its gradient is finite (``|g|`` beyond ~5.8e20 for Adam), held at
    the dtype's largest value: the step of that element is then ~0 until it decays, as with an infinite ``v``, but
    the state stays finite and the element recovers. A non-finite gradient keeps its non-finite moment (the
    format stores it as 0: it costs that element only)."""
    top = torch.finfo(v.dtype).max
    return torch.where((v > top) & (g.abs() <= top), torch.full_like(v, top), v)


def _lerp(a: Tensor, b: Tensor, weight: Tensor) -> Tensor:
    """``a + weight * (b - a)``: torch's ``lerp`` for weights below 0.5, spelled out so eager == compiled == C."""
    return a + weight * (b - a)


@dataclass(frozen=True)
class Rule:
    """An elementwise update rule (see the module docstring). Subclasses set ``native_id`` (the C kernel's rule
    number) and implement :meth:`signed`, :meth:`scalars` and :meth:`math`."""

    native_id: ClassVar[int]

    def signed(self) -> tuple[bool, ...]:
        """Per moment, whether it takes negative values (the signed codebook) or is a second moment."""
        raise NotImplementedError

    def flags(self) -> int:
        """The rule's switches as the native kernel reads them (bit 0 nesterov, bit 1 centered, bit 2 momentum)."""
        return 0

    def scalars(self, step: Tensor, hyper: tuple[Tensor, ...], dtype: torch.dtype) -> tuple[Tensor, ...]:
        """The step's scalars (at most :data:`RULES_MAX_SCALARS`) in ``dtype``, from the hyperparameters'
        0-d tensors and the step count (int64 0-d, 1 on the first update)."""
        raise NotImplementedError

    def math(self, g: Tensor, moments: list[Tensor], s: tuple[Tensor, ...]) -> tuple[Tensor, list[Tensor]]:
        """``(direction, new moments)`` from the gradient, the moments and the scalars (all in the math dtype)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Adam(Rule):
    """Adam (torch.optim semantics): ``m``, ``v`` (and ``vmax`` with amsgrad); hyper ``(b1, b2, eps)``.

    ``direction = (m / (1 - b1**t)) / (sqrt(v) / sqrt(1 - b2**t) + eps)``, the bias corrections as
    multiplications by their reciprocals (one division per element)."""

    amsgrad: bool = False
    native_id: ClassVar[int] = 0

    def signed(self) -> tuple[bool, ...]:
        return (True, False, False) if self.amsgrad else (True, False)

    def scalars(self, step, hyper, dtype):
        b1, b2, eps = (_f64(h) for h in hyper)
        inv_bc1 = 1 / (1 - b1**step)
        inv_bc2_sqrt = 1 / torch.sqrt(1 - b2**step)
        return tuple(x.to(dtype) for x in (1 - b1, b2, torch.sqrt(1 - b2), inv_bc1, inv_bc2_sqrt, eps))

    def math(self, g, moments, s):
        one_minus_b1, b2, weight, inv_bc1, inv_bc2_sqrt, eps = s
        m = _lerp(moments[0], g, one_minus_b1)
        v = _saturate(moments[1] * b2 + _square(g * weight), g)
        new = [m, v]
        if self.amsgrad:
            new.append(torch.maximum(moments[2], v))
        return (m * inv_bc1) / (sqrt(new[-1]) * inv_bc2_sqrt + eps), new


@dataclass(frozen=True)
class Lion(Rule):
    """Lion (Chen et al., arXiv:2302.06675): one signed moment ``m``; hyper ``(b1, b2)``.

    ``direction = sign(b1 * m + (1 - b1) * g)`` (NaN stays NaN), then ``m = b2 * m + (1 - b2) * g``, both as
    lerps."""

    native_id: ClassVar[int] = 1

    def signed(self):
        return (True,)

    def scalars(self, step, hyper, dtype):
        b1, b2 = (_f64(h) for h in hyper)
        return ((1 - b1).to(dtype), (1 - b2).to(dtype))

    def math(self, g, moments, s):
        one_minus_b1, one_minus_b2 = s
        c = _lerp(moments[0], g, one_minus_b1)
        direction = torch.where(torch.isnan(c), c, torch.sign(c))
        return direction, [_lerp(moments[0], g, one_minus_b2)]


@dataclass(frozen=True)
class Trace(Rule):
    """SGD's momentum (torch.optim.SGD semantics): the signed moment ``buf`` when ``momentum``; hyper
    ``(momentum, dampening)``.

    ``buf = buf * a + g * c`` with ``(a, c) = (0, 1)`` on the first step (torch starts the buffer at the
    gradient) and ``(momentum, 1 - dampening)`` after; ``direction = g + momentum * buf`` (nesterov) or
    ``buf``. Without momentum there is no moment and the direction is the gradient."""

    nesterov: bool = False
    momentum: bool = True
    native_id: ClassVar[int] = 2

    def signed(self):
        return (True,) if self.momentum else ()

    def flags(self):
        return int(self.nesterov) | (4 if self.momentum else 0)

    def scalars(self, step, hyper, dtype):
        momentum, dampening = (_f64(h) for h in hyper)
        first = step == 1
        a = torch.where(first, torch.zeros_like(momentum), momentum)
        c = torch.where(first, torch.ones_like(dampening), 1 - dampening)
        return (a.to(dtype), c.to(dtype), momentum.to(dtype))

    def math(self, g, moments, s):
        if not self.momentum:
            return g, []
        a, c, momentum = s
        buf = moments[0] * a + g * c
        return (g + buf * momentum if self.nesterov else buf), [buf]


@dataclass(frozen=True)
class RMS(Rule):
    """RMSprop (torch.optim.RMSprop semantics): ``square_avg`` (unsigned), or when ``centered`` the variance
    ``grad_var`` (unsigned) and ``grad_avg`` (signed); ``momentum_buffer`` when ``momentum`` (signed); hyper
    ``(alpha, eps, momentum)``.

    ``square_avg = square_avg * alpha + g * g * (1 - alpha)`` and ``avg = sqrt(square_avg) + eps``. Centered, the
    state is the variance itself, updated in Welford's form: ``grad_var = grad_var * alpha + (g - grad_avg)**2 *
    alpha * (1 - alpha)`` with the old ``grad_avg``, then ``grad_avg`` lerps to ``g`` by ``1 - alpha`` and ``avg =
    sqrt(grad_var) + eps``. That is torch's ``square_avg - grad_avg**2`` exactly in real arithmetic (torch's
    ``square_avg`` is ``grad_var + grad_avg**2``), but never a difference of two stored values: quantized, both
    would carry errors of about 1% of ``square_avg``, and for a gradient with a steady part (variance 1% of
    ``square_avg``) the difference reached 0 and the step ``g / eps``. ``direction = g / avg``, or with momentum
    ``buf = buf * momentum + g / avg`` and ``direction = buf``."""

    centered: bool = False
    momentum: bool = False
    native_id: ClassVar[int] = 3

    def signed(self):
        return (False,) + ((True,) if self.centered else ()) + ((True,) if self.momentum else ())

    def flags(self):
        return (2 if self.centered else 0) | (4 if self.momentum else 0)

    def scalars(self, step, hyper, dtype):
        alpha, eps, momentum = (_f64(h) for h in hyper)
        weight = torch.sqrt(alpha * (1 - alpha)) if self.centered else torch.sqrt(1 - alpha)
        return tuple(x.to(dtype) for x in (alpha, 1 - alpha, eps, momentum, weight))

    def math(self, g, moments, s):
        alpha, one_minus_alpha, eps, momentum, weight = s
        if self.centered:
            grad_var = _saturate(moments[0] * alpha + _square((g - moments[1]) * weight), g)
            new = [grad_var, _lerp(moments[1], g, one_minus_alpha)]
            avg = sqrt(grad_var) + eps
        else:
            square_avg = _saturate(moments[0] * alpha + _square(g * weight), g)
            new = [square_avg]
            avg = sqrt(square_avg) + eps
        direction = g / avg
        if self.momentum:
            direction = moments[-1] * momentum + direction
            new.append(direction)
        return direction, new


@dataclass(frozen=True)
class AdEMAMix(Rule):
    """AdEMAMix (Pagliardini, Ablin, Grangier, arXiv:2409.03137, Algorithm 1): ``m1`` (fast EMA, signed), ``m2``
    (slow EMA, signed), ``nu`` (unsigned); hyper ``(b1, b2, b3, alpha, eps)``. ``t_alpha``/``t_beta3`` (``None``:
    no warm-up) are the warm-up lengths of the paper's schedulers ``alpha(t) = min(t * alpha / T_alpha, alpha)``
    and ``b3(t) = min(exp(ln(b1) ln(b3) / ((1 - t / T) ln(b3) + (t / T) ln(b1))), b3)``.

    ``direction = (m1 / (1 - b1**t) + alpha(t) * m2) / (sqrt(nu) / sqrt(1 - b2**t) + eps)``."""

    t_alpha: int | None = None
    t_beta3: int | None = None
    native_id: ClassVar[int] = 4

    def signed(self):
        return (True, True, False)

    def scalars(self, step, hyper, dtype):
        b1, b2, b3, alpha, eps = (_f64(h) for h in hyper)
        t = step.to(torch.float64)
        if self.t_alpha:
            alpha = torch.minimum(t * alpha / self.t_alpha, alpha)
        if self.t_beta3:
            frac = t / self.t_beta3
            ln1, ln3 = torch.log(b1), torch.log(b3)
            b3 = torch.minimum(torch.exp(ln1 * ln3 / ((1 - frac) * ln3 + frac * ln1)), b3)
        inv_bc1 = 1 / (1 - b1**step)
        inv_bc2_sqrt = 1 / torch.sqrt(1 - b2**step)
        return tuple(x.to(dtype) for x in (1 - b1, b2, torch.sqrt(1 - b2), inv_bc1, inv_bc2_sqrt, eps, 1 - b3, alpha))

    def math(self, g, moments, s):
        one_minus_b1, b2, weight, inv_bc1, inv_bc2_sqrt, eps, one_minus_b3, alpha = s
        m1 = _lerp(moments[0], g, one_minus_b1)
        m2 = _lerp(moments[1], g, one_minus_b3)
        nu = _saturate(moments[2] * b2 + _square(g * weight), g)
        return (m1 * inv_bc1 + m2 * alpha) / (sqrt(nu) * inv_bc2_sqrt + eps), [m1, m2, nu]


@dataclass(frozen=True)
class MuonMomentum(Rule):
    """Muon's momentum (torch.optim.Muon semantics), before the orthogonalization: the signed moment ``buf``;
    hyper ``(momentum,)``. ``buf`` lerps to ``g`` by ``1 - momentum``; ``direction = g + momentum * (buf - g)``
    (nesterov) or ``buf``."""

    nesterov: bool = True
    native_id: ClassVar[int] = 5

    def signed(self):
        return (True,)

    def flags(self):
        return int(self.nesterov)

    def scalars(self, step, hyper, dtype):
        momentum = _f64(hyper[0])
        return ((1 - momentum).to(dtype), momentum.to(dtype))

    def math(self, g, moments, s):
        one_minus_momentum, momentum = s
        buf = _lerp(moments[0], g, one_minus_momentum)
        return (_lerp(g, buf, momentum) if self.nesterov else buf), [buf]

