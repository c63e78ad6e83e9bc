"""The branch-merging arithmetic (normdeploy/passes/merge_math.py) against an independent
oracle: each branch run on its own by torch's convolution in float64 (asymmetric pads applied
with F.pad), summed, compared with the one merged convolution."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from normdeploy.passes.merge_math import (
    ConvGeometry,
    ConvTerm,
    IdentityTerm,
    alignment_reason,
    merge_branches,
    tap_offsets,
)

torch = pytest.importorskip("torch")
F = torch.nn.functional
CONV = {1: F.conv1d, 2: F.conv2d}
# float64 on both sides: sums of at most 8·5·5 products re-associated, ~1e-15 relative; 1e-10
# leaves room and fails at once for a tap one position off.
RTOL64, ATOL64 = 1e-10, 1e-10
RNG = np.random.default_rng(17)


def t64(a: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))


def conv_oracle(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, g: ConvGeometry):
    """torch's convolution in float64, the pads (before, after) applied explicitly."""
    pads = []
    for before, after in zip(reversed(g.pads_begin), reversed(g.pads_end), strict=True):
        pads += [before, after]
    xp = F.pad(t64(x), pads)
    conv = CONV[x.ndim - 2]
    bias = None if b is None else t64(b)
    return conv(xp, t64(w), bias, g.strides, 0, g.dilations, g.group).numpy()


def geometry(k, s=1, d=1, pb=0, pe=0, group=1, n=1) -> ConvGeometry:
    return ConvGeometry((k,) * n, (s,) * n, (d,) * n, (pb,) * n, (pe,) * n, group)


# ----------------------------------------------------------------------------- soundness


@st.composite
def aligned_pairs(draw):
    """A base and a branch that embeds in it by construction (tap offset o, matching size)."""
    n = draw(st.sampled_from([1, 2]))
    ka = draw(st.integers(1, 5))
    kb = draw(st.integers(1, ka))
    d = draw(st.integers(1, 2))
    s = draw(st.integers(1, 2))
    o = draw(st.integers(0, ka - kb))
    pb_a = draw(st.integers(o * d, o * d + 2))
    pe_a = draw(st.integers(max(0, d * (ka - kb - o)), d * (ka - kb - o) + 2))
    pb_b = pb_a - o * d
    pe_b = pe_a - d * (ka - kb - o)
    dil_b = d if kb > 1 else draw(st.integers(1, 3))  # a 1-tap kernel's dilation reads nothing
    base = geometry(ka, s, d, pb_a, pe_a, n=n)
    branch = geometry(kb, s, dil_b, pb_b, pe_b, n=n)
    size = draw(st.integers(d * (ka - 1) + 1, d * (ka - 1) + 6))
    return base, branch, size


@settings(max_examples=150, deadline=None)
@given(aligned_pairs())
def test_an_aligned_branch_merges_into_one_exact_conv(case) -> None:
    base, branch, size = case
    assert alignment_reason(base, branch) is None
    n = len(base.kernel)
    x = RNG.normal(size=(2, 3, *([size] * n)))
    wa, ba = RNG.normal(size=(4, 3, *base.kernel)), RNG.normal(size=4)
    wb, bb = RNG.normal(size=(4, 3, *branch.kernel)), RNG.normal(size=4)
    expected = conv_oracle(x, wa, ba, base) + conv_oracle(x, wb, bb, branch)
    offsets = tap_offsets(base, branch)
    w, b = merge_branches(wa.shape, 1, [ConvTerm(wa, ba, (0,) * n), ConvTerm(wb, bb, offsets)])
    np.testing.assert_allclose(conv_oracle(x, w, b, base), expected, RTOL64, ATOL64)


@settings(max_examples=150, deadline=None)
@given(
    st.integers(1, 4), st.integers(1, 4), st.integers(1, 2), st.integers(1, 2),
    st.integers(0, 3), st.integers(0, 3), st.integers(0, 3), st.integers(0, 3),
)  # fmt: skip
def test_a_refused_branch_has_no_exact_place_in_the_base_kernel(
    ka, kb, s, d, pba, pea, pbb, peb
):
    """Refusals are necessary, not cautious: when the output sizes agree for every input size,
    no tap offset of the branch inside the base kernel reproduces the sum (1-D, every offset
    tried). Sizes that agree for some inputs only (a stride's rounding) are refused too."""
    base, branch = geometry(ka, s, d, pba, pea), geometry(kb, s, d, pbb, peb)
    if alignment_reason(base, branch) is None:
        return
    wa, wb = RNG.normal(size=(3, 2, ka)), RNG.normal(size=(3, 2, kb))
    sizes = [9 + d * 4 + k for k in range(s)]  # every residue modulo the stride
    xs = [RNG.normal(size=(1, 2, n)) for n in sizes]
    if any(
        conv_oracle(x, wa, None, base).shape != conv_oracle(x, wb, None, branch).shape
        for x in xs
    ):
        return  # output sizes differ for some input: merging would change the sum's shape
    x = xs[0]
    ya, yb = conv_oracle(x, wa, None, base), conv_oracle(x, wb, None, branch)
    for o in range(ka - kb + 1):
        w, _ = merge_branches(
            wa.shape, 1, [ConvTerm(wa, None, (0,)), ConvTerm(wb, None, (o,))]
        )
        assert not np.allclose(conv_oracle(x, w, None, base), ya + yb, RTOL64, ATOL64)


