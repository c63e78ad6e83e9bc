"""Tests for normdeploy.torch_fold: the fold arithmetic against a per-channel numpy oracle, and the
module pass against the unfolded module's own eval output."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from blocks import LinearNorm, TokenMLP
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.nn.utils.parametrizations import weight_norm

import models
from normdeploy.errors import InvalidArgumentError
from normdeploy.report import to_json
from normdeploy.torch_fold import (
    ModuleFoldResult,
    fold_bn_into_following_weights,
    fold_bn_into_weights,
    fold_bn_module,
    fold_bn_module_with_ledger,
)

# ---------------------------------------------------------------------------------------------
# helpers


def _bn_count(module: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def _eval_output(module: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    """Eval output of a copy, so the module under test keeps its mode."""
    ref = copy.deepcopy(module).eval()
    with torch.no_grad():
        return ref(*inputs)


def _randomize_bn(bn: nn.modules.batchnorm._BatchNorm, seed: int) -> None:
    """Statistics and affine parameters far from the identity, so a wrong fold shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 2.0)
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) * 3.0 + 0.2)
        if bn.affine:
            bn.weight.copy_(torch.randn(bn.num_features, generator=g))
            bn.bias.copy_(torch.randn(bn.num_features, generator=g))


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same_state(before: dict[str, torch.Tensor], module: nn.Module) -> None:
    after = module.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k


def _entry(result: ModuleFoldResult, bn_name: str):
    matches = [e for e in result.entries if e.batch_norm == bn_name]
    assert len(matches) == 1, [e.batch_norm for e in result.entries]
    return matches[0]


# ---------------------------------------------------------------------------------------------
# the pure arithmetic


def _numpy_fold(w, b, mean, var, eps, gamma, beta, transposed, groups):
    """The fold written per output channel o, from the weight layouts in torch's docs."""
    w = w.astype(np.float64).copy()
    c_out = mean.size
    s = gamma / np.sqrt(var + eps)
    if transposed:
        cin_g, cout_g = w.shape[0] // groups, w.shape[1]
        for o in range(c_out):
            g, j = divmod(o, cout_g)
            w[g * cin_g : (g + 1) * cin_g, j] *= s[o]
    else:
        for o in range(c_out):
            w[o] *= s[o]
    return w, (b - mean) * s + beta


@pytest.mark.parametrize(
    ("shape", "transposed", "groups"),
    [
        pytest.param((6, 4), False, 1, id="linear"),
        pytest.param((8, 2, 3, 3), False, 2, id="conv2d_group2"),
        pytest.param((8, 4, 3, 3), True, 1, id="convT2d"),
        pytest.param((8, 3, 3, 3), True, 2, id="convT2d_group2"),
        pytest.param((8, 1, 3), True, 4, id="convT1d_group4_depthwise"),
        pytest.param((4, 3, 2, 2, 2), True, 4, id="convT3d_group4"),
    ],
)
def test_fold_arithmetic_matches_per_channel_numpy(shape, transposed, groups) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    c_out = shape[1] * groups if transposed else shape[0]
    b, mean, gamma, beta = (
        torch.randn(c_out, generator=g, dtype=torch.float64) for _ in range(4)
    )
    var = torch.rand(c_out, generator=g, dtype=torch.float64) + 0.1
    new_w, new_b = fold_bn_into_weights(
        w, b, mean, var, 1e-3, gamma, beta, transposed=transposed, groups=groups
    )
    exp_w, exp_b = _numpy_fold(
        w.numpy(), b.numpy(), mean.numpy(), var.numpy(), 1e-3, gamma.numpy(), beta.numpy(),
        transposed, groups,
    )  # fmt: skip
    # float64 both ways, same operations in a different order: a few ulps
    np.testing.assert_allclose(new_w.numpy(), exp_w, rtol=1e-13, atol=0)
    np.testing.assert_allclose(new_b.numpy(), exp_b, rtol=1e-13, atol=1e-15)


