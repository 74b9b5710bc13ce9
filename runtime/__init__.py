"""chatterbox-rt: a fast, reference-exact inference runtime for Resemble AI's Chatterbox TTS.

The import name is ``chatterbox_rt``; ``runtime/`` in the repository maps to it.
"""
__version__ = "0.1.0"

VARIANTS = ("chatterbox", "multilingual", "turbo", "nano")

# The public API loads lazily, so that ``import chatterbox_rt`` stays cheap (the CLI's --help,
# tools that only read __version__).
_LAZY = {"TTS": ".tts", "VC": ".vc", "Voice": ".voice", "VoiceError": ".voice", "AudioError": ".audio",
         "CheckpointError": ".checkpoint", "Engine": ".engine", "PrecisionConfig": ".precision"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = ["TTS", "VC", "Voice", "Engine", "PrecisionConfig", "VoiceError", "AudioError", "CheckpointError", "VARIANTS", "__version__"]
