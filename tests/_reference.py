"""Test-only access to the reference implementation (PyPI chatterbox-tts==0.1.7).

The reference is an oracle for parity tests and benchmarks; the runtime never imports it.
Importing it on a CPU-only machine needs two work-arounds that live here and nowhere else:

* torchaudio has no CPU build on PyPI. Its Python modules work, but importing the package
  loads CUDA-linked native libraries (``torchaudio/lib/*.so``) that fail without CUDA. We
  hide those libraries from torchaudio's loader while it is first imported; it then runs in
  its documented "extension not available" mode.
* the 0.1.7 release has no ``GPT2_small`` backbone config, which Chatterbox Nano uses; we
  add it to the reference's config table (values from the Nano release: GPT-2 small with
  n_embd 768, 12 heads, 12 layers, the Turbo vocabulary).
"""
from __future__ import annotations

import importlib
import os
import pathlib
import warnings

_REF = None

GPT2_SMALL_CONFIG_OVERRIDES = dict(n_embd=768, hidden_size=768, n_head=12, n_layer=12)


def _import_torchaudio_without_native_libs():
    original_glob = pathlib.Path.glob

    def glob(self, pattern, *args, **kwargs):
        if self.name == "lib" and self.parent.name == "torchaudio":
            return iter(())
        return original_glob(self, pattern, *args, **kwargs)

    pathlib.Path.glob = glob
    try:
        importlib.import_module("torchaudio")
    finally:
        pathlib.Path.glob = original_glob


def reference_available() -> bool:
    try:
        importlib.util.find_spec("chatterbox")
    except (ImportError, ValueError):
        return False
    return importlib.util.find_spec("chatterbox") is not None


def load_reference():
    """Import and return the reference ``chatterbox`` package (patched as described above)."""
    global _REF
    if _REF is not None:
        return _REF
    # The reference reaches for the Hugging Face hub in a few places (Cangjie table);
    # tests must never touch the network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _import_torchaudio_without_native_libs()
        import chatterbox  # noqa: F401
        from chatterbox.models.t3.llama_configs import LLAMA_CONFIGS

    if "GPT2_small" not in LLAMA_CONFIGS:
        LLAMA_CONFIGS["GPT2_small"] = dict(LLAMA_CONFIGS["GPT2_medium"], **GPT2_SMALL_CONFIG_OVERRIDES)
    _REF = chatterbox
    return chatterbox
