"""T3: the text-to-speech-token transformer of every Chatterbox variant."""
from .backbone import AttentionProbe, KVCache
from .cond_enc import T3Cond
from .config import BackboneConfig, SamplingDefaults, T3Config
from .sampling import SamplingParams
from .t3 import T3

__all__ = ["T3", "T3Config", "T3Cond", "BackboneConfig", "SamplingDefaults", "SamplingParams", "KVCache",
           "AttentionProbe"]
