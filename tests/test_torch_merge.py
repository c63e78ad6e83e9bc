"""Module-level branch merging (normdeploy/torch_merge.py, through fold_bn_module): the merged
module against PyTorch eval of the original module, which modules its forward still calls, the
ledger (merged into which conv, or why not), and the original left untouched."""

from __future__ import annotations

import copy
import warnings
from collections import Counter

import pytest
import torch
from torch import fx, nn

from models._registry import calibrate
from models.reparam import MobileOneBlock, RepVgg, RepVggBlock, repvgg_a0
from normdeploy.torch_fold import fold_bn_module, fold_bn_module_with_ledger

# float32 both ways; the merged conv re-associates ≤ 16·3·3 products per output across 3-5
# branches: rounding ~1e-6 of the output's scale. 1e-5 of the scale leaves ~10× margin; a tap
# one position off or a dropped shift moves outputs by ~10⁻¹ of it.
REL32 = 1e-5


def _calibrated(module: nn.Module, shape: tuple[int, ...], seed: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return calibrate(module, shape, seed=seed, steps=3, batch=4)


def _assert_same_output(original: nn.Module, merged: nn.Module, *inputs: torch.Tensor) -> None:
    with torch.no_grad():
        expected = copy.deepcopy(original).eval()(*inputs)
        got = merged(*inputs)
    scale = float(expected.abs().max())
    err = float((got - expected).abs().max())
    assert err <= REL32 * scale, f"max |Δ| {err:.3g} > {REL32:g} × scale {scale:.3g}"


def _calls(module: nn.Module, *inputs: torch.Tensor) -> Counter[str]:
    """Leaf modules the forward actually calls, by type (nn.Identity computes nothing)."""
    seen: Counter[str] = Counter()
    handles = [
        m.register_forward_hook(lambda mod, *_: seen.update([type(mod).__name__]))
        for m in module.modules()
        if not list(m.children()) and type(m) is not nn.Identity
    ]
    with torch.no_grad():
        module(*inputs)
    for h in handles:
        h.remove()
    return seen


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ----------------------------------------------------------------------------- merged


@pytest.mark.parametrize("groups", [1, 2], ids=["dense", "group2"])
def test_repvgg_block_calls_one_conv_and_equals_eval(groups) -> None:
    block = _calibrated(RepVggBlock(8, 8, groups=groups), (8, 7, 7)).train()
    before = _state(block)
    x = torch.randn(2, 8, 7, 7) * 2
    result = fold_bn_module_with_ledger(block)
    assert block.training and all(
        torch.equal(v, block.state_dict()[k]) for k, v in before.items()
    )
    merged = result.module
    assert isinstance(merged, fx.GraphModule)  # the sum was in the root's own forward
    assert _calls(merged, x) == Counter({"Conv2d": 1, "ReLU": 1})
    _assert_same_output(block, merged, x)
    identity = next(e for e in result.entries if e.batch_norm == "identity")
    assert identity.merged and not identity.folded and identity.status == "merged"
    assert identity.folded_into == "conv_kxk.conv" and "3 branches" in identity.reason
    (sum_entry,) = result.merges
    assert sum_entry.merged and sum_entry.merged_into == "conv_kxk.conv"
    assert set(sum_entry.branches) == {"conv_kxk.conv", "conv_1x1.conv", "identity"}
    assert "2 folded, 1 merged, 0 skipped" in result.to_text()
    assert result.to_dict()["merges"][0]["merged"] is True


def test_blocks_inside_a_model_become_graph_modules_and_the_model_keeps_its_class() -> None:
    """Only the modules whose forward sums branches are replaced; what the merged graph no
    longer calls stays attached, so code reading it (here: the parent's Python) still works."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = RepVgg((8, 8, 16), (1, 2, 1), num_classes=5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # read in Python at every call: a removed submodule would raise here
            assert self.body.stages[0][1].conv_1x1.conv.stride == (1, 1)
            return self.body(x)

    net = _calibrated(Net(), (3, 16, 16))
    x = torch.randn(2, 3, 16, 16)
    result = fold_bn_module_with_ledger(net, x)
    merged = result.module
    assert type(merged) is Net and type(merged.body) is RepVgg
    block = merged.body.stages[0][1]
    assert isinstance(block, fx.GraphModule) and type(block).__name__ == "RepVggBlock"
    assert isinstance(block.conv_1x1.conv, nn.Conv2d) and isinstance(
        block.identity, nn.BatchNorm2d
    )
    assert _calls(merged, x) == Counter(
        {"Conv2d": 4, "ReLU": 4, "AdaptiveAvgPool2d": 1, "Linear": 1}
    )
    _assert_same_output(net, merged, x)
    assert len(result.merged) == 1 and sum(m.merged for m in result.merges) == 4


@pytest.mark.parametrize(
    ("k", "groups", "branches"),
    [(3, 6, 3), (1, 1, 2)],
    ids=["depthwise_3x3_three_branches", "pointwise_zero_plus_identity"],
)
def test_mobileone_blocks_merge(k, groups, branches) -> None:
    """The pointwise block sums ``0 + identity(x)`` first: the Python 0 is dropped."""
    block = _calibrated(
        MobileOneBlock(6, 6, k, groups=groups, num_conv_branches=branches), (6, 5, 5)
    )
    x = torch.randn(2, 6, 5, 5)
    merged = fold_bn_module(block)
    assert _calls(merged, x) == Counter({"Conv2d": 1, "ReLU": 1})
    _assert_same_output(block, merged, x)


def test_stride2_block_merges_its_two_convs() -> None:
    block = _calibrated(RepVggBlock(4, 8, stride=2), (4, 9, 9))
    x = torch.randn(2, 4, 9, 9)
    result = fold_bn_module_with_ledger(block)
    assert _calls(result.module, x) == Counter({"Conv2d": 1, "ReLU": 1})
    _assert_same_output(block, result.module, x)
    assert not result.merged and len(result.folded) == 2


def test_identity_bn1d_needs_example_inputs_to_prove_its_axis() -> None:
    class Block1d(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) + self.bn(x)

    block = _calibrated(Block1d(), (4, 6))
    x = torch.randn(2, 4, 6)
    without = fold_bn_module_with_ledger(block)
    (bn,) = without.entries
    assert not bn.merged and "cannot prove BatchNorm1d's axis 1" in bn.reason
    with_inputs = fold_bn_module_with_ledger(block, x)
    assert with_inputs.entries[0].merged
    assert _calls(with_inputs.module, x) == Counter({"Conv1d": 1})
    _assert_same_output(block, with_inputs.module, x)


# ----------------------------------------------------------------------------- kept


class TwoConvs(nn.Module):
    """conv_a(x) + conv_b(x) + bn(x) with the two convs given by the test."""

    def __init__(self, conv_a: nn.Conv2d, conv_b: nn.Conv2d) -> None:
        super().__init__()
        self.conv_a, self.conv_b, self.bn = conv_a, conv_b, nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_a(x) + self.conv_b(x) + self.bn(x)


@pytest.mark.parametrize(
    ("base_dilation", "conv_b", "words"),
    [
        (2, nn.Conv2d(4, 4, 2, dilation=2, padding="same"), "padding does not line up"),
        (1, nn.Conv2d(4, 4, 3, dilation=2, padding=2), "dilations 2×2 differ"),
        (1, nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), "does not pad with zeros"),
    ],
    ids=["taps_between", "dilation", "reflect_padding"],
)
def test_branch_that_does_not_line_up_is_kept_and_the_rest_merges(
    base_dilation, conv_b, words
) -> None:
    """taps_between: a 2×2 kernel with dilation 2 padded 'same' (1, 1) reads half-way between
    the taps of a 3×3 with dilation 2 padded 2, for the same output size."""
    conv_a = nn.Conv2d(4, 4, 3, dilation=base_dilation, padding=base_dilation)
    block = _calibrated(TwoConvs(conv_a, conv_b), (4, 8, 8))
    x = torch.randn(2, 4, 8, 8)
    result = fold_bn_module_with_ledger(block)
    (entry,) = result.merges
    assert entry.merged and "kept Conv2d 'conv_b'" in entry.reason and words in entry.reason
    assert _calls(result.module, x) == Counter({"Conv2d": 2})
    _assert_same_output(block, result.module, x)


@pytest.mark.parametrize("use", ["output_reused", "module_called_twice"])
def test_shared_branch_and_directly_read_identity_are_kept(use) -> None:
    """The 1×1 conv's output (or the conv itself) is used again and the identity BN's weight
    is read in forward: neither may disappear into the merged conv."""

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.k = nn.Conv2d(4, 4, 3, padding=1)
            self.p = nn.Conv2d(4, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            p = self.p(x)
            y = self.k(x) + p + self.bn(x)
            again = p if use == "output_reused" else self.p(y)
            return y + again * self.bn.weight.view(1, -1, 1, 1)

    block = _calibrated(Shared(), (4, 6, 6))
    x = torch.randn(2, 4, 6, 6)
    result = fold_bn_module_with_ledger(block)
    entry = next(m for m in result.merges if "conv" not in m.node)
    assert not entry.merged and "read directly" in entry.reason
    words = "output has other users" if use == "output_reused" else "called 2 times"
    assert words in entry.reason
    (bn,) = result.entries
    assert not bn.merged and bn.reason.startswith(
        "identity branch of 'the root module' not merged"
    )
    _assert_same_output(block, result.module, x)


def test_block_with_a_forward_hook_is_not_replaced() -> None:
    block = _calibrated(RepVggBlock(4, 4), (4, 5, 5))
    wrapper = nn.Sequential(block)
    block.register_forward_hook(lambda *_: None)
    result = fold_bn_module_with_ledger(wrapper)
    (entry,) = result.merges
    assert not entry.merged and "has forward hooks" in entry.reason
    assert type(result.module[0]) is RepVggBlock


def test_merge_false_keeps_the_branches_and_the_class() -> None:
    block = _calibrated(RepVggBlock(4, 4), (4, 5, 5))
    result = fold_bn_module_with_ledger(block, merge=False)
    assert type(result.module) is RepVggBlock and not result.merges
    assert len(result.folded) == 2 and len(result.skipped) == 1


# ----------------------------------------------------------------------------- RepVGG-A0


def test_repvgg_a0_calls_one_conv_per_block_and_exports_without_batchnorm(tmp_path) -> None:
    import onnx

    module = repvgg_a0()
    x = torch.randn(2, 3, 64, 64)
    result = fold_bn_module_with_ledger(module, x)
    merged = result.module
    assert type(merged) is RepVgg
    assert (len(result.folded), len(result.merged), len(result.skipped)) == (44, 17, 0)
    calls = _calls(merged, x)
    assert calls["Conv2d"] == 22 and calls["BatchNorm2d"] == 0
    _assert_same_output(module, merged, x)
    path = tmp_path / "a0.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(merged, (x,), str(path), dynamo=False, opset_version=17)
    histogram = Counter(n.op_type for n in onnx.load(path).graph.node)
    assert histogram["Conv"] == 22 and histogram["BatchNormalization"] == 0
