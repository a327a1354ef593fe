"""Which tensors of a model travel between server and clients, and their flat-vector layout.

The *payload* is the set of trainable parameters (those with ``requires_grad`` that match the
``trainable`` patterns) plus, optionally, the floating-point buffers of the modules that own them
(BatchNorm statistics). Frozen weights never leave the worker: fine-tuning a head of a large model costs
a head on the wire. Updates are flat float32 vectors in the order of :attr:`ParamSpec.names`, which makes
clipping, noising, masking and all-reducing one tensor operation each.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class ParamSpec:
    """Names, shapes and offsets of the payload tensors in a flat vector."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    is_buffer: tuple[bool, ...]

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(int(torch.Size(s).numel()) for s in self.shapes)

    @property
    def numel(self) -> int:
        """Length of the flat vector."""
        return sum(self.numels)

    @property
    def num_bytes(self) -> int:
        """Bytes of one payload on the wire (float32)."""
        return 4 * self.numel

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        trainable: Sequence[str] | None = None,
        include_buffers: bool = True,
    ) -> ParamSpec:
        """Select the payload of ``module`` and freeze everything else.

        Args:
            module: The model.
            trainable: ``fnmatch`` patterns on parameter names (``"head.*"``, ``"*lora_*"``). ``None``
                keeps every parameter that already has ``requires_grad`` (so a PEFT model's own choice
                is respected). Parameters that do not match are frozen (``requires_grad=False``).
            include_buffers: Also carry floating-point buffers of modules that own a trainable
                parameter (BatchNorm running statistics), so the global model's statistics follow.

        Raises:
            ValueError: if a pattern matches no parameter, or nothing is trainable.
        """
        params = dict(module.named_parameters())
        if trainable is not None:
            patterns = list(trainable)
            for pattern in patterns:
                if not any(fnmatch.fnmatchcase(n, pattern) for n in params):
                    raise ValueError(
                        f"trainable pattern {pattern!r} matches no parameter of {type(module).__name__}; "
                        f"parameter names look like {list(params)[:6]}. Fix `trainer.trainable`."
                    )
            for name, p in params.items():
                if not any(fnmatch.fnmatchcase(name, pat) for pat in patterns):
                    p.requires_grad_(False)
        names = [n for n, p in params.items() if p.requires_grad]
        if not names:
            raise ValueError(f"{type(module).__name__} has no trainable parameter: nothing to federate.")
        shapes = [params[n].shape for n in names]
        is_buffer = [False] * len(names)
        if include_buffers:
            owners = {n.rsplit(".", 1)[0] if "." in n else "" for n in names}
            for bname, buf in module.named_buffers():
                owner = bname.rsplit(".", 1)[0] if "." in bname else ""
                if owner in owners and buf.is_floating_point():
                    names.append(bname)
                    shapes.append(buf.shape)
                    is_buffer.append(True)
        return cls(tuple(names), tuple(shapes), tuple(is_buffer))

    @property
    def has_buffers(self) -> bool:
        return any(self.is_buffer)

    def tensors(self, module: nn.Module) -> list[Tensor]:
        """The payload tensors of ``module`` (live parameters and buffers), in spec order."""
        params = dict(module.named_parameters())
        buffers = dict(module.named_buffers())
        return [buffers[n] if b else params[n] for n, b in zip(self.names, self.is_buffer)]

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """Concatenate ``tensors`` into one float32 vector."""
        return torch.cat([t.detach().reshape(-1).float() for t in tensors])

    def unflatten(self, flat: Tensor) -> list[Tensor]:
        """Views of ``flat`` shaped like the payload tensors."""
        return [v.view(s) for v, s in zip(torch.split(flat, self.numels), self.shapes)]

    @torch.no_grad()
    def assign(self, tensors: Sequence[Tensor], flat: Tensor) -> None:
        """Copy ``flat`` into ``tensors`` in place (no re-allocation on the hot path)."""
        for t, v in zip(tensors, self.unflatten(flat)):
            t.copy_(v)

    def state_dict_from_flat(self, flat: Tensor) -> dict[str, Tensor]:
        """``{name: tensor}`` for a flat payload vector (cloned, on CPU)."""
        return {n: v.detach().cpu().clone() for n, v in zip(self.names, self.unflatten(flat))}