def test_fold_arithmetic_defaults_and_single_cast_to_parameter_dtype() -> None:
    g = torch.Generator().manual_seed(1)
    w16 = torch.randn(4, 3, 3, 3, generator=g).half()
    mean = torch.randn(4, generator=g) * 100  # a large mean: b − μ must not be rounded in fp16
    var = torch.rand(4, generator=g) * 1e-4
    new_w, new_b = fold_bn_into_weights(w16, None, mean, var, 1e-5)
    assert new_w.dtype == new_b.dtype == torch.float16
    # Oracle: affine=False (γ=1, β=0), no bias (b=0), in float64, rounded to fp16 once.
    exp_w, exp_b = _numpy_fold(
        w16.double().numpy(), np.zeros(4), mean.double().numpy(), var.double().numpy(), 1e-5,
        np.ones(4), np.zeros(4), False, 1,
    )  # fmt: skip
    assert np.array_equal(new_w.numpy(), exp_w.astype(np.float16))
    assert np.array_equal(new_b.numpy(), exp_b.astype(np.float16))


@pytest.mark.parametrize(
    ("shape", "transposed", "groups"),
    [
        pytest.param((6, 4), False, 1, id="wrong_out_channels"),
        pytest.param((8, 4, 3), True, 2, id="convT_groups_mismatch"),
    ],
)
def test_fold_arithmetic_rejects_mismatched_shapes(shape, transposed, groups) -> None:
    stats = torch.ones(5)
    with pytest.raises(InvalidArgumentError):
        fold_bn_into_weights(
            torch.ones(shape), None, stats, stats, 1e-5, transposed=transposed, groups=groups
        )


# ---------------------------------------------------------------------------------------------
# every reference model

# BatchNorms that must fold, counted by hand from the definitions in models/.
EXPECTED_FOLDS = {
    "conv_bn_relu": 1,
    "resnet_mini": 9,  # stem + 2 per block × 3 + 2 strided shortcuts
    "mobilenet_mini": 7,  # stem + (depthwise, pointwise) × 3
    "decoder_convt": 2,  # includes the grouped ConvTranspose2d
    "mlp_bn1d": 2,
    "cnn1d": 2,
    "cnn3d": 2,
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name", models.names())
def test_reference_model_folds_and_matches(name: str, dtype: torch.dtype) -> None:
    ref_model = models.get(name)
    model = ref_model.build().to(dtype)
    inputs = tuple(x.to(dtype) for x in ref_model.inputs(2))
    before = _state(model)
    bn_before = _bn_count(model)

    result = fold_bn_module_with_ledger(model, inputs)
    folded = result.module

    _assert_same_state(before, model)  # the caller's module is untouched
    assert _bn_count(model) == bn_before
    assert not folded.training
    assert len(result.entries) == bn_before
    expected = EXPECTED_FOLDS.get(name, 0)
    assert len(result.folded) == expected, result.to_text()
    assert _bn_count(folded) == bn_before - expected

    want = _eval_output(model, *inputs)
    with torch.no_grad():
        got = folded(*inputs)
    scale = float(want.abs().max())
    if dtype == torch.float64:
        # same math re-associated in float64: ~1e-15 relative per layer
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * scale)
    else:
        # fp32: W·s is rounded once instead of rounding (W·x) then scaling; a few layers deep
        # the outputs differ by ~1e-6 of their scale, a wrong channel by O(scale)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale)


def test_without_example_inputs_fixed_rank_pairs_fold_and_bn1d_pairs_are_skipped() -> None:
    conv = fold_bn_module_with_ledger(models.get("resnet_mini").build())
    assert len(conv.folded) == 9 and not conv.skipped
    mlp_model = models.get("mlp_bn1d").build()
    mlp = fold_bn_module_with_ledger(mlp_model)
    assert not mlp.folded and len(mlp.skipped) == 2
    assert all("example_inputs" in e.reason for e in mlp.skipped)
    (x,) = models.get("mlp_bn1d").inputs(3)
    with torch.no_grad():
        assert torch.equal(mlp.module(x), _eval_output(mlp_model, x))


def test_fold_bn_module_returns_a_module_and_rejects_non_modules() -> None:
    folded = fold_bn_module(models.get("conv_bn_relu").build())
    assert isinstance(folded, nn.Sequential)
    assert _bn_count(folded) == 0
    with pytest.raises(InvalidArgumentError):
        fold_bn_module("not a module")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# grouped ConvTranspose, where torch's own fusion goes wrong


