"""S3Gen: speech tokens -> 50 Hz features (upsampling conformer encoder) -> mel (conditional flow
matching) -> 24 kHz waveform (HiFT vocoder)."""
from .cfm import CausalCFM, ConditionalDecoder, FlowConfig
from .encoder import EncoderConfig, FlowFront, UpsampleConformerEncoder, concat_prompt_tokens
from .hift import (S3GEN_SR, F0Predictor, HiFTConfig, HiFTGenerator, ResBlock, SineSource, Snake,
                   fold_weight_norm, hann_window, trim_fade)
from .mel import MelConfig, mel_spectrogram, prompt_mel, slaney_mel_basis
from .s3gen import S3_SR, S3GEN_SIL, Flow, S3Gen

__all__ = ["HiFTConfig", "HiFTGenerator", "F0Predictor", "SineSource", "ResBlock", "Snake",
           "fold_weight_norm", "hann_window", "trim_fade", "S3GEN_SR",
           "EncoderConfig", "UpsampleConformerEncoder", "FlowFront", "concat_prompt_tokens",
           "FlowConfig", "ConditionalDecoder", "CausalCFM",
           "MelConfig", "mel_spectrogram", "prompt_mel", "slaney_mel_basis",
           "S3Gen", "Flow", "S3_SR", "S3GEN_SIL"]
