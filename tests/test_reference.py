"""The numpy oracles against PyTorch's norm layers, and against perturbed formulas.

Tolerance: everything runs in float64, where the oracle and torch agree to ~1e-15 relative;
1e-10 leaves room for summation order and still catches every perturbation below (>= 1e-4).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import models
from normdeploy import reference as ref
from normdeploy.reference import module_oracle, norm_kind

ATOL = 1e-10  # float64 on both sides


def _x(shape, seed=0, shift=0.7, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift


def _calibrated(module: nn.Module) -> nn.Module:
    """Non-trivial affine parameters and running statistics, float64, eval mode."""
    module = module.double()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name in ("weight", "bias"):
            p = getattr(module, name, None)
            if p is not None:
                p.copy_(torch.rand(p.shape, generator=g, dtype=torch.float64) + 0.5)
        if getattr(module, "running_mean", None) is not None:
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=g))
            module.running_var.copy_(
                torch.rand(module.running_var.shape, generator=g) * 3 + 0.1
            )
    return module.eval()


CASES = [
    ("bn1d_2d", lambda: nn.BatchNorm1d(6), (4, 6)),
    ("bn1d_3d", lambda: nn.BatchNorm1d(6), (4, 6, 9)),
    ("bn2d", lambda: nn.BatchNorm2d(5, eps=1e-3), (3, 5, 7, 6)),
    ("bn3d_noaffine", lambda: nn.BatchNorm3d(4, affine=False), (2, 4, 3, 5, 4)),
    ("ln_last", lambda: nn.LayerNorm(8), (3, 5, 8)),
    ("ln_chw", lambda: nn.LayerNorm([4, 3, 3]), (2, 4, 3, 3)),
    ("ln_noaffine", lambda: nn.LayerNorm(8, elementwise_affine=False), (3, 8)),
    ("gn_32", lambda: nn.GroupNorm(32, 64), (2, 64, 4, 4)),
    ("gn_1", lambda: nn.GroupNorm(1, 6), (2, 6, 5, 5)),
    ("gn_c", lambda: nn.GroupNorm(6, 6, eps=1e-2), (2, 6, 5, 5)),
    ("in2d", lambda: nn.InstanceNorm2d(3), (2, 3, 6, 6)),
    ("in2d_affine", lambda: nn.InstanceNorm2d(3, affine=True), (2, 3, 6, 6)),
    (
        "in1d_running",
        lambda: nn.InstanceNorm1d(3, affine=True, track_running_stats=True),
        (2, 3, 9),
    ),
    ("in3d", lambda: nn.InstanceNorm3d(2, affine=True), (2, 2, 3, 4, 5)),
    ("rms_last", lambda: nn.RMSNorm(8, eps=1e-6), (3, 5, 8)),
    ("rms_two_dims_default_eps", lambda: nn.RMSNorm([5, 8]), (3, 5, 8)),
    ("rms_noaffine", lambda: nn.RMSNorm(8, elementwise_affine=False), (3, 8)),
]


@pytest.mark.parametrize(("make", "shape"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_oracle_matches_torch_eval(make, shape):
    module = _calibrated(make())
    x = _x(shape)
    with torch.no_grad():
        expected = module(x).numpy()
    np.testing.assert_allclose(module_oracle(module, x.numpy()), expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", models.names())
def test_oracle_matches_every_norm_layer_in_reference_models(name):
    """Every norm layer of every reference model, fed the input it sees in the model."""
    model = models.get(name).build().double()
    inputs = {}

    def record(mod, inp, out) -> None:  # returning a value would replace the module's output
        inputs.setdefault(mod, (inp[0], out))

    hooks = [m.register_forward_hook(record) for m in model.modules() if norm_kind(m)]
    with torch.no_grad():
        model(models.get(name).inputs(2)[0].double())
    for h in hooks:
        h.remove()
    assert inputs, f"{name} has no norm layers"
    for mod, (x, y) in inputs.items():
        np.testing.assert_allclose(module_oracle(mod, x.numpy()), y.numpy(), rtol=0, atol=ATOL)


class LlamaRMSNorm(nn.Module):
    """The Hugging Face spelling: ``variance_epsilon``, rsqrt, weight applied last."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, h):
        v = h.pow(2).mean(-1, keepdim=True)
        return self.weight * (h * torch.rsqrt(v + self.variance_epsilon))


def test_hand_written_rmsnorm_is_an_rmsnorm_and_matches_its_oracle():
    module = _calibrated(LlamaRMSNorm(8, eps=1e-2))  # a large eps, so dropping it would show
    assert norm_kind(module) == "RMSNorm"
    x = _x((3, 4, 8))
    with torch.no_grad():
        expected = module(x).numpy()
    np.testing.assert_allclose(module_oracle(module, x.numpy()), expected, rtol=0, atol=ATOL)


