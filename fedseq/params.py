"""Flat parameter layout: the order and shapes in which a model's tensors become one ``[D]`` vector.

Updates travel as named tensors; the server stacks them into ``[K, D]`` with this layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Layout:
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, model: nn.Module) -> Layout:
        items = list(model.named_parameters())
        return cls(tuple(n for n, _ in items), tuple(tuple(p.shape) for _, p in items))

    @property
    def sizes(self) -> tuple[int, ...]:
        out = []
        for s in self.shapes:
            n = 1
            for d in s:
                n *= d
            out.append(n)
        return tuple(out)

    @property
    def dim(self) -> int:
        return sum(self.sizes)

    def flatten(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``{name: tensor}`` -> ``[D]``; raises on a missing name or a wrong shape."""
        self.check(tensors)
        return torch.cat([tensors[n].reshape(-1).to(torch.float32) for n in self.names])

    def flatten_into(self, tensors: Mapping[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        """Write ``{name: tensor}`` into the ``[D]`` view ``out`` (no intermediate copy); returns ``out``."""
        self.check(tensors)
        offset = 0
        for n, size in zip(self.names, self.sizes, strict=True):
            out[offset : offset + size].copy_(tensors[n].reshape(-1))
            offset += size
        return out

    def flatten_batch(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``{name: [K, *shape]}`` -> ``[K, D]``."""
        k = tensors[self.names[0]].shape[0]
        return torch.cat([tensors[n].reshape(k, -1).to(torch.float32) for n in self.names], dim=1)

    def unflatten(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[D]`` -> ``{name: tensor}`` (views into ``vec``)."""
        if vec.shape != (self.dim,):
            raise ValueError(f"expected a [{self.dim}] vector, got {tuple(vec.shape)}")
        parts = torch.split(vec, list(self.sizes))
        return {n: p.view(s) for n, p, s in zip(self.names, parts, self.shapes, strict=True)}

    def check(self, tensors: Mapping[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in tensors]
        extra = [n for n in tensors if n not in self.names]
        if missing or extra:
            raise ValueError(f"tensor names differ from the model layout: missing {missing}, unexpected {extra}")
        for n, s in zip(self.names, self.shapes, strict=True):
            if tuple(tensors[n].shape) != s:
                raise ValueError(f"tensor {n!r} has shape {tuple(tensors[n].shape)}, the model expects {s}")


def get_vector(model: nn.Module) -> torch.Tensor:
    """The model's parameters as one ``[D]`` float32 vector (a copy)."""
    return torch.cat([p.detach().reshape(-1).to(torch.float32) for p in model.parameters()])


def set_vector(model: nn.Module, vec: torch.Tensor) -> None:
    """Load a ``[D]`` vector into the model's parameters in place."""
    layout = Layout.of(model)
    with torch.no_grad():
        for (_n, p), part in zip(model.named_parameters(), layout.unflatten(vec).values(), strict=True):
            p.copy_(part)