@pytest.mark.parametrize("groups", [2, 4], ids=["convT_group2", "convT_group4"])
def test_grouped_conv_transpose_folds_where_torch_fuse_fails(groups: int) -> None:
    torch.manual_seed(groups)
    model = nn.Sequential(
        nn.ConvTranspose2d(8, 8, 3, stride=2, padding=1, output_padding=1, groups=groups),
        nn.BatchNorm2d(8),
    ).eval()
    _randomize_bn(model[1], seed=groups)
    x = torch.randn(2, 8, 5, 5)
    want = _eval_output(model, x)

    # torch scales axis 1 by all C_out channels, but that axis holds C_out/groups: it raises or
    # (if a future broadcast lets it through) computes something else.
    try:
        theirs = fuse_conv_bn_eval(
            copy.deepcopy(model[0]), copy.deepcopy(model[1]), transpose=True
        )
        with torch.no_grad():
            out = theirs(x)
        torch_ok = out.shape == want.shape and torch.allclose(out, want, atol=1e-4)
    except RuntimeError:
        torch_ok = False
    assert not torch_ok, "torch's fuse_conv_bn_eval now handles grouped ConvTranspose"

    result = fold_bn_module_with_ledger(model, x)
    assert [e.folded_into for e in result.entries] == ["0"]
    with torch.no_grad():
        got = result.module(x)
    # fp32, 8/groups × 9 products per output: rounding of W·s vs (W·x)·s only
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


# ---------------------------------------------------------------------------------------------
# pairs that must be skipped


class _LinearBn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.bn = nn.BatchNorm1d(16)

    def forward(self, x):
        return self.bn(self.fc(x))


class _UnbatchedConv1dBn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 12, 3, padding=1)
        self.bn = nn.BatchNorm1d(12)

    def forward(self, x):
        return self.bn(self.conv(x))


@pytest.mark.parametrize(
    ("model_cls", "shape", "producer"),
    [
        # (N, L, F) with L == F so BatchNorm1d accepts it, yet it normalizes L, not F
        pytest.param(_LinearBn, (3, 16, 16), "fc", id="linear_on_3d_input"),
        # unbatched Conv1d gives (C, L); with L == C BatchNorm1d normalizes L
        pytest.param(_UnbatchedConv1dBn, (4, 12), "conv", id="unbatched_conv1d"),
    ],
)
def test_bn_axis_not_the_producer_channel_axis_is_skipped(model_cls, shape, producer) -> None:
    torch.manual_seed(0)
    model = model_cls().eval()
    _randomize_bn(model.bn, seed=3)
    x = torch.randn(shape)
    want = _eval_output(model, x)

    # Folding it anyway would be wrong: the premise of the skip.
    p = getattr(model, producer)
    mis_w, mis_b = fold_bn_into_weights(
        p.weight, p.bias, model.bn.running_mean, model.bn.running_var, model.bn.eps,
        model.bn.weight, model.bn.bias,
    )  # fmt: skip
    mis = copy.deepcopy(p)
    mis.weight.data, mis.bias.data = mis_w, mis_b
    with torch.no_grad():
        assert not torch.allclose(mis(x), want, atol=1e-2)

    for example in (x, None):
        result = fold_bn_module_with_ledger(model, example)
        entry = _entry(result, "bn")
        assert not entry.folded
        assert (
            ("rank" in entry.reason)
            if example is not None
            else ("example_inputs" in entry.reason)
        )
        with torch.no_grad():
            assert torch.equal(result.module(x), want)  # nothing changed, bit for bit


class _SharedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.bn2 = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn1(self.conv(x)) + self.bn2(self.conv(x * 2.0))


class _TwoUsers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class _TiedWeights(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 6, 3, padding=1)
        self.conv_b = nn.Conv2d(3, 6, 3, padding=1)
        self.conv_b.weight = self.conv_a.weight
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn(self.conv_a(x)) + self.conv_b(x)


