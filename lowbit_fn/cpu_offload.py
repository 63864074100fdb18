"""``CPUOffloadOptimizer``: any torch.optim optimizer stepping on host copies of accelerator parameters.

References:
  Ren et al., "ZeRO-Offload: Democratizing Billion-Scale Model Training", arXiv:2101.06840.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from .torch_optim import evaluate_closure, load_pre_hooks
from .transforms.offload import is_accelerator

__all__ = ["CPUOffloadOptimizer"]

_HOST = torch.device("cpu")


def _needs_copy(param: Tensor) -> bool:
    """Whether ``param`` needs a host copy (it lives on an accelerator). CPU parameters are stepped in place."""
    return param.device != _HOST


class _Mirror:
    """One parameter's host side: its host copy and gradient buffers, and what was last copied."""

    def __init__(self, param: Tensor):
        pin = is_accelerator(param.device)
        self.host = torch.empty(param.shape, dtype=param.dtype, device=_HOST, pin_memory=pin)
        self.host.copy_(param.detach())
        self.grad = torch.empty_like(self.host, pin_memory=pin)
        self.staging: Tensor | None = None  # second buffer for accumulating offloaded gradients
        self.pin = pin
        self.has_grad = False  # offload_gradients: the host buffer holds this accumulation window's gradient
        # offload_gradients: ``staging`` is to be added to ``grad`` (True), or once this device event has passed
        self.pending: Any = None
        self.copied: tuple[Tensor, int] | None = None  # the device gradient (and its version) last copied
        self.seen = (param._version, param.data_ptr())  # the param as last written by us

    def resolve(self) -> None:
        """Finish a pending accumulation into the host gradient."""
        if self.pending is not None:
            if self.pending is not True:
                self.pending.synchronize()
            self.grad.add_(self.staging)
            self.pending = None


