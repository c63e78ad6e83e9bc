"""A typed listing of the reference models: norm layers by kind and parameter counts."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from normdeploy.modelspec import reference_registry
from normdeploy.reference import norm_kind
from normdeploy.report import markdown_table, text_table


@dataclass(frozen=True)
class ModelEntry:
    name: str
    family: str
    description: str
    parameters: int
    input_shape: tuple[int, ...]
    norm_layers: dict[str, int]

    def norms_text(self) -> str:
        return ", ".join(f"{n}×{k}" for k, n in self.norm_layers.items()) or "-"


@dataclass(frozen=True)
class ModelListing:
    entries: list[ModelEntry] = field(default_factory=list)

    HEADERS = ("model", "family", "norm layers", "params", "input", "description")

    def _rows(self) -> list[list[Any]]:
        return [
            [e.name, e.family, e.norms_text(), f"{e.parameters:,}",
             "x".join(map(str, e.input_shape)), e.description]
            for e in self.entries
        ]  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {"models": [e.__dict__ for e in self.entries]}

    def to_text(self) -> str:
        return text_table(self.HEADERS, self._rows())

    def to_markdown(self) -> str:
        return markdown_table(self.HEADERS, self._rows())


def norm_layer_counts(module: Any) -> dict[str, int]:
    """Norm modules by class name, e.g. {'BatchNorm2d': 3, 'LayerNorm': 2}."""
    counts = Counter(type(m).__name__ for m in module.modules() if norm_kind(m))
    return dict(sorted(counts.items()))


def describe_reference_models() -> ModelListing:
    registry = reference_registry()
    entries = []
    for name in registry.names():
        ref = registry.get(name)
        module = ref.build()
        entries.append(
            ModelEntry(
                name=name,
                family=ref.family,
                description=ref.description,
                parameters=sum(p.numel() for p in module.parameters()),
                input_shape=tuple(ref.inputs(1)[0].shape),
                norm_layers=norm_layer_counts(module),
            )
        )
    return ModelListing(entries)