class _StandardizedConv(nn.Conv2d):
    """A Conv2d subclass that transforms its weight in forward (weight standardization)."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (
            w.std(dim=(1, 2, 3), keepdim=True) + 1e-5
        )
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class _CustomConv(nn.Module):
    """fx traces through the user's subclass, so BatchNorm sees an F.conv2d of a new weight."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = _StandardizedConv(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn(self.conv(x))


class _WeightNormConv(_CustomConv):
    def __init__(self) -> None:
        super().__init__()
        self.conv = weight_norm(nn.Conv2d(3, 6, 3, padding=1))


@pytest.mark.parametrize(
    ("model_cls", "reasons"),
    [
        pytest.param(
            _SharedConv, {"bn1": "called 2 times", "bn2": "called 2 times"}, id="shared_conv"
        ),
        pytest.param(_TwoUsers, {"bn": "2 users"}, id="conv_output_two_users"),
        pytest.param(_TiedWeights, {"bn": "shared with another module"}, id="tied_weights"),
        pytest.param(_CustomConv, {"bn": "call_function 'conv2d'"}, id="conv_subclass"),
        pytest.param(_WeightNormConv, {"bn": "ParametrizedConv2d"}, id="parametrized_conv"),
    ],
)
def test_unsafe_pairs_are_skipped_with_reason(model_cls, reasons: dict[str, str]) -> None:
    torch.manual_seed(0)
    model = model_cls().eval()
    for i, (name, _) in enumerate(reasons.items()):
        _randomize_bn(getattr(model, name), seed=10 + i)
    x = torch.randn(2, 3, 8, 8)
    result = fold_bn_module_with_ledger(model, x)
    for name, reason in reasons.items():
        entry = _entry(result, name)
        assert not entry.folded and reason in entry.reason, entry
    with torch.no_grad():
        assert torch.equal(result.module(x), _eval_output(model, x))


def test_bn_in_train_mode_folds_for_eval_and_without_running_stats_is_skipped() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6),
        nn.Conv2d(6, 6, 3), nn.BatchNorm2d(6, track_running_stats=False),
        nn.Conv2d(6, 6, 3), nn.BatchNorm2d(6, affine=False),
    ).eval()  # fmt: skip
    _randomize_bn(model[1], seed=1)
    _randomize_bn(model[5], seed=2)
    model[1].train()
    x = torch.randn(4, 3, 12, 12)
    want = _eval_output(model, x)
    result = fold_bn_module_with_ledger(model, x)
    assert _entry(result, "1").folded_into == "0"  # folded with running stats (eval semantics)
    assert "train mode" in _entry(result, "1").reason
    assert "no running statistics" in _entry(result, "3").reason
    assert _entry(result, "5").folded_into == "4"  # affine=False: γ=1, β=0
    assert model[1].training  # the caller's mode is kept
    with torch.no_grad():
        got = result.module(x)
    # fp32, three 3×3 convs deep: re-association only
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_model_handed_over_in_train_mode_folds_for_eval_and_is_left_alone() -> None:
    ref = models.get("resnet_mini")
    model = ref.build().train()
    before = _state(model)
    modes = {name: m.training for name, m in model.named_modules()}
    (x,) = ref.inputs(2)

    result = fold_bn_module_with_ledger(model, x)

    assert {name: m.training for name, m in model.named_modules()} == modes
    _assert_same_state(before, model)  # running stats (and num_batches_tracked) unchanged
    assert not any(m.training for m in result.module.modules())
    assert len(result.folded) == 9  # every BatchNorm2d of resnet_mini, as in eval mode
    assert all("train mode" in e.reason for e in result.entries)
    want = _eval_output(model, x)
    with torch.no_grad():
        got = result.module(x)
    # fp32, a ResNet of 3x3 convs: folding only re-associates products
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


# ---------------------------------------------------------------------------------------------
# through shape-only calls, and into the module that follows


class _ChannelsLastConv(nn.Module):
    """Conv2d → permute to NHWC → tokens (N·H·W, C) → BatchNorm1d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x):
        return self.bn(self.conv(x).permute(0, 2, 3, 1).reshape(-1, 8))


class _BnTransposeLinear(nn.Module):
    """BatchNorm1d over (N, C, L) → transpose → Linear over C: the following direction."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.bn(x).transpose(1, 2))


