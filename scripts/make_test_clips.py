"""Write the real-speech test clips in ``tests/data/`` with eSpeak NG (driven through ctypes).

The parity tests for audio loading, resampling and the mel front ends need speech-like input
(voiced harmonics, fricatives, pauses), not noise. There is no espeak-ng binary on the CI machine,
so this script loads the ``libespeak-ng`` shared library and its voice data from the
``espeakng-loader`` wheel. How the committed clips were made::

    .venv/bin/python -m pip install --target /tmp/espk espeakng-loader==0.2.4
    PYTHONPATH=/tmp/espk .venv/bin/python scripts/make_test_clips.py

Clips (int16 PCM WAV):

* ``speech_en_6s.wav``       English (en-us), 6.0-7.5 s, mono, eSpeak's native 22050 Hz.
* ``speech_en_3s.wav``       a different English sentence, about 3 s, mono, 22050 Hz.
* ``speech_stereo_44k.wav``  another voice and sentence, about 4 s, stereo at 44100 Hz: the
                             22050 Hz synthesis is upsampled with soxr (HQ); the right channel is
                             the left one scaled by 0.8 and delayed by 7 samples, so the channels
                             differ slightly and a mix-down is not a copy of either channel.

With libespeak-ng 1.52.0 (espeakng-loader 0.2.4) repeated runs write byte-identical files. Voice
variants with a ``breath`` setting (e.g. ``+f3``) add random noise and are avoided for that reason.
Output is not guaranteed to be identical across eSpeak versions; the tests only need *a* fixed
real-speech clip, so the committed WAVs are the source of truth, not this script.
"""
from __future__ import annotations

import argparse
import ctypes
import pathlib
import sys

import numpy as np
import soundfile as sf
import soxr

# speak_lib.h constants
AUDIO_OUTPUT_SYNCHRONOUS = 2
ESPEAK_CHARS_UTF8 = 1
ESPEAK_ENDPAUSE = 0x1000
ESPEAK_RATE = 1  # words per minute
ESPEAK_PITCH = 3  # 0-100, 50 is normal
POS_CHARACTER = 1

SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

STEREO_SR = 44100
STEREO_DELAY = 7
STEREO_GAIN = 0.8

CLIPS = [
    # name, voice, words per minute, pitch, text, (min_s, max_s)
    ("speech_en_6s.wav", "en-us", 200, 50,
     "The quick brown fox jumps over the lazy dog. Meanwhile, seven bright birds were singing "
     "softly in the garden behind the old house.", (6.0, 7.5)),
    ("speech_en_3s.wav", "en-us", 170, 50,
     "Please call Stella and ask her to bring these things.", (2.5, 3.6)),
    ("speech_stereo_44k.wav", "en-gb-x-rp+f4", 150, 60,
     "A gentle breeze carried the smell of rain across the quiet valley.", (3.5, 4.8)),
]


class ESpeak:
    def __init__(self):
        try:
            import espeakng_loader
        except ImportError:
            sys.exit("espeakng_loader is not importable; see the module docstring for how to install it")
        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self.lib.espeak_Initialize.restype = ctypes.c_int
        self.lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        self.lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self.lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self.lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                          ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        self.sample_rate = self.lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0,
                                                      espeakng_loader.get_data_path().encode(), 0)
        if self.sample_rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed ({self.sample_rate})")
        self._chunks: list[np.ndarray] = []

        def collect(wav, n, events):
            if wav and n > 0:
                self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
            return 0  # continue synthesis

        self._callback = SYNTH_CALLBACK(collect)  # keep a reference: the library holds the pointer
        self.lib.espeak_SetSynthCallback(self._callback)

    def synth(self, text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
        """int16 samples at ``self.sample_rate``."""
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise RuntimeError(f"espeak voice {voice!r} not found")
        self.lib.espeak_SetParameter(ESPEAK_RATE, rate, 0)
        self.lib.espeak_SetParameter(ESPEAK_PITCH, pitch, 0)
        data = text.encode() + b"\0"
        self._chunks = []
        err = self.lib.espeak_Synth(data, len(data), 0, POS_CHARACTER, 0, ESPEAK_CHARS_UTF8 | ESPEAK_ENDPAUSE,
                                    None, None)
        if err != 0:
            raise RuntimeError(f"espeak_Synth failed ({err})")
        self.lib.espeak_Synchronize()
        return np.concatenate(self._chunks).astype(np.int16)


def to_stereo_44k(wav16: np.ndarray, sr: int) -> np.ndarray:
    x = wav16.astype(np.float32) / 32768.0
    left = soxr.resample(x, sr, STEREO_SR, quality="HQ").astype(np.float32)
    right = STEREO_GAIN * np.concatenate([np.zeros(STEREO_DELAY, np.float32), left[:-STEREO_DELAY]])
    stereo = np.stack([left, right], axis=1)  # [N, 2]
    return np.clip(np.round(stereo * 32768.0), -32768, 32767).astype(np.int16)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path,
                        default=pathlib.Path(__file__).resolve().parent.parent / "tests" / "data")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    es = ESpeak()
    for name, voice, rate, pitch, text, (lo, hi) in CLIPS:
        wav = es.synth(text, voice, rate, pitch)
        sr = es.sample_rate
        if "stereo" in name:
            wav, sr = to_stereo_44k(wav, sr), STEREO_SR
        seconds = wav.shape[0] / sr
        if not lo <= seconds <= hi:
            raise RuntimeError(f"{name}: {seconds:.2f} s is outside [{lo}, {hi}] s; adjust the rate or text")
        path = args.out / name
        sf.write(path, wav, sr, subtype="PCM_16")
        print(f"{path}: {seconds:.2f} s, {sr} Hz, {1 if wav.ndim == 1 else wav.shape[1]} ch, "
              f"{path.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
