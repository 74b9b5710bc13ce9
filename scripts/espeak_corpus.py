"""Write a small folder of spoken WAV files with eSpeak NG (through ``espeakng-loader``'s library),
plus one corrupt file: a corpus to try ``chatterbox-rt tokens`` on without downloading anything.

    pip install espeakng-loader
    python scripts/espeak_corpus.py corpus/ [--n 6]

eSpeak NG's synchronous API (speak_lib.h): ``espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, ...)``
returns the sample rate (22050 Hz), ``espeak_SetSynthCallback`` receives 16-bit mono samples, and
``espeak_Synth`` speaks one text.
"""
from __future__ import annotations

import argparse
import ctypes
from pathlib import Path

import numpy as np
import soundfile as sf

AUDIO_OUTPUT_SYNCHRONOUS = 2
ESPEAK_CHARS_UTF8 = 1
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Speech tokens arrive twenty five times a second.",
    "A corpus of short sentences is enough to try the tool.",
    "Every file is read, resampled, and tokenised in batches.",
    "Run length encoding merges repeated tokens into one symbol.",
    "This sentence is the last one, and it is a little longer than the others were.",
]
SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


def speaker():
    import espeakng_loader

    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    sr = lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0)
    if sr <= 0:
        raise RuntimeError("espeak_Initialize failed")
    chunks: list[np.ndarray] = []

    @SynthCallback
    def on_audio(wav, n, events):
        if n > 0:
            chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0

    lib.espeak_SetSynthCallback(on_audio)
    lib.espeak_SetVoiceByName(b"en")

    def say(text: str) -> np.ndarray:
        chunks.clear()
        data = text.encode("utf-8") + b"\0"
        lib.espeak_Synth(data, len(data), 0, 0, 0, ESPEAK_CHARS_UTF8, None, None)
        return np.concatenate(chunks).astype(np.float32) / 32768.0

    say.sample_rate, say.keep = sr, on_audio  # the callback must outlive the calls
    return say


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--n", type=int, default=len(TEXTS))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    say = speaker()
    for i in range(args.n):
        wav = say(TEXTS[i % len(TEXTS)])
        path = args.out / f"utt_{i:03d}.{'flac' if i % 3 == 2 else 'wav'}"
        sf.write(path, wav, say.sample_rate)
        print(f"{path}: {wav.size / say.sample_rate:.2f} s")
    (args.out / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk-not-audio")
    print(f"{args.out / 'corrupt.wav'}: corrupt on purpose")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