FOLDS_THROUGH = {  # model, input shape, the module it folds into, direction, the calls between
    "levit_linear_norm": (LinearNorm, (2, 7, 16), "linear", "preceding", "flatten"),
    "token_mlp": (TokenMLP, (2, 7, 16), "fc", "preceding", "transpose"),
    "channels_last_conv": (_ChannelsLastConv, (2, 3, 6, 6), "conv", "preceding", "permute"),
    "bn_then_unpadded_conv": (
        lambda: nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, stride=2)),
        (2, 4, 9, 9), "1", "following", "",
    ),
    "bn_then_grouped_1x1_conv": (
        lambda: nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 1, groups=2)),
        (2, 4, 5, 5), "1", "following", "",
    ),
    "bn1d_then_linear": (
        lambda: nn.Sequential(nn.BatchNorm1d(8), nn.Linear(8, 5)), (3, 8), "1", "following", "",
    ),
    "bn1d_transpose_linear": (_BnTransposeLinear, (2, 8, 6), "head", "following", "transpose"),
}  # fmt: skip


@pytest.mark.parametrize("case", FOLDS_THROUGH.values(), ids=list(FOLDS_THROUGH))
def test_bn_folds_through_shape_calls_and_into_the_following_module(case) -> None:
    make, shape, target, direction, through = case
    torch.manual_seed(0)
    model = make().eval()
    bn_name, bn = next((n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm))
    _randomize_bn(bn, seed=5)
    x = torch.randn(shape)
    want = _eval_output(model, x)
    result = fold_bn_module_with_ledger(model, x)
    entry = _entry(result, bn_name)
    assert entry.folded_into == target and entry.direction == direction, entry
    assert (f"through {through}" in entry.reason) if through else not entry.reason
    assert result.to_dict()["entries"][0]["direction"] == direction
    assert ("following)" in result.to_text()) is (direction == "following")
    assert _bn_count(result.module) == 0
    with torch.no_grad():
        got = result.module(x)
    # fp32, one layer: folding re-associates (x·s + t)·W, ~1e-6 of the output scale
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


class _TokensIntoChannels(nn.Module):
    """Linear over (N, 2, 4, 16) → reshape (N, 8, 8) → BatchNorm1d(8): its channels are the
    2·4 token positions merged, not the Linear's 8 features (the counts agree by chance)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x):
        return self.bn(self.fc(x).reshape(x.shape[0], 8, 8))


class _BnOverTokens(nn.Module):
    """BatchNorm1d over (N, L, C) with L == C, then Linear over C: it normalizes L."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.bn(x))


KEPT = {  # model, input shape, example inputs given, reason
    "reshape_merges_tokens_and_features": (
        _TokensIntoChannels, (2, 2, 4, 16), True, "merges or splits the channel axis",
    ),
    "transpose_without_example_inputs": (
        TokenMLP, (2, 7, 16), False, "no shapes; pass example_inputs",
    ),
    "following_linear_reads_the_other_axis": (
        _BnOverTokens, (2, 8, 8), True, "following: the BatchNorm1d's channel axis is axis 1",
    ),
    "following_padded_conv": (
        lambda: nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=1)),
        (2, 4, 5, 5), True, "following: padded Conv2d",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", KEPT.values(), ids=list(KEPT))
def test_bn_whose_channel_does_not_map_is_kept_with_the_reason(case) -> None:
    make, shape, with_inputs, reason = case
    torch.manual_seed(0)
    model = make().eval()
    bn_name, bn = next((n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm))
    _randomize_bn(bn, seed=6)
    x = torch.randn(shape)
    result = fold_bn_module_with_ledger(model, x if with_inputs else None)
    entry = _entry(result, bn_name)
    assert not entry.folded and reason in entry.reason, entry.reason
    with torch.no_grad():
        assert torch.equal(result.module(x), _eval_output(model, x))  # nothing changed


