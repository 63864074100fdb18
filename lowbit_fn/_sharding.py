"""Parameters sharded by rows across processes: FSDP2's ``DTensor`` parameters (``Shard(0)`` on a 1-D mesh).

Every state tensor of the row layout has the parameter's rows as its first dimension (blocks never cross a row),
so the state of a shard is the rows of the state that the shard's rows own, whatever the world size: each rank
steps its local rows (no communication in the step), and the state is exposed as DTensors of the same mesh and
placement with the global sizes, which ``torch.distributed.checkpoint`` saves and reshards like the parameters.
Everything here is torch.distributed's own (``DTensor.from_local``, ``to_local``, ``redistribute``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # pragma: no cover - a torch build without torch.distributed
    DTensor = None  # type: ignore[assignment,misc]

__all__ = ["Sharding", "sharding_of", "is_dtensor", "local", "as_dtensor", "local_entry"]


def is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


@dataclass(frozen=True)
class Sharding:
    """Where a parameter's local rows sit: its mesh and placements, global shape, first global row and row count."""

    mesh: Any
    placements: tuple
    shape: torch.Size
    row_offset: int
    rows: int

    @property
    def base(self) -> int:
        """The global index of the local shard's first element (stochastic rounding draws by global indices)."""
        return self.row_offset * (self.shape.numel() // self.shape[0] if self.shape[0] else 0)


def sharding_of(param: Tensor, label: str) -> Sharding | None:
    """``None`` for a plain tensor; the :class:`Sharding` of a DTensor sharded by rows; a clear error for any other
    DTensor layout (tensor parallel, ``Shard(1)``, replicated, HSDP's 2-D meshes)."""
    if not is_dtensor(param):
        return None
    placements = tuple(param.placements)
    if param.device_mesh.ndim != 1 or placements != (Shard(0),) or param.dim() == 0:
        raise ValueError(
            f"{label}: a DTensor with placements {list(placements)} on a {param.device_mesh.ndim}-D mesh is not supported; "
            "lowbit_fn steps parameters sharded by rows (FSDP2's Shard(0) on a 1-D mesh): tensor parallel, Shard(1), "
            "replicated DTensors and HSDP meshes are not"
        )
    local_shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, placements)
    return Sharding(param.device_mesh, placements, param.shape, int(offset[0]), int(local_shape[0]))


def local(t: Any) -> Any:
    """The local tensor of a DTensor (the same storage), anything else as it is."""
    return t.to_local() if is_dtensor(t) else t


def as_dtensor(t: Tensor, sharding: Sharding) -> Tensor:
    """A state tensor of the local rows as a DTensor of the global rows (sharing ``t``'s storage); 0-d tensors (the
    step count, the same on every rank) stay plain."""
    if t.dim() == 0:
        return t
    shape = torch.Size([sharding.shape[0], *t.shape[1:]])
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(t, sharding.mesh, sharding.placements, run_check=False, shape=shape, stride=stride)


def local_entry(entry: dict[str, Any], sharding: Sharding, label: str) -> dict[str, Any]:
    """A checkpoint entry for a sharded parameter, in local rows: DTensors are brought to this parameter's mesh and
    placement (``redistribute`` when the checkpoint's placement differs) and read locally; plain tensors of the
    global rows (a full, gathered state dict) are cut to the local rows; everything else is kept."""
    out = {}
    for name, value in entry.items():
        if is_dtensor(value):
            if value.device_mesh != sharding.mesh:
                raise ValueError(f"{label}: the checkpoint's {name!r} is a DTensor on another device mesh than the parameter")
            if tuple(value.placements) != sharding.placements:
                value = value.redistribute(sharding.mesh, sharding.placements)
            value = value.to_local()
        elif isinstance(value, Tensor) and value.dim() >= 1 and name != "step" and value.shape[0] == sharding.shape[0]:
            value = value.narrow(0, sharding.row_offset, sharding.rows)
        out[name] = value
    return out
