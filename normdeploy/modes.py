"""Train vs eval mode: which submodules are training and how much that changes the output.

Kept light (no exporter imports) because export and verify both report it. Everything runs on
deep copies: a train-mode forward updates BatchNorm running statistics, and the caller's module
must come back exactly as it was handed over.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from normdeploy.errors import first_line
from normdeploy.report import fmt_num, name_list
from normdeploy.verification.runners import module_outputs

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TrainModeReport:
    """Whether the module arrived in train mode, and how much that mode changes its output."""

    was_training: bool
    training_modules: tuple[str, ...] = ()
    max_abs_train_minus_eval: float | None = None
    detail: str = ""

    def summary(self, action: str = "exported in eval mode") -> str:
        """One line; ``action`` says what was done in eval mode despite a train-mode module."""
        if not self.was_training:
            return "module was in eval mode"
        names = name_list(self.training_modules, limit=6)
        diff = fmt_num(self.max_abs_train_minus_eval)
        text = (
            f"module was in TRAIN mode ({len(self.training_modules)} submodules training: "
            f"{names}); max|train - eval| on the example input = {diff}; {action}"
        )
        return text + (f"; {self.detail}" if self.detail else "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "was_training": self.was_training,
            "training_modules": list(self.training_modules),
            "max_abs_train_minus_eval": self.max_abs_train_minus_eval,
            "detail": self.detail,
        }


def training_report(
    module: torch.nn.Module,
    example_inputs: Sequence[Any],
    eval_outputs: Sequence[np.ndarray] | None = None,
) -> TrainModeReport:
    """Which submodules are training, and max|train - eval| on copies (the caller is
    untouched); ``eval_outputs``: the eval-mode outputs on ``example_inputs`` when the caller
    has them already (no eval copy is made then)."""
    import torch

    training = tuple(name or "<root>" for name, m in module.named_modules() if m.training)
    if not training:
        return TrainModeReport(False)
    try:
        train_copy = copy.deepcopy(module)  # a train-mode forward updates BN running stats
        with torch.random.fork_rng():
            torch.manual_seed(0)
            train_out = module_outputs(train_copy, example_inputs)
        del train_copy
        if eval_outputs is None:
            eval_outputs = module_outputs(copy.deepcopy(module).eval(), example_inputs)
        eval_out = eval_outputs
        diffs = [
            float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
            for a, b in zip(train_out, eval_out, strict=True)
            if a.shape == b.shape and a.size
        ]
        return TrainModeReport(True, training, max(diffs) if diffs else None)
    except Exception as exc:  # e.g. BatchNorm1d refuses batch 1 in train mode
        detail = f"train-mode forward failed: {first_line(exc)}"
        return TrainModeReport(True, training, None, detail)