def test_following_fold_into_the_wrong_axis_would_be_wrong() -> None:
    """The premise of 'following_linear_reads_the_other_axis': folding the BN's per-channel
    affine into the Linear's input features changes the output."""
    torch.manual_seed(0)
    model = _BnOverTokens().eval()
    _randomize_bn(model.bn, seed=6)
    x = torch.randn(2, 8, 8)
    bn = model.bn
    w, b = fold_bn_into_following_weights(
        model.head.weight, model.head.bias, bn.running_mean, bn.running_var, bn.eps,
        bn.weight, bn.bias, linear=True,
    )  # fmt: skip
    with torch.no_grad():
        assert not torch.allclose(F.linear(x, w, b), model(x), atol=1e-2)


# ---------------------------------------------------------------------------------------------
# forward code that is not an nn.Sequential


class _FunctionalNet(nn.Module):
    """Pairs reached through functional code, a ConvTranspose1d pair, and an F.batch_norm call."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv1d(4, 8, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm1d(8)
        self.up = nn.ConvTranspose1d(8, 8, 4, stride=2, padding=1, groups=4)
        self.up_bn = nn.BatchNorm1d(8)
        self.register_buffer("f_mean", torch.linspace(-1.0, 1.0, 8))
        self.register_buffer("f_var", torch.linspace(0.5, 2.0, 8))

    def forward(self, x):
        h = F.relu(self.stem_bn(self.stem(x)))
        h = torch.cat([h, -h], dim=2)
        h = self.up_bn(self.up(h)) * 0.5
        return F.batch_norm(h, self.f_mean, self.f_var, training=False)


def test_functional_forward_folds_module_pairs() -> None:
    torch.manual_seed(0)
    model = _FunctionalNet().eval()
    _randomize_bn(model.stem_bn, seed=1)
    _randomize_bn(model.up_bn, seed=2)
    x = torch.randn(2, 4, 10)
    want = _eval_output(model, x)
    result = fold_bn_module_with_ledger(model, x)
    assert _entry(result, "stem_bn").folded_into == "stem"
    assert _entry(result, "up_bn").folded_into == "up"
    functional = [e for e in result.entries if e.bn_type == "F.batch_norm"]
    assert len(functional) == 1 and not functional[0].folded
    assert isinstance(result.module, _FunctionalNet)  # the class and its forward are kept
    with torch.no_grad():
        got = result.module(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


class _DataDependent(nn.Module):
    """Not traceable: the forward branches on a tensor value."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.conv = nn.Conv2d(6, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        h = self.block(x)
        if h.mean() > 0:
            return self.bn(self.conv(h))
        return h