# ----------------------------------------------------------------------------- the identity


@pytest.mark.parametrize("group", [1, 2, 6], ids=["dense", "group2", "depthwise"])
def test_identity_term_is_x_times_s_plus_t_in_every_group_layout(group) -> None:
    c = 6
    s, t = RNG.normal(size=c), RNG.normal(size=c)
    w, b = merge_branches((c, c // group, 3, 3), group, [], [IdentityTerm(s, t, (1, 1))])
    x = RNG.normal(size=(2, c, 5, 5))
    y = conv_oracle(x, w, b, geometry(3, pb=1, pe=1, group=group, n=2))
    expected = x * s.reshape(1, c, 1, 1) + t.reshape(1, c, 1, 1)
    np.testing.assert_allclose(y, expected, RTOL64, ATOL64)


@pytest.mark.parametrize("group", [1, 2], ids=["dense", "group2"])
def test_repvgg_block_merges_into_one_conv(group) -> None:
    """3×3 (pad 1) + 1×1 + identity x·s + t, the re-parameterization of the RepVGG paper."""
    c = 4
    g3, g1 = geometry(3, pb=1, pe=1, group=group, n=2), geometry(1, group=group, n=2)
    w3, b3 = RNG.normal(size=(c, c // group, 3, 3)), RNG.normal(size=c)
    w1, b1 = RNG.normal(size=(c, c // group, 1, 1)), RNG.normal(size=c)
    s, t = RNG.normal(size=c), RNG.normal(size=c)
    x = RNG.normal(size=(2, c, 6, 6))
    expected = (
        conv_oracle(x, w3, b3, g3)
        + conv_oracle(x, w1, b1, g1)
        + x * s.reshape(1, c, 1, 1)
        + t.reshape(1, c, 1, 1)
    )
    assert tap_offsets(g3, g1) == (1, 1)
    ident = ConvGeometry.identity(g3)
    assert alignment_reason(g3, ident) is None
    w, b = merge_branches(
        w3.shape,
        group,
        [ConvTerm(w3, b3, (0, 0)), ConvTerm(w1, b1, tap_offsets(g3, g1))],
        [IdentityTerm(s, t, tap_offsets(g3, ident))],
    )
    np.testing.assert_allclose(conv_oracle(x, w, b, g3), expected, RTOL64, ATOL64)


def test_a_small_kernel_lands_at_its_offset_and_nowhere_else() -> None:
    w = RNG.normal(size=(2, 1, 1, 2))
    merged, _ = merge_branches((2, 1, 3, 3), 1, [ConvTerm(w, None, (2, 0))])
    np.testing.assert_array_equal(merged[:, :, 2, 0:2], w[:, :, 0, :])
    merged[:, :, 2, 0:2] = 0
    assert not merged.any()


# ----------------------------------------------------------------------------- reasons

REFUSALS = {
    "group": (geometry(3, pb=1, pe=1), geometry(1, group=2), "group=2"),
    "stride": (geometry(3, s=2, pb=1, pe=1), geometry(1), "strides 1 differ"),
    "dilation": (geometry(3, d=1, pb=1, pe=1), geometry(3, d=2, pb=2, pe=2), "dilations"),
    "kernel_too_large": (geometry(1), geometry(3, pb=1, pe=1), "does not fit"),
    "shifted_pads": (geometry(3, pb=0, pe=2), geometry(3, pb=2, pe=0), "does not line up"),
    "between_taps": (geometry(3, d=2, pb=1, pe=3), geometry(1), "does not line up"),
    "output_size": (geometry(3, pb=1, pe=1), geometry(1, pb=0, pe=1), "output size differs"),
}


@pytest.mark.parametrize("case", REFUSALS.values(), ids=list(REFUSALS))
def test_misaligned_branches_are_refused_with_the_reason(case) -> None:
    base, branch, words = case
    reason = alignment_reason(base, branch)
    assert reason is not None and words in reason