class LayerNorm(nn.Module):
    """A hand-written class that shares nn.LayerNorm's name but none of its attributes."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        u = x.mean(1, keepdim=True)  # channels-first, as ConvNeXt writes it
        return (x - u) / torch.sqrt((x - u).pow(2).mean(1, keepdim=True) + 1e-6)


def test_a_hand_written_class_named_like_a_torch_norm_is_not_taken_for_it():
    assert norm_kind(LayerNorm(4)) is None
    assert norm_kind(nn.LayerNorm(4)) == "LayerNorm" and norm_kind(nn.GroupNorm(2, 4))
    assert norm_kind(nn.BatchNorm2d(4)) == "BatchNorm"


def test_rms_norm_default_eps_is_that_of_the_input_dtype():
    # nn.RMSNorm(eps=None) adds torch.finfo(x.dtype).eps; a row of tiny values shows it.
    x = np.full((1, 4), 1e-4, np.float32)
    y32 = ref.rms_norm(x, 4)
    y64 = ref.rms_norm(x.astype(np.float64), 4)
    with torch.no_grad():
        torch_y = nn.RMSNorm(4).eval()(torch.from_numpy(x)).double().numpy()
    np.testing.assert_allclose(y32, torch_y, rtol=1e-6)  # float32 torch run
    assert abs(y32[0, 0] - y64[0, 0]) > 1e-3  # the eps differs by dtype, visibly here


def test_batch_norm_training_uses_biased_batch_statistics():
    module = _calibrated(nn.BatchNorm2d(5)).train()
    x = _x((6, 5, 4, 4))
    expected = module(x).detach().numpy()
    y, mean, var = ref.batch_norm_training(
        x.numpy(), module.weight.detach().numpy(), module.bias.detach().numpy(), module.eps
    )
    np.testing.assert_allclose(y, expected, rtol=0, atol=ATOL)
    xs = x.numpy().transpose(1, 0, 2, 3).reshape(5, -1)
    np.testing.assert_allclose(var, xs.var(axis=1, ddof=0), rtol=1e-12)
    np.testing.assert_allclose(mean, xs.mean(axis=1), rtol=1e-12)


def test_reference_models_have_nontrivial_running_statistics():
    """Folding tests prove nothing with mean 0 / var 1 statistics."""
    for name in models.names():
        for m in models.get(name).build().modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                assert m.running_mean.abs().max() > 0.05, name
                assert (m.running_var - 1).abs().max() > 0.05, name


def test_batchnorm_train_and_eval_outputs_differ():
    """The pain the product removes: forgetting eval() changes the numbers."""
    module = _calibrated(nn.BatchNorm2d(4))
    x = _x((3, 4, 5, 5), shift=3.0)
    with torch.no_grad():
        eval_out = module.eval()(x)
        train_out = module.train()(x)
    assert (eval_out - train_out).abs().max() > 0.1


# Perturbed formulas must be caught by the same comparison the tests use.
def _unbiased_bn_training(x, w, b, eps):
    axes = (0, 2, 3)
    mean = x.mean(axis=axes)
    var = x.var(axis=axes, ddof=1)
    return ref.batch_norm_inference(x, mean, var, w, b, eps)


def _eps_outside_sqrt_ln(x, ns, w, b, eps):
    axes = tuple(range(x.ndim - len(ns), x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, keepdims=True)
    return (x - mean) / (np.sqrt(var) + eps) * w + b


def _gn_channel_stats(x, g, w, b, eps):
    return ref.instance_norm(x, w, b, eps)


def test_perturbed_formulas_fail_the_oracle_comparison():
    x = _x((4, 6, 5, 5)).numpy()
    w, b = np.linspace(0.5, 1.5, 6), np.linspace(-0.2, 0.3, 6)
    good, _, _ = ref.batch_norm_training(x, w, b, 1e-5)
    assert not np.allclose(_unbiased_bn_training(x, w, b, 1e-5), good, rtol=0, atol=ATOL)

    xl = _x((3, 8), seed=1, scale=0.01).numpy()  # small variance makes eps placement visible
    wl, bl = np.ones(8), np.zeros(8)
    good_ln = ref.layer_norm(xl, (8,), wl, bl, 1e-5)
    assert not np.allclose(_eps_outside_sqrt_ln(xl, (8,), wl, bl, 1e-5), good_ln, atol=1e-4)

    good_gn = ref.group_norm(x, 2, w, b, 1e-5)
    assert not np.allclose(_gn_channel_stats(x, 2, w, b, 1e-5), good_gn, atol=1e-3)


def test_group_norm_rejects_indivisible_groups():
    with pytest.raises(ValueError, match="not divisible"):
        ref.group_norm(np.zeros((1, 6, 2, 2)), 4)


def test_the_oracle_models_torch_norm_classes_and_subclasses_that_keep_their_forward():
    class Renamed(nn.BatchNorm2d):  # a subclass that only renames: same computation
        pass

    class WithAct(nn.BatchNorm2d):  # timm's BatchNormAct2d pattern
        def forward(self, x):
            return torch.relu(super().forward(x))

    assert ref.oracle_gap(nn.BatchNorm2d(3)) is None
    assert ref.oracle_gap(nn.LayerNorm(4)) is None
    assert ref.oracle_gap(Renamed(3)) is None
    assert ref.oracle_gap(WithAct(3)) == "WithAct overrides forward() of BatchNorm2d"
    assert ref.oracle_gap(nn.ReLU()) == "ReLU is not a normalization layer"
