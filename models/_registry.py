"""The registry: name → factory, example-input factory and a one-line description."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ReferenceModel:
    name: str
    family: str
    description: str
    factory: Callable[[], nn.Module]
    example_input: Callable[[int], torch.Tensor]

    def build(self) -> nn.Module:
        """A fresh, calibrated model in eval mode; the same weights on every call."""
        with torch.random.fork_rng():
            torch.manual_seed(zlib.crc32(self.name.encode()))
            return self.factory()

    def inputs(self, batch_size: int = 1) -> tuple[torch.Tensor, ...]:
        """Example inputs at ``batch_size`` (seeded)."""
        return (self.example_input(batch_size),)


REGISTRY: dict[str, ReferenceModel] = {}


def register(
    name: str, family: str, description: str, input_shape: tuple[int, ...]
) -> Callable[[Callable[[], nn.Module]], Callable[[], nn.Module]]:
    """Decorator: register a factory whose example input has ``input_shape`` (without batch)."""

    def example(batch_size: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(1234)
        return torch.randn((batch_size, *input_shape), generator=g)

    def wrap(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
        REGISTRY[name] = ReferenceModel(name, family, description, factory, example)
        return factory

    return wrap


def get(name: str) -> ReferenceModel:
    """Look up a model by name; KeyError lists the known names."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown reference model '{name}' (known: {', '.join(names())})"
        ) from None


def names() -> list[str]:
    return list(REGISTRY)


def randomize_norm_affine(model: nn.Module, seed: int) -> None:
    """Give every norm layer's affine weight/bias non-trivial values (as training would)."""
    g = torch.Generator().manual_seed(seed)
    norm_types = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, norm_types):
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))


def calibrate(
    model: nn.Module, input_shape: tuple[int, ...], seed: int, steps: int = 6, batch: int = 8
) -> nn.Module:
    """Make running statistics the way training does, then return the model in eval mode.

    Several train-mode passes over batches with per-step shift and scale move BatchNorm's (and
    tracking InstanceNorm's) running mean/var far from 0/1.
    """
    torch.manual_seed(seed)
    randomize_norm_affine(model, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase):
            m.momentum = 0.5
    model.train()
    with torch.no_grad():
        for step in range(steps):
            shift = 0.5 + 0.3 * step
            scale = 1.5 + 0.25 * step
            x = torch.randn((batch, *input_shape), generator=g) * scale + shift
            model(x)
    return model.eval()
