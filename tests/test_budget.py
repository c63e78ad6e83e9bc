"""The memory budget (normdeploy/budget.py): sizes, where the budget comes from, and estimates
that are made from shapes before anything is allocated. The CLI table (docs/BAD_INPUTS.md,
"Resource bombs") covers each command refusing a bomb."""

from __future__ import annotations

import numpy as np
import pytest
from fold_support import conv_bn_model
from onnx import TensorProto, helper

from normdeploy.budget import (
    ENV_VAR,
    check_allocation,
    format_size,
    memory_budget,
    memory_limit,
    parse_size,
)
from normdeploy.errors import InvalidArgumentError, ResourceLimitError
from normdeploy.onnx_graph import graph_input_specs
from normdeploy.verification.feeds import check_feed_memory, make_feeds
from normdeploy.verification.probe import exposed_value_bytes, values_exposed


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1000", 1000),
        ("1K", 1024),
        ("512M", 512 * 2**20),
        ("8G", 8 * 2**30),
        ("8g", 8 * 2**30),
        ("1.5GiB", int(1.5 * 2**30)),
        ("2 TB", 2 * 2**40),
        (4096, 4096),
    ],
)
def test_sizes_parse_in_binary_units(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "", "-1G", "0", "1X", "G", True, 1.5])
def test_what_is_not_a_size_is_refused_naming_the_parameter(text):
    with pytest.raises(InvalidArgumentError, match=r"^max_memory: "):
        parse_size(text)


def test_format_size_uses_the_largest_unit_that_keeps_a_number_over_one():
    assert format_size(512) == "512 B"
    assert format_size(1536) == "1.5 KiB"
    assert format_size(120 * 2**30) == "120.0 GiB"


def test_the_budget_is_the_block_then_the_environment_then_half_the_memory(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    default, source = memory_budget()
    assert source == "half the available memory" and default is not None and default > 0
    monkeypatch.setenv(ENV_VAR, "3G")
    assert memory_budget() == (3 * 2**30, f"{ENV_VAR}=3G")
    with memory_limit("1G"):
        assert memory_budget() == (2**30, "max_memory=1G")
        with memory_limit(None):  # no value given keeps the outer one
            assert memory_budget()[0] == 2**30
    assert memory_budget()[0] == 3 * 2**30


def test_check_allocation_refuses_only_above_the_budget():
    with memory_limit("1K"):
        check_allocation("exactly the budget", 1024)
        with pytest.raises(
            ResourceLimitError,
            match=r"^x needs 1\.0 KiB, over the memory budget of 1\.0 KiB \(max_memory=1K\)$",
        ):
            check_allocation("x", 1025)


def test_feed_estimate_covers_what_make_feeds_allocates():
    """The estimate is made from shapes alone and is never below the arrays that come out."""
    specs = graph_input_specs(conv_bn_model())
    feeds = make_feeds(specs, batch_size=5, seed=0)
    made = sum(v.nbytes for v in feeds.values())
    with memory_limit(made - 1), pytest.raises(ResourceLimitError, match="stress inputs"):
        check_feed_memory(specs, [5])
    # Kept arrays (4 bytes per float32 element) plus the largest one's generation: two float64
    # temporaries and the cast result (16 + 4 bytes per element): 6x the float32 feeds here.
    with memory_limit(made * 6):
        check_feed_memory(specs, [5])
    with memory_limit(made * 6 - 1), pytest.raises(ResourceLimitError):
        check_feed_memory(specs, [5])


def test_exposed_value_estimate_matches_the_values_onnxruntime_returns():
    """Shapes of intermediate values come from shape inference, symbolic dims from the feeds;
    the oracle is the arrays themselves."""
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["h"]),
            helper.make_node("Concat", ["h", "h"], ["c"], axis=1),
            helper.make_node("ReduceSum", ["c"], ["y"], keepdims=0),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"x": np.ones((7, 3, 4), np.float32)}
    import onnxruntime as ort

    with values_exposed(model, ["h", "c"]) as exposed:
        sess = ort.InferenceSession(
            exposed.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        values = dict(
            zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True)
        )
        expected = values["h"].nbytes + values["c"].nbytes
        assert exposed_value_bytes(exposed, ["h", "c"], feeds) == expected