class CPUOffloadOptimizer(torch.optim.Optimizer):
    """Run ``optimizer_class`` on the host, over host copies of the parameters (ZeRO-Offload style).

    Gradients are copied to pinned host buffers as soon as backward produces them (post-accumulate-grad hooks,
    overlapping the rest of backward); ``step()`` runs the wrapped optimizer on the host, then copies the updated
    parameters back without blocking. Parameters already on the CPU are stepped in place, with no copy at all.

    What works as without offload (each tested):

    - ``param_groups`` are the user's groups (with the device parameters): LR schedulers, ``add_param_group``,
      ``state_dict``/``load_state_dict`` (the wrapped optimizer's format) behave as for the wrapped optimizer.
    - Gradient clipping: with ``offload_gradients=False``, ``torch.nn.utils.clip_grad_norm_`` on the model's
      parameters before ``step()`` (a gradient changed after its copy is copied again: version counters tell).
      With ``offload_gradients=True`` the device gradients are gone: call ``opt.clip_grad_norm_(max_norm)``,
      which clips the host gradients and returns the total norm (it works in both modes).
    - Gradient accumulation, also with ``offload_gradients=True`` (accumulated on the host until ``zero_grad``).
    - Parameters written from outside after construction (``model.load_state_dict``, in-place init) are noticed
      at the next step and their host copies refreshed.

    Args:
      params: parameters or param-group dicts.
      optimizer_class: any ``torch.optim.Optimizer`` class, e.g. ``torch.optim.AdamW`` or ``lowbit_fn.AdamW8bit``.
      offload_gradients: free each device gradient once copied (saves device memory; ``.grad`` reads ``None``).
      **kwargs: arguments of ``optimizer_class``.

    Example:
        >>> import torch, lowbit_fn
        >>> model = torch.nn.Linear(64, 64)  # on an accelerator in real use
        >>> opt = lowbit_fn.CPUOffloadOptimizer(model.parameters(), lowbit_fn.AdamW8bit, lr=1e-3)
        >>> model(torch.randn(4, 64)).sum().backward()
        >>> opt.clip_grad_norm_(1.0).item() > 0
        True
        >>> opt.step(); opt.zero_grad()
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        optimizer_class: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW,
        *,
        offload_gradients: bool = False,
        **kwargs: Any,
    ):
        if not isinstance(offload_gradients, bool):
            raise TypeError(f"offload_gradients must be a bool, got {type(offload_gradients).__name__}")
        groups = list(params) if not isinstance(params, Tensor) else None
        if not groups:
            raise ValueError("CPUOffloadOptimizer got an empty parameter list" if groups == [] else "params must be an iterable of tensors or dicts")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self.offload_gradients = offload_gradients
        self._mirrors: dict[Tensor, _Mirror] = {}
        self._hooks: list[Any] = []
        host_groups = [self._host_group(g) for g in groups]
        self.optimizer = optimizer_class(host_groups, **kwargs)
        mirrored = [self._device_group(g, ig) for g, ig in zip(groups, self.optimizer.param_groups)]
        super().__init__(mirrored, dict(self.optimizer.defaults))
        self._sync_state()

    # -- construction ------------------------------------------------------------------------------------------

    def _host_group(self, group: dict[str, Any]) -> dict[str, Any]:
        """The group with host copies of its parameters (creating mirrors and gradient hooks as needed)."""
        group = dict(group)
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        group["params"] = [self._host_param(p) for p in params]
        return group

    def _host_param(self, item: Any) -> Any:
        if isinstance(item, tuple):  # (name, param) from named_parameters()
            return (item[0], self._host_param(item[1]))
        if not isinstance(item, Tensor):
            raise TypeError(f"CPUOffloadOptimizer can only optimize tensors, got {type(item).__name__}")
        if not _needs_copy(item):
            return item
        if item not in self._mirrors:
            self._mirrors[item] = _Mirror(item)
            if item.requires_grad:
                self._hooks.append(item.register_post_accumulate_grad_hook(self._grad_ready))
        return self._mirrors[item].host

    @staticmethod
    def _device_group(group: dict[str, Any], host_group: dict[str, Any]) -> dict[str, Any]:
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        mirrored = {k: v for k, v in host_group.items() if k not in ("params", "param_names")}
        mirrored["params"] = params
        return mirrored

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer and mirror it here (with the wrapped optimizer's defaults)."""
        if len(self.param_groups) < len(self.optimizer.param_groups):
            super().add_param_group(param_group)  # __init__ mirroring a group the wrapped optimizer already has
            return
        self.optimizer.add_param_group(self._host_group(param_group))
        super().add_param_group(self._device_group(param_group, self.optimizer.param_groups[-1]))

    # -- gradients ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _grad_ready(self, param: Tensor) -> None:
        """Post-accumulate-grad hook: start the copy of ``param``'s gradient to the host."""
        mirror = self._mirrors[param]
        grad = param.grad
        if grad is None:
            return
        if not self.offload_gradients:
            mirror.grad.copy_(grad, non_blocking=mirror.pin)
            mirror.copied = (grad, grad._version)
            return
        if not mirror.has_grad:
            mirror.grad.copy_(grad, non_blocking=mirror.pin)
            mirror.has_grad = True
        else:  # accumulate on the host: stage the copy, add it once it has landed
            mirror.resolve()
            if mirror.staging is None:
                mirror.staging = torch.empty_like(mirror.grad, pin_memory=mirror.pin)
            mirror.staging.copy_(grad, non_blocking=mirror.pin)
            mirror.pending = True
            if mirror.pin:
                mirror.pending = torch.Event(device=param.device)
                mirror.pending.record()
        param.grad = None

    @torch.no_grad()
    def _gather_grads(self) -> list[Tensor]:
        """Bring every host gradient up to date; returns the params that have one (host side)."""
        waited = set()
        for param, mirror in self._mirrors.items():
            if self.offload_gradients:
                mirror.resolve()
                mirror.host.grad = mirror.grad if mirror.has_grad else None
            elif param.grad is None:
                mirror.host.grad = None
            else:
                grad = param.grad
                if mirror.copied is None or mirror.copied[0] is not grad or mirror.copied[1] != grad._version:
                    mirror.grad.copy_(grad, non_blocking=mirror.pin)  # new, or changed since (clipping, unscaling)
                    mirror.copied = (grad, grad._version)
                mirror.host.grad = mirror.grad
            if mirror.pin and mirror.host.grad is not None:
                waited.add(param.device)  # the host reads these buffers next: wait for the copies to land
        for device in waited:
            torch.accelerator.synchronize(device)
        return [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over the gradients the next ``step()`` will use (on the host)."""
        return torch.nn.utils.clip_grad_norm_(
            self._gather_grads(), max_norm, norm_type=norm_type, error_if_nonfinite=error_if_nonfinite
        )

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for mirror in self._mirrors.values():
            mirror.pending = None
            mirror.copied = None
            if set_to_none:
                mirror.has_grad = False
                mirror.host.grad = None
            elif mirror.has_grad:
                mirror.grad.zero_()

    # -- the step ----------------------------------------------------------------------------------------------

    def _push_groups(self) -> None:
        """Hyperparameters set here (by schedulers or by hand) go to the wrapped optimizer."""
        for mine, theirs in zip(self.param_groups, self.optimizer.param_groups):
            theirs.update({k: v for k, v in mine.items() if k not in ("params", "param_names")})

    def _sync_state(self) -> None:
        """``self.state[device param]`` is the wrapped optimizer's state of its host copy (the same dict)."""
        state = defaultdict(dict)
        for mine, theirs in zip(self.param_groups, self.optimizer.param_groups):
            for p, h in zip(mine["params"], theirs["params"]):
                if h in self.optimizer.state:
                    state[p] = self.optimizer.state[h]
        self.state = state

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Evaluate the closure (if any), bring host copies and gradients up to date, step on the host, copy back."""
        loss = evaluate_closure(closure)
        for param, mirror in self._mirrors.items():  # written from outside (e.g. model.load_state_dict)?
            if (param._version, param.data_ptr()) != mirror.seen:
                mirror.host.copy_(param.detach())
                mirror.seen = (param._version, param.data_ptr())
        self._gather_grads()
        self._push_groups()
        self.optimizer.step()
        for param, mirror in self._mirrors.items():
            if mirror.host.grad is not None:
                param.copy_(mirror.host, non_blocking=mirror.pin)
                mirror.seen = (param._version, param.data_ptr())
        self._sync_state()
        return loss

    # -- checkpoints -------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's ``state_dict`` (with this optimizer's current hyperparameters)."""
        self._push_groups()
        self._sync_state()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict`` of the wrapped optimizer's kind (it validates and places the state on the host)."""
        state_dict = load_pre_hooks(self, state_dict)
        self.optimizer.load_state_dict(state_dict)
        for mine, theirs in zip(self.param_groups, self.optimizer.param_groups):
            mine.update({k: v for k, v in theirs.items() if k not in ("params", "param_names")})
        self._sync_state()
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)
