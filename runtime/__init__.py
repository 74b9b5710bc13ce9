"""chatterbox-rt: a fast, reference-exact inference runtime for Resemble AI's Chatterbox TTS.

The import name is ``chatterbox_rt``; ``runtime/`` in the repository maps to it.
"""
__version__ = "0.1.0"

VARIANTS = ("chatterbox", "multilingual", "turbo", "nano")
