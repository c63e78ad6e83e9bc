"""The verification core: one way to run, feed, compare and judge, used by every check.

- :mod:`~normdeploy.verification.runners`: onnxruntime and PyTorch behind one ``infer(feeds)``;
  execution-provider choice;
- :mod:`~normdeploy.verification.feeds`: seeded stress inputs shaped from the graph, batch axes,
  requested-shape checks, user feeds;
- :mod:`~normdeploy.verification.float64`: ground truth, float64 copies of modules and graphs;
- :mod:`~normdeploy.verification.compare`: the one comparison, check record and the
  measured-noise tolerance policy;
- :mod:`~normdeploy.verification.probe`: intermediate values of both sides;
- :mod:`~normdeploy.verification.bisection`: where two sides start to disagree;
- :mod:`~normdeploy.verification.record`: a verify run saved to ``.npz`` and replayed;
- :mod:`~normdeploy.verification.verifier`: ``verify()``; its result in ``results``.

Export's check, fold-bn's self-check, the census confirmation, ``verify`` and the bisection all
go through ``compare``. Names are imported lazily (the census imports the core, and ``verify``
imports the census's lints).
"""

from __future__ import annotations

from normdeploy._lazy import lazy_getattr

_EXPORTS = {
    "verify": "normdeploy.verification.verifier",
    "VerifyResult": "normdeploy.verification.results",
    "Check": "normdeploy.verification.compare",
    "Tolerance": "normdeploy.verification.compare",
    "TolerancePolicy": "normdeploy.verification.compare",
    "RecordedRun": "normdeploy.verification.record",
    "load_run": "normdeploy.verification.record",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)
