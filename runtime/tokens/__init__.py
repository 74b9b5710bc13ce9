"""Speech-token datasets: ``chatterbox-rt tokens encode | analyze | bpe``.

* :func:`encode` (``chatterbox_rt.tokens.encode``): an audio corpus -> S3 speech tokens (or SNAC
  codes) in Parquet batches, resumable;
* :func:`analyze` and :func:`plot` (``chatterbox_rt.tokens.analyze``): frequency skew, n-gram
  structure, transition sparsity and repetition of such a dataset;
* :func:`evaluate`, :func:`learn_rules`, :func:`apply_rules`, :func:`undo_rules`
  (``chatterbox_rt.tokens.merge``): weight-free token merging (run-length, BPE, cross-scale).

NOTE: ``encode`` and ``analyze`` name both a function and the submodule defining it; this package's
attribute is the function. Reach a module with ``from chatterbox_rt.tokens.analyze import ...`` or
``importlib.import_module("chatterbox_rt.tokens.analyze")`` (``import chatterbox_rt.tokens.analyze
as m`` binds the function).
"""
from __future__ import annotations

from .encode import EncodeError, EncodeResult, encode

__all__ = ["encode", "EncodeResult", "EncodeError"]

try:  # the statistics and merging modules (numpy only)
    from .analyze import ScaleStats, TokenAnalysis, analyze, load_sequences, plot

    __all__ += ["analyze", "plot", "load_sequences", "TokenAnalysis", "ScaleStats"]
except ModuleNotFoundError as e:  # pragma: no cover - only while a source checkout lacks the module
    if e.name != f"{__name__}.analyze":
        raise
try:
    from .merge import MergeReport, MergeRules, apply_rules, evaluate, learn_rules, undo_rules

    __all__ += ["learn_rules", "apply_rules", "undo_rules", "evaluate", "MergeRules", "MergeReport"]
except ModuleNotFoundError as e:  # pragma: no cover
    if e.name != f"{__name__}.merge":
        raise
