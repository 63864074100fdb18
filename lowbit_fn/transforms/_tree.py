"""TensorDict helpers: conversion, ordered leaves, structural checks, params from an ``nn.Module``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Iterable

import torch
from tensordict import TensorDict, TensorDictBase
from torch import Tensor

from .._sharding import is_dtensor

Key = tuple[str, ...]
Tree = TensorDictBase | Mapping[str, Any]

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def as_tensordict(tree: Tree, what: str = "updates") -> TensorDictBase:
    """A TensorDict as it is, or a (nested) mapping of tensors converted to one with an empty batch size."""
    if isinstance(tree, TensorDictBase):
        return tree
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            if not isinstance(k, str):
                raise TypeError(f"{what}: keys must be strings, got {k!r}")
            if not isinstance(v, (Tensor, Mapping)):
                raise TypeError(f"{what}[{k!r}] must be a tensor or a mapping of tensors, got {type(v).__name__}")
        return TensorDict(dict(tree), batch_size=[])
    raise TypeError(f"{what} must be a TensorDict or a mapping of tensors, got {type(tree).__name__}")


def leaves(tree: TensorDictBase) -> tuple[list[Key], list[Tensor]]:
    """Leaf keys (as tuples) in sorted order, and the tensors in the same order."""
    items = sorted(
        ((k if isinstance(k, tuple) else (k,)), v) for k, v in tree.items(include_nested=True, leaves_only=True)
    ) if len(tree.keys()) else []
    return [k for k, _ in items], [v for _, v in items]


def build(keys: Iterable[Key], tensors: Iterable[Tensor]) -> TensorDict:
    """The TensorDict with ``tensors`` at the (nested) ``keys``."""
    root: dict[str, Any] = {}
    for key, value in zip(keys, tensors):
        node = root
        for part in key[:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = value
    return TensorDict(root, batch_size=[])


def name(key: Key) -> str:
    return ".".join(key)


Signature = list[tuple[Key, torch.Size, torch.dtype]]


def signature(tree: TensorDictBase) -> Signature:
    """(key, shape, dtype) of every leaf, in sorted key order."""
    keys, values = leaves(tree)
    return [(k, v.shape, v.dtype) for k, v in zip(keys, values)]


def check_like(
    tree: TensorDictBase, reference: Signature, what: str, ref_what: str, *, same_dtype: bool = True
) -> tuple[list[Key], list[Tensor]]:
    """Raise ``ValueError`` unless ``tree`` has exactly the keys, shapes (and dtypes) of the ``reference``
    signature; ``TypeError`` for sparse or non-floating leaves. Returns ``tree``'s sorted keys and leaves."""
    keys, values = leaves(tree)
    ref_keys = [k for k, _, _ in reference]
    if keys != ref_keys:
        missing = sorted(set(ref_keys) - set(keys))
        extra = sorted(set(keys) - set(ref_keys))
        parts = []
        for label, found in (("missing", missing), ("unexpected", extra)):
            if found:
                parts.append(f"{label} " + ", ".join(repr(name(k)) for k in found[:5]) + (" ..." if len(found) > 5 else ""))
        raise ValueError(f"{what} do not have the keys of the {ref_what}: " + "; ".join(parts))
    for key, value, (_, shape, dtype) in zip(keys, values, reference):
        check_leaf(key, value, what)
        if value.shape != shape:
            raise ValueError(f"{what}[{name(key)!r}] has shape {tuple(value.shape)}, the {ref_what} have {tuple(shape)}")
        if same_dtype and value.dtype != dtype:
            raise ValueError(f"{what}[{name(key)!r}] has dtype {value.dtype}, the {ref_what} have {dtype}")
    return keys, values


def check_leaf(key: Key, value: Tensor, what: str) -> None:
    """Raise ``TypeError`` for sparse, non-floating or DTensor leaves."""
    if is_dtensor(value):
        raise TypeError(
            f"{what}[{name(key)!r}] is a DTensor: the functional API steps plain tensors; for FSDP2-sharded parameters "
            "use the torch.optim front end (lowbit_fn.AdamW8bit, ..., as_torch_optimizer), which steps each rank's rows"
        )
    if value.layout != torch.strided:
        raise TypeError(f"{what}[{name(key)!r}] is a {value.layout} tensor; sparse gradients are not supported")
    if value.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{what}[{name(key)!r}] has unsupported dtype {value.dtype} (use float32, float64, bfloat16 or float16)")


def params_from_module(module: torch.nn.Module) -> TensorDict:
    """The module's trainable parameters as a TensorDict keyed like the module (nested), tied weights once.

    The tensors are detached views sharing storage with the module's parameters, ready for a ``torch.func`` loop.

    Example:
        >>> import torch, lowbit_fn
        >>> params = lowbit_fn.params_from_module(torch.nn.Sequential(torch.nn.Linear(3, 4)))
        >>> sorted(params.keys(include_nested=True, leaves_only=True))
        [('0', 'bias'), ('0', 'weight')]
    """
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]  # tied weights are listed once
    return build([tuple(n.split(".")) for n, _ in named], [p.detach() for _, p in named])
