"""S3Gen: speech tokens -> mel (flow matching) -> 24 kHz waveform (HiFT vocoder)."""
from .hift import (S3GEN_SR, F0Predictor, HiFTConfig, HiFTGenerator, ResBlock, SineSource, Snake,
                   fold_weight_norm, hann_window, trim_fade)

__all__ = ["HiFTConfig", "HiFTGenerator", "F0Predictor", "SineSource", "ResBlock", "Snake",
           "fold_weight_norm", "hann_window", "trim_fade", "S3GEN_SR"]
