"""Map ONNX nodes back to the PyTorch modules they came from.

Both exporters leave a trail: the dynamo exporter writes ``pkg.torch.onnx.name_scopes`` (a
list of module paths ending with the FX node name) into each node's metadata; the TorchScript
exporter names nodes ``/layer1/conv1/Conv``. Graph rewrites keep the metadata of the node they
replace (onnxscript marks them with ``pkg.onnxscript.rewriter.rule_name``).
"""

from __future__ import annotations

import ast

import onnx

NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
REWRITE_RULE_KEY = "pkg.onnxscript.rewriter.rule_name"


def node_metadata(node: onnx.NodeProto) -> dict[str, str]:
    return {p.key: p.value for p in node.metadata_props}


def _literal_list(text: str) -> list[str]:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return []
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else []


def node_module_path(node: onnx.NodeProto) -> str | None:
    """Dotted path of the innermost module that produced ``node`` ('' = the root), or None."""
    meta = node_metadata(node)
    if NAME_SCOPES_KEY in meta:
        scopes = _literal_list(meta[NAME_SCOPES_KEY])
        # The last entry is the FX node's own name; the ones before are module paths.
        return scopes[-2] if len(scopes) >= 2 else None
    if node.name.startswith("/"):
        parts = node.name.strip("/").split("/")[:-1]
        # TorchScript writes a container's children with the container's name as prefix:
        # '/layer2/downsample/downsample.0/Conv' is module 'layer2.downsample.0'.
        attrs = [
            part[len(prev) + 1 :] if prev and part.startswith(prev + ".") else part
            for prev, part in zip(["", *parts], parts, strict=False)
        ]
        return ".".join(attrs)
    return None


def rewrite_rules(node: onnx.NodeProto) -> list[str]:
    """Exporter rewrite rules that produced ``node`` (e.g. FuseBatchNormIntoConv)."""
    text = node_metadata(node).get(REWRITE_RULE_KEY, "")
    return [r.strip() for r in text.split(",") if r.strip()]


def nodes_by_module(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Top-level graph nodes grouped by the module path they came from (unknown ones left out).

    A node belongs to every enclosing module: ``layer1`` lists the nodes of ``layer1.conv1``.
    """
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        path = node_module_path(node)
        if path is None:
            continue
        parts = path.split(".") if path else []
        for i in range(len(parts) + 1):
            out.setdefault(".".join(parts[:i]), []).append(node)
    return out
