"""The norm census: which normalization layers a graph holds, how each is written, and lints.

- :mod:`~normdeploy.census.results`: what it finds (``Census``, ``NormEntry``, ``Lint``);
- :mod:`~normdeploy.census.patterns`: matchers for the node groups written in place of a norm op;
- :mod:`~normdeploy.census.lints`: the one set of deployment lints (``verify`` uses them too);
- :mod:`~normdeploy.census.modules`: the torch side, module → nodes, confirmed numerically;
- :mod:`~normdeploy.census.inspection`: ``inspect()``.

Names are imported lazily, so reading a lint does not import the torch-side machinery.
"""

from __future__ import annotations

from normdeploy._lazy import lazy_getattr

_EXPORTS = {
    "inspect": "normdeploy.census.inspection",
    "graph_census": "normdeploy.census.inspection",
    "Census": "normdeploy.census.results",
    "NormEntry": "normdeploy.census.results",
    "NormNode": "normdeploy.census.results",
    "Lint": "normdeploy.census.results",
    "FOLDED": "normdeploy.census.results",
    "DECOMPOSITION": "normdeploy.census.patterns",
    "ABSENT": "normdeploy.census.results",
    "NATIVE_NORM_OPS": "normdeploy.census.patterns",
    "DECOMPOSED_LAYERNORM": "normdeploy.census.patterns",
    "GROUPNORM_TRICK": "normdeploy.census.patterns",
    "DECOMPOSED_RMSNORM": "normdeploy.census.patterns",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)