def test_untraceable_forward_folds_only_inside_traceable_submodules() -> None:
    torch.manual_seed(0)
    model = _DataDependent().eval()
    _randomize_bn(model.block[1], seed=1)
    _randomize_bn(model.bn, seed=2)
    x = torch.randn(2, 3, 8, 8) + 1.0
    want = _eval_output(model, x)
    result = fold_bn_module_with_ledger(model, x)
    assert not result.traced and result.trace_error
    assert _entry(result, "block.1").folded_into == "block.0"
    assert "not traceable" in _entry(result, "bn").reason
    with torch.no_grad():
        got = result.module(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


# ---------------------------------------------------------------------------------------------
# a BatchNorm used other than by the plain call is kept: the folded copy would break or differ


class _ReadsBuffer(nn.Module):
    """Reads a running statistic besides calling the BatchNorm (fx: a get_attr node)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.bn.running_mean.view(1, -1, 1, 1)


class _ReadsEps(_ReadsBuffer):
    """Reads a Python attribute (fx inlines it as a constant: invisible in the graph)."""

    def forward(self, x):
        return self.bn(self.conv(x)) * (1.0 + self.bn.eps)


class _ChecksType(_ReadsBuffer):
    """isinstance on the BatchNorm: after folding the branch would change. isinstance asks the
    type, not the instance, so no watch sees it: only running the folded copy shows it."""

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y * 2.0 if isinstance(self.bn, nn.BatchNorm2d) else y


class _UntraceableReadsWeight(nn.Module):
    """The forward around a traceable block branches on data and reads the BN's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))

    def forward(self, x):
        h = self.block(x)
        if h.sum() > -1e30:
            return h + self.block[1].weight.view(1, -1, 1, 1)
        return h


class _UntraceableReadsConvWeight(_UntraceableReadsWeight):
    """Reads the producer's weight, which folding rewrites."""

    def forward(self, x):
        h = self.block(x)
        if h.sum() > -1e30:
            return h * self.block[0].weight.abs().mean()
        return h


# Without example inputs an untraceable forward cannot be watched: nothing around it folds.
_BLIND = "no example_inputs were given"


@pytest.mark.parametrize(
    ("model_cls", "bn", "reason", "reason_without_inputs"),
    [
        pytest.param(
            _ReadsBuffer, "bn", "running_mean", "running_mean", id="reads_running_mean"
        ),
        pytest.param(_ReadsEps, "bn", "attribute(s) eps", "attribute(s) eps", id="reads_eps"),
        pytest.param(
            _UntraceableReadsWeight, "block.1", "attribute(s) weight", _BLIND, id="untraceable"
        ),
        pytest.param(
            _UntraceableReadsConvWeight, "block.1", "producer's weight", _BLIND, id="producer"
        ),
    ],
)
def test_a_batchnorm_used_other_than_by_its_call_is_kept(
    model_cls, bn, reason, reason_without_inputs
) -> None:
    torch.manual_seed(0)
    model = model_cls().eval()
    _randomize_bn(model.get_submodule(bn), seed=3)
    x = torch.randn(2, 3, 8, 8)
    want = _eval_output(model, x)
    for example, expected in ((x, reason), (None, reason_without_inputs)):
        result = fold_bn_module_with_ledger(model, example)
        entry = _entry(result, bn)
        assert not entry.folded and expected in entry.reason, entry
        with torch.no_grad():
            assert torch.equal(result.module(x), want)  # it runs, and nothing changed
    assert type(model.get_submodule(bn)) is nn.BatchNorm2d  # the watch left the caller alone


def test_untraceable_forward_without_example_inputs_folds_nothing_around_it() -> None:
    model = _UntraceableReadsWeight().eval()
    result = fold_bn_module_with_ledger(model)
    (entry,) = result.entries
    assert not entry.folded and "no example_inputs were given" in entry.reason


def test_a_folded_copy_that_differs_on_the_example_inputs_is_never_returned() -> None:
    torch.manual_seed(0)
    model = _ChecksType().eval()
    _randomize_bn(model.bn, seed=5)
    x = torch.randn(2, 3, 8, 8)
    result = fold_bn_module_with_ledger(model, x)
    (entry,) = result.entries
    assert not entry.folded and "the folded copy differs from the model" in entry.reason
    with torch.no_grad():
        assert torch.equal(result.module(x), _eval_output(model, x))


class _StaticRead(_ReadsBuffer):
    """Reads the BatchNorm past every watch (inspect.getattr_static goes around
    __getattribute__): only running the folded copy shows the fault."""

    def forward(self, x):
        import inspect

        eps = inspect.getattr_static(self.bn, "eps")
        return self.bn(self.conv(x)) * (1.0 + eps)


def test_a_folded_copy_that_fails_on_the_example_inputs_is_never_returned() -> None:
    torch.manual_seed(0)
    model = _StaticRead().eval()
    _randomize_bn(model.bn, seed=4)
    x = torch.randn(2, 3, 8, 8)
    result = fold_bn_module_with_ledger(model, x)
    (entry,) = result.entries
    assert not entry.folded
    assert "the folded copy fails on example_inputs (AttributeError" in entry.reason
    assert "every fold undone" in entry.reason
    assert isinstance(result.module.bn, nn.BatchNorm2d)
    with torch.no_grad():
        assert torch.equal(result.module(x), _eval_output(model, x))


def test_ledger_renders_to_text_json_and_markdown() -> None:
    model = _TwoUsers().eval()
    result = fold_bn_module_with_ledger(model, torch.randn(1, 3, 4, 4))
    data = json.loads(to_json(result))
    assert data["folded"] == 0 and data["skipped"] == 1
    assert data["entries"][0]["batch_norm"] == "bn"
    assert "bn" in result.to_text() and "2 users" in result.to_text()
    assert result.to_markdown().splitlines()[2].startswith("| BatchNorm | type |")


# ---------------------------------------------------------------------------------------------
# property: any conv configuration, any statistics

_CONV = {
    (1, False): nn.Conv1d,
    (2, False): nn.Conv2d,
    (3, False): nn.Conv3d,
    (1, True): nn.ConvTranspose1d,
    (2, True): nn.ConvTranspose2d,
    (3, True): nn.ConvTranspose3d,
}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


@st.composite
def _conv_bn_cases(draw):
    dims = draw(st.integers(1, 3))
    transposed = draw(st.booleans())
    groups = draw(st.sampled_from([1, 2, 4]))
    stride, dilation = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    conv_kwargs = {
        "in_channels": groups * draw(st.integers(1, 3)),
        "out_channels": groups * draw(st.integers(1, 3)),
        "kernel_size": draw(st.integers(1, 3)),
        "stride": stride,
        "padding": draw(st.integers(0, 1)),
        "dilation": dilation,
        "groups": groups,
        "bias": draw(st.booleans()),
    }
    if transposed:
        conv_kwargs["output_padding"] = draw(st.integers(0, max(stride, dilation) - 1))
    bn = {
        "affine": draw(st.booleans()),
        "eps": draw(st.sampled_from([1e-8, 1e-5, 1e-2])),
        "var_scale": draw(st.sampled_from([1e-8, 1e-2, 1.0, 1e2])),  # tiny variance included
        "mean_scale": draw(st.sampled_from([0.0, 1.0, 1e3])),  # large mean included
    }
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    return dims, transposed, conv_kwargs, bn, dtype, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=80, deadline=None)
@given(_conv_bn_cases())
def test_property_folded_equals_unfolded(case) -> None:
    dims, transposed, conv_kwargs, bn_cfg, dtype, seed = case
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    conv = _CONV[dims, transposed](**conv_kwargs)
    c = conv_kwargs["out_channels"]
    bn = _BN[dims](c, eps=bn_cfg["eps"], affine=bn_cfg["affine"])
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g) * bn_cfg["mean_scale"])
        bn.running_var.copy_(bn_cfg["var_scale"] * (0.1 + torch.rand(c, generator=g)))
        if bn.affine:
            bn.weight.copy_(torch.randn(c, generator=g) * 2.0)
            bn.bias.copy_(torch.randn(c, generator=g))
    model = nn.Sequential(conv, bn).eval().to(dtype)
    x = torch.randn(2, conv_kwargs["in_channels"], *([5] * dims), generator=g).to(dtype)

    result = fold_bn_module_with_ledger(model, x)
    assert len(result.folded) == 1, result.to_text()
    with torch.no_grad():
        want = model(x)
        got = result.module(x)
        # Rounding error of either form is a few ulps of the magnitudes summed on the way:
        # |s|·(|W|*|x| + |b| + |μ|) + |β|, computed in float64 with absolute values.
        abs_conv = copy.deepcopy(conv).double()
        abs_conv.weight.data = abs_conv.weight.data.abs()
        if abs_conv.bias is not None:
            abs_conv.bias.data = abs_conv.bias.data.abs()
        s = (bn.weight.double() if bn.affine else 1.0) / torch.sqrt(
            bn.running_var.double() + bn.eps
        )
        shape = (1, c) + (1,) * dims
        magnitude = (
            abs_conv(x.double().abs()) + bn.running_mean.double().abs().reshape(shape)
        ) * (s.abs().reshape(shape))
        if bn.affine:
            magnitude = magnitude + bn.bias.double().abs().reshape(shape)
    # Sums have ≤ 4·3·27 = 324 terms: 1e-13 (≈450 ulps) for float64, 1e-5 (≈80 ulps) for float32.
    unit = 1e-13 if dtype == torch.float64 else 1e-5
    err = (got.double() - want.double()).abs()
    assert bool((err <= unit * magnitude + unit * float(magnitude.max()) * 1e-3).all()), (
        float(err.max()),
        float(magnitude.max()),
    )
