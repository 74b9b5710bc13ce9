"""Audio corpus -> speech-token dataset in Parquet: ``chatterbox-rt tokens encode``.

Every audio file under ``input_dir`` (``.wav .flac .mp3 .ogg``, any rate, channels averaged) is read
as VC reads its source (:func:`chatterbox_rt.audio.load_audio`: soundfile, then soxr to the codec's
rate), optionally cut into ``segment_length``-second segments, and run through a codec in batches:

* ``s3``: our S3 tokenizer v2 (``chatterbox_rt.models.s3tokenizer``), the tokenizer of a Chatterbox
  checkpoint's S3Gen file, at 16 kHz, 25 tokens/s, 6561 codes. A whole file's tokens equal
  ``VC.from_local(ckpt).source_tokens(file)`` (``VC.from_dummy(seed)`` for ``dummy_weights``);
* ``snac``: SNAC's multi-scale codes (``chatterbox_rt.tokens.snac``, the ``snac`` extra).

Batching never changes an utterance's tokens: the S3 tokenizer masks each utterance's padding
(its module docstring), and utterances past its 30 s window are routed to the windowed path, whose
windows all have the same padded shape, so windows of several files share one encoder call
(at most ``batch_size`` windows at a time, which bounds the memory of an hour-long file).

Output, in ``out_dir``:

* ``tokens_batch_XXXX.parquet``: one row per segment, with ``file_path`` (string, relative to
  ``input_dir``), ``segment`` (int32), ``offset_s`` and ``duration`` (float64 seconds), then
  ``tokens`` (list<int16>) and ``n_tokens`` (int32) for S3, or per SNAC scale K (0 = coarsest)
  ``tokens_scale_K`` (list<int16>), ``n_tokens_scale_K`` (int32) and ``shape_scale_K``
  (list<int32>: the shape ``[1, T_K]`` of that row's codes as ``SNAC.encode`` returns them).
  A batch holds whole files, and is written to a temporary name and renamed, so a crash never
  leaves half a file;
* ``progress.json``: the codec settings and which files each batch holds. A re-run into the same
  ``out_dir`` skips those files (a deleted batch is redone; an unreadable file is retried), and
  refuses other settings (codec, checkpoint, segment length) unless ``overwrite=True``;
* ``metadata.json``: files and segments encoded, total duration, per scale the token count,
  min / max / unique codes and the 20 most common, the codec, ``vocab_size``, the checkpoint's
  content hash (sha256 of the S3Gen / SNAC weight file, or ``"dummy (seed N)"``), the segment
  length, and the files skipped and why.

A file that cannot be read, holds no samples or is too short for the codec is skipped and
reported, never fatal. Reading and resampling the next files overlaps the model's work.
"""
from __future__ import annotations

import abc
import hashlib
import json
import math
import os
import re
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg")
CODECS = ("s3", "snac")
BATCH_NAME = "tokens_batch_{:04d}.parquet"
BATCH_GLOB = "tokens_batch_*.parquet"
BATCH_RE = re.compile(r"^tokens_batch_(\d+)\.parquet$")
PROGRESS_FILE = "progress.json"
METADATA_FILE = "metadata.json"
FORMAT_VERSION = 1
DEFAULT_BATCH_SIZE = 16
TOP_TOKENS = 20  # metadata.json: the most common codes per scale
READ_AHEAD = 8  # files read and resampled ahead of the model (bounded: a file may be hours long)
MAX_BATCH_AUDIO_S = 1800.0  # a batch file is written once it holds this much audio, even with few segments
MIN_SEGMENT_S = 0.04  # one S3 token; a shorter tail joins the segment before it
TOKEN_MAX = np.iinfo(np.int16).max  # tokens are stored as int16
S3_VOCAB_SIZE = 6561  # 3^8 FSQ codes (S3TokenizerConfig.codebook_size; not imported: this module loads no torch)
S3_SR = 16000
S3GEN_NAMES = ("s3gen.safetensors", "s3gen.pt", "s3gen_meanflow.safetensors")  # VC.from_local's search order

PathLike = Union[str, os.PathLike]


class EncodeError(ValueError):
    """A request the encoder refuses before (or instead of) doing work; the message says what to change."""


# ---------------------------------------------------------------------------------------------
# Codecs: a batch of mono waveforms at the codec's rate -> per waveform, its columns
# ---------------------------------------------------------------------------------------------
def sha256_file(path: PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def list_array(values: Sequence[np.ndarray], dtype):
    """A pyarrow ``list<dtype>`` array with one row per array (no Python loop over the values)."""
    import pyarrow as pa

    lengths = np.fromiter((len(v) for v in values), dtype=np.int64, count=len(values))
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate([np.asarray(v) for v in values]) if len(values) else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat.astype(dtype, copy=False)))


class Codec(abc.ABC):
    """What the encoder needs of a codec (``S3Codec``, ``snac.SnacCodec``). ``scales`` maps
    metadata's scale names to token columns."""

    name: str
    sample_rate: int
    vocab_size: int
    min_samples: int = 1
    checkpoint: str  # content hash of the weight file, or "dummy (seed N)"
    checkpoint_file: Optional[str] = None
    scales: dict

    @abc.abstractmethod
    def schema_fields(self) -> list:
        """The pyarrow fields of the codec's columns."""

    @abc.abstractmethod
    def encode(self, wavs: Sequence[np.ndarray]) -> list[dict]:
        """Mono float32 waveforms -> per waveform ``{column: value}`` for the codec's columns."""

    @abc.abstractmethod
    def columns(self, rows: list[dict]) -> dict:
        """The codec's pyarrow columns for ``rows`` (as from :meth:`encode`)."""

    def config(self) -> dict:
        """What a resumed run must match."""
        return {"codec": self.name, "checkpoint_hash": self.checkpoint, "sample_rate": self.sample_rate,
                "vocab_size": self.vocab_size}

    def describe(self) -> dict:
        return {}


def s3gen_file(ckpt_dir: PathLike) -> Path:
    """The S3Gen file of a checkpoint directory, found as ``VC.from_local`` finds it."""
    from ..checkpoint import CheckpointError

    d = Path(ckpt_dir)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {d}")
    path = next((d / n for n in S3GEN_NAMES if (d / n).is_file()), None)
    if path is None:
        raise CheckpointError(f"no S3Gen checkpoint in {d}: expected one of {', '.join(S3GEN_NAMES)} (the S3 "
                              f"tokenizer's weights are its tokenizer.* tensors)")
    return path


def load_s3_tokenizer(path: PathLike, device="cpu"):
    """The ``tokenizer.*`` tensors of an S3Gen file -> our ``S3Tokenizer`` (strict keys and shapes)."""
    from ..checkpoint import CheckpointError, check_state_dict, read_state_dict
    from ..models.s3tokenizer import S3Tokenizer

    path = Path(path)
    prefix = "tokenizer."
    if path.suffix == ".safetensors":  # read only the tokenizer's tensors, not the whole decoder
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                sd = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
        except Exception as e:  # corrupt file, not safetensors
            raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    else:
        sd = {k[len(prefix):]: v for k, v in read_state_dict(path).items() if k.startswith(prefix)}
    for k in S3Tokenizer.RECOMPUTED_BUFFERS:
        sd.pop(k, None)
    tok = S3Tokenizer()
    check_state_dict(tok, sd, f"{path} (its {prefix}* tensors)")
    tok.load_state_dict(sd, strict=True)
    return tok.eval().to(device)


def dummy_s3_tokenizer(seed: int = 0, device="cpu"):
    """The S3 tokenizer of ``VC.from_dummy(seed)``: that builds ``S3Gen.from_dummy(seed=seed + 1)``,
    whose seeded init draws the tokenizer's parameters first (``S3Gen.tokenizer`` is its first
    child), so initialising the tokenizer alone with the same seed gives the same weights."""
    from ..checkpoint import init_dummy_conv_
    from ..models.s3tokenizer import S3Tokenizer

    return init_dummy_conv_(S3Tokenizer(), seed + 1).eval().to(device)


class S3Codec(Codec):
    """The S3 speech tokenizer v2: 16 kHz -> 25 Hz tokens in [0, 6561)."""

    name = "s3"

    def __init__(self, tokenizer=None, *, checkpoint: str, checkpoint_file: Optional[str] = None,
                 batch_size: int = DEFAULT_BATCH_SIZE, load=None, config=None):
        """``tokenizer``, or ``load()`` that returns it when the first batch needs it (so that a run
        with nothing left to do, or with settings the output directory refuses, loads no weights)
        and the ``S3TokenizerConfig`` it will have."""
        from ..models.s3tokenizer import S3TokenizerConfig

        if (tokenizer is None) == (load is None):
            raise TypeError("give the tokenizer or a function that loads it")
        c = tokenizer.config if tokenizer is not None else (config or S3TokenizerConfig())
        self._tokenizer, self._load = tokenizer, load
        self.config_ = c
        self.batch_size = batch_size
        self.sample_rate = c.sample_rate
        self.vocab_size = c.codebook_size
        self.min_samples = c.n_fft // 2 + 1  # the centred STFT's reflect padding needs more than n_fft / 2
        self.checkpoint = checkpoint
        self.checkpoint_file = checkpoint_file
        self.scales = {"s3": "tokens"}

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            tok = self._load()
            a, b = tok.config, self.config_
            if (a.sample_rate, a.codebook_size, a.n_fft) != (b.sample_rate, b.codebook_size, b.n_fft):
                raise RuntimeError(f"the loaded S3 tokenizer's config {a} is not the one announced ({b})")
            self._tokenizer, self.config_ = tok, a
        return self._tokenizer

    def schema_fields(self) -> list:
        import pyarrow as pa

        return [pa.field("tokens", pa.list_(pa.int16())), pa.field("n_tokens", pa.int32())]

    def columns(self, rows: list[dict]) -> dict:
        import pyarrow as pa

        tokens = [r["tokens"] for r in rows]
        return {"tokens": list_array(tokens, np.int16),
                "n_tokens": pa.array([len(t) for t in tokens], type=pa.int32())}

    def describe(self) -> dict:
        c = self.config_
        return {"token_rate": c.token_rate, "window_s": c.window_s, "overlap_s": c.overlap_s}

    def encode(self, wavs: Sequence[np.ndarray]) -> list[dict]:
        import torch

        c = self.tokenizer.config
        out: list = [None] * len(wavs)
        long = [i for i, w in enumerate(wavs) if len(w) // c.hop > c.window_frames]
        short = sorted(set(range(len(wavs))) - set(long), key=lambda i: len(wavs[i]))  # less padding per call
        device = self.tokenizer.device
        with torch.inference_mode():
            for start in range(0, len(short), self.batch_size):
                chunk = short[start:start + self.batch_size]
                mels, mel_lens = self.tokenizer.featurize([torch.from_numpy(wavs[i]).to(device) for i in chunk])
                tokens, lens = self.tokenizer.quantize(mels, mel_lens)  # the short path: no mel is past the window
                tokens = tokens.cpu().numpy()
                for j, (i, n) in enumerate(zip(chunk, lens.tolist(), strict=True)):
                    out[i] = tokens[j, :n]
            if long:
                for i, t in zip(long, self._windowed([wavs[i] for i in long]), strict=True):
                    out[i] = t
        return [{"tokens": t.astype(np.int16)} for t in out]

    def _windowed(self, wavs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """``S3Tokenizer._quantize_windowed`` for utterances past the window, with the windows of all
        of them run ``batch_size`` at a time (each is padded to the full window either way), so an
        hour-long file never holds more than ``batch_size`` windows' activations at once."""
        import torch
        import torch.nn.functional as F

        tok, c = self.tokenizer, self.tokenizer.config
        W = c.window_frames
        codes: list[list[np.ndarray]] = [[] for _ in wavs]  # per utterance, its windows' tokens in order
        windows: list = []  # (utterance, padded mel [n_mels, W], frames)

        def run() -> None:
            mel = torch.stack([w for _, w, _ in windows])  # [n, n_mels, W]
            mel_len = torch.tensor([n for _, _, n in windows], dtype=torch.int32, device=mel.device)
            hidden, code_len = tok.encoder(mel, mel_len)
            q = tok.quantizer(hidden).long().cpu().numpy()
            for (b, _, _), row, n in zip(windows, q, code_len.tolist(), strict=True):
                codes[b].append(row[:n])
            windows.clear()

        for b, w in enumerate(wavs):
            mels, mel_lens = tok.featurize([torch.from_numpy(w).to(tok.device)])  # floor: the whole utterance's max
            n = int(mel_lens[0])
            for start in range(0, n, c.stride_frames):
                seg = mels[0, :, start:min(start + W, n)]
                windows.append((b, F.pad(seg, (0, W - seg.shape[1])), seg.shape[1]))
                if len(windows) == self.batch_size:
                    run()
        if windows:
            run()
        k = c.seam_tokens  # half the overlap is dropped on each side of an inner seam
        return [np.concatenate([s[(k if j > 0 else 0):(-k if j < len(segs) - 1 else None)]
                                for j, s in enumerate(segs)]) for segs in codes]


def make_codec(codec: str = "s3", *, ckpt: Optional[PathLike] = None, dummy_weights: bool = False, seed: int = 0,
               snac_checkpoint: Optional[PathLike] = None, batch_size: int = DEFAULT_BATCH_SIZE,
               device=None) -> Codec:
    """The codec an encode run uses (loaded on ``device``; None: cuda when present, else cpu)."""
    if codec not in CODECS:
        raise EncodeError(f"unknown codec {codec!r}; expected one of {', '.join(CODECS)}")
    if codec == "snac":
        from .snac import load_snac_codec

        return load_snac_codec(snac_checkpoint, batch_size=batch_size, device=_device(device))
    if snac_checkpoint is not None:
        raise EncodeError("a SNAC checkpoint applies to codec 'snac' (--codec snac), not 's3'")
    if ckpt is not None and dummy_weights:
        raise EncodeError("give a checkpoint (--ckpt DIR) or dummy weights (--dummy-weights), not both")
    if ckpt is None and not dummy_weights:
        raise EncodeError("the S3 tokenizer needs weights: a Chatterbox checkpoint directory (--ckpt DIR; its S3Gen "
                          "file holds the tokenizer) or seeded random ones (--dummy-weights)")
    device = _device(device)
    if dummy_weights:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise EncodeError(f"seed must be an integer >= 0, got {seed!r}")
        return S3Codec(load=lambda: dummy_s3_tokenizer(seed, device), checkpoint=f"dummy (seed {seed})",
                       batch_size=batch_size)
    path = s3gen_file(ckpt)
    return S3Codec(load=lambda: load_s3_tokenizer(path, device), checkpoint=sha256_file(path),
                   checkpoint_file=str(path), batch_size=batch_size)


def _device(device) -> str:
    import torch

    if device is None or str(device).strip().lower() == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


# ---------------------------------------------------------------------------------------------
# Files, segments
# ---------------------------------------------------------------------------------------------
def find_audio_files(input_dir: PathLike) -> list[Path]:
    """Audio files under ``input_dir``, recursively, by extension (any case), in sorted order;
    hidden files and folders are left out."""
    root = Path(input_dir)
    if not root.is_dir():
        raise EncodeError(f"input directory {root} does not exist" if not root.exists() else
                          f"{root} is not a directory")
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in AUDIO_EXTENSIONS:
                found.append(Path(dirpath) / name)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def segment_bounds(n: int, sr: int, segment_length: Optional[float]) -> list[tuple[int, int]]:
    """``(start, length)`` in samples of each segment of an ``n``-sample clip: the whole clip, or
    ``segment_length`` seconds each, where a tail shorter than ``MIN_SEGMENT_S`` joins the segment
    before it (so every segment has at least one token's worth of audio)."""
    if segment_length is None or n == 0:
        return [(0, n)]
    step = max(1, round(segment_length * sr))
    starts = list(range(0, n, step))
    if len(starts) > 1 and n - starts[-1] < MIN_SEGMENT_S * sr:
        starts.pop()
    return [(s, (starts[i + 1] if i + 1 < len(starts) else n) - s) for i, s in enumerate(starts)]


def _check_segment_length(segment_length) -> Optional[float]:
    if segment_length is None:
        return None
    if isinstance(segment_length, bool) or not isinstance(segment_length, (int, float)) or \
            not math.isfinite(segment_length) or segment_length < MIN_SEGMENT_S:
        raise EncodeError(f"segment length must be at least {MIN_SEGMENT_S:g} s (one S3 token), or None for whole "
                          f"files; got {segment_length!r}")
    return float(segment_length)


def _read(path: Path, rel: str, sr: int, min_samples: int):
    """-> (wav, None) or (None, why it is skipped). Never raises: a bad file is the corpus's problem."""
    from ..audio import load_audio

    try:
        wav, _ = load_audio(path, target_sr=sr, name=rel)
    except Exception as e:  # noqa: BLE001 - unreadable, corrupt, empty, NaN: report and go on
        msg = " ".join(str(e).split()) or type(e).__name__
        return None, msg[len(rel) + 2:] if msg.startswith(rel + ": ") else msg
    if len(wav) < min_samples:
        return None, (f"too short to encode: {len(wav)} samples at {sr} Hz (at least {min_samples}, "
                      f"{min_samples / sr * 1000:.1f} ms)")
    return np.ascontiguousarray(wav, dtype=np.float32), None


def _read_ahead(items: Iterable, read, depth: int) -> Iterator:
    """``(item, read(item))`` in order, with up to ``depth`` reads running ahead in a thread
    (soundfile and soxr release the GIL), so decoding and resampling overlap the model."""
    it = iter(items)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokens-read") as pool:
        queue = deque()
        for item in it:
            queue.append((item, pool.submit(read, item)))
            if len(queue) >= depth:
                break
        while queue:
            item, fut = queue.popleft()
            nxt = next(it, None)
            if nxt is not None:
                queue.append((nxt, pool.submit(read, nxt)))
            yield item, fut.result()


# ---------------------------------------------------------------------------------------------
# The output directory: progress, atomic writes, resume
# ---------------------------------------------------------------------------------------------
def _write_atomic(path: Path, write) -> None:
    """``write(tmp)`` then rename onto ``path``: a crash leaves the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_json(path: Path, data: dict) -> None:
    _write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n"))


def _batch_index(name: str) -> int:
    m = BATCH_RE.match(name)
    return int(m.group(1)) if m else -1


def _file_paths(batch: Path) -> list[str]:
    import pyarrow.parquet as pq

    col = pq.read_table(batch, columns=["file_path"]).column("file_path").to_pylist()
    return list(dict.fromkeys(col))


def _describe_config(c: dict) -> str:
    seg = c.get("segment_length")
    return (f"codec {c.get('codec')}, checkpoint {c.get('checkpoint_hash')}, "
            f"{'whole files' if seg is None else f'{seg:g} s segments'}, {c.get('sample_rate')} Hz")


def _open_out_dir(out: Path, config: dict, overwrite: bool) -> dict:
    """Create or reopen ``out`` -> ``{batch name: [files]}`` of the batches already there."""
    if out.exists() and not out.is_dir():
        raise EncodeError(f"output {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    for tmp in out.glob(".*.tmp"):  # a crash's leftovers (never renamed, so never part of the dataset)
        tmp.unlink(missing_ok=True)
    existing = sorted(p for p in out.glob(BATCH_GLOB) if BATCH_RE.match(p.name))
    progress_path = out / PROGRESS_FILE
    if overwrite:
        for p in [*existing, progress_path, out / METADATA_FILE]:
            p.unlink(missing_ok=True)
        return {}
    if not progress_path.is_file():
        if existing:
            raise EncodeError(f"{out} holds {len(existing)} token batch file(s) but no {PROGRESS_FILE}, so it "
                              f"cannot be resumed: use another output directory, or --overwrite "
                              f"(overwrite=True) to replace them")
        return {}
    try:
        progress = json.loads(progress_path.read_text())
        old, recorded = progress["config"], dict(progress["batches"])
    except (ValueError, KeyError, TypeError) as e:
        raise EncodeError(f"{progress_path} is not a progress file of this encoder ({e}); use another output "
                          f"directory, or --overwrite (overwrite=True) to start again") from None
    if old != config:
        raise EncodeError(f"{out} was encoded with {_describe_config(old)}; this run asks for "
                          f"{_describe_config(config)}. Use another output directory, or --overwrite "
                          f"(overwrite=True) to replace it")
    batches = {}
    for p in existing:
        if p.name in recorded:
            batches[p.name] = list(recorded[p.name])
            continue
        try:  # written, but the crash came before progress.json recorded it: its rows are whole files
            batches[p.name] = _file_paths(p)
        except Exception:  # noqa: BLE001 - not a readable batch: not part of the dataset
            p.unlink(missing_ok=True)
    return batches


# ---------------------------------------------------------------------------------------------
# Statistics for metadata.json
# ---------------------------------------------------------------------------------------------
def dataset_stats(out: Path, batch_names: Iterable[str], codec: Codec) -> dict:
    """Files, segments, duration and per-scale code statistics of the batches, read back."""
    import pyarrow.parquet as pq

    counts = {s: np.zeros(codec.vocab_size, dtype=np.int64) for s in codec.scales}
    files, segments, duration = set(), 0, 0.0
    for name in sorted(batch_names):
        table = pq.read_table(out / name, columns=["file_path", "duration", *codec.scales.values()])
        files.update(table.column("file_path").to_pylist())
        segments += table.num_rows
        duration += float(np.sum(table.column("duration").to_numpy()))
        for scale, col in codec.scales.items():
            flat = table.column(col).combine_chunks().flatten().to_numpy(zero_copy_only=False)
            counts[scale] += np.bincount(flat.astype(np.int64), minlength=codec.vocab_size)[:codec.vocab_size]
    scales = {}
    for scale, c in counts.items():
        used = np.flatnonzero(c)
        top = np.argsort(-c, kind="stable")[:TOP_TOKENS]
        scales[scale] = {"column": codec.scales[scale], "n_tokens": int(c.sum()),
                         "min": int(used[0]) if used.size else None, "max": int(used[-1]) if used.size else None,
                         "unique": int(used.size),
                         "most_common": [[int(t), int(c[t])] for t in top if c[t] > 0]}
    return {"files_encoded": len(files), "segments": segments, "total_duration_s": duration, "scales": scales}


# ---------------------------------------------------------------------------------------------
# encode
# ---------------------------------------------------------------------------------------------
@dataclass
class EncodeResult:
    """What one :func:`encode` run did (``metadata.json`` describes the whole dataset)."""

    out_dir: Path
    codec: str
    files_found: int  # audio files considered (after max_files)
    files_encoded: int  # by this run
    files_done_before: int  # already in out_dir (resumed)
    segments: int  # by this run
    audio_seconds: float  # by this run
    elapsed_s: float
    skipped: dict = field(default_factory=dict)  # relative path -> why
    batches: list = field(default_factory=list)  # the batch files this run wrote
    metadata: dict = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        """Seconds of audio encoded per second of wall time (reading included)."""
        return self.audio_seconds / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def summary(self) -> str:
        parts = [f"encoded {self.files_encoded} file(s), {self.segments} segment(s), {self.audio_seconds:.1f} s of "
                 f"audio into {self.out_dir} ({len(self.batches)} batch file(s)) in {self.elapsed_s:.1f} s: "
                 f"{self.throughput:.1f} s of audio per second"]
        if self.files_done_before:
            parts.append(f"{self.files_done_before} already there")
        if self.skipped:
            parts.append(f"{len(self.skipped)} skipped")
        return "; ".join(parts)


def _check_count(value, name: str, minimum: int = 1) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise EncodeError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def encode(input_dir: PathLike, out_dir: PathLike, *, ckpt: Optional[PathLike] = None, dummy_weights: bool = False,
           seed: int = 0, codec: str = "s3", segment_length: Optional[float] = None,
           batch_size: int = DEFAULT_BATCH_SIZE, max_files: Optional[int] = None,
           snac_checkpoint: Optional[PathLike] = None, device=None, progress: bool = True,
           overwrite: bool = False, _codec: Optional[Codec] = None) -> EncodeResult:
    """Encode every audio file under ``input_dir`` into token batches in ``out_dir`` (module docstring).

    ``ckpt``: a Chatterbox checkpoint directory (its S3Gen file holds the S3 tokenizer), or
    ``dummy_weights=True`` (``VC.from_dummy(seed)``'s tokenizer); ``codec="snac"`` reads
    ``snac_checkpoint`` instead. ``segment_length``: seconds per segment (None: whole files).
    ``batch_size``: utterances per model call, and the segments a batch file holds at least.
    ``max_files``: the first N files (sorted by path). ``overwrite``: replace what ``out_dir`` holds
    instead of resuming it. ``progress``: a tqdm bar on stderr.
    """
    t0 = time.perf_counter()
    batch_size = _check_count(batch_size, "batch_size")
    max_files = _check_count(max_files, "max_files")
    segment_length = _check_segment_length(segment_length)
    root, out = Path(input_dir), Path(out_dir)
    files = find_audio_files(root)  # before the model loads: a wrong path fails fast
    if max_files is not None:
        files = files[:max_files]
    if out.resolve() == root.resolve():
        raise EncodeError(f"the output directory is the input directory ({root}); give another --out")
    codec_ = _codec or make_codec(codec, ckpt=ckpt, dummy_weights=dummy_weights, seed=seed,
                                  snac_checkpoint=snac_checkpoint, batch_size=batch_size, device=device)
    if codec_.vocab_size - 1 > TOKEN_MAX:
        raise EncodeError(f"a {codec_.vocab_size}-code codebook does not fit the int16 token columns")
    config = {**codec_.config(), "segment_length": segment_length, "format": FORMAT_VERSION}
    batches = _open_out_dir(out, config, overwrite)
    done = {f for names in batches.values() for f in names}
    rels = [(p, p.relative_to(root).as_posix()) for p in files]
    todo = [(p, rel) for p, rel in rels if rel not in done]
    next_index = 1 + max((_batch_index(n) for n in batches), default=-1)

    from tqdm import tqdm

    bar = tqdm(total=len(todo), unit="file", desc="tokens encode", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    written: list[Path] = []
    skipped: dict = {}
    pending: list = []  # (rel, [(segment, offset_s, duration, wav)]) of whole files
    n_pending, pending_s = 0, 0.0
    stats = {"files": 0, "segments": 0, "seconds": 0.0}

    def save_progress() -> None:
        _write_json(out / PROGRESS_FILE, {"format": FORMAT_VERSION, "config": config, "batches": batches})

    def flush() -> None:
        nonlocal pending, n_pending, pending_s, next_index
        if not pending:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        segs = [s for _, file_segs in pending for s in file_segs]
        rows = codec_.encode([s[3] for s in segs])
        paths = [rel for rel, file_segs in pending for _ in file_segs]
        columns = {"file_path": pa.array(paths, type=pa.string()),
                   "segment": pa.array([s[0] for s in segs], type=pa.int32()),
                   "offset_s": pa.array([s[1] for s in segs], type=pa.float64()),
                   "duration": pa.array([s[2] for s in segs], type=pa.float64()),
                   **codec_.columns(rows)}
        schema = pa.schema([pa.field("file_path", pa.string()), pa.field("segment", pa.int32()),
                            pa.field("offset_s", pa.float64()), pa.field("duration", pa.float64()),
                            *codec_.schema_fields()])
        table = pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)
        name = BATCH_NAME.format(next_index)
        _write_atomic(out / name, lambda tmp: pq.write_table(table, tmp))
        batches[name] = [rel for rel, _ in pending]
        save_progress()  # after the rename: a crash in between leaves a batch that the next run adopts
        written.append(out / name)
        stats["files"] += len(pending)
        stats["segments"] += len(segs)
        stats["seconds"] += sum(s[2] for s in segs)
        bar.update(len(pending))
        elapsed = time.perf_counter() - t0
        bar.set_postfix_str(f"{stats['seconds'] / max(elapsed, 1e-9):.1f} s audio/s")
        next_index += 1
        pending, n_pending, pending_s = [], 0, 0.0

    sr = codec_.sample_rate
    try:
        save_progress()  # the settings, before any work: a re-run with others is refused
        reads = _read_ahead(todo, lambda item: _read(item[0], item[1], sr, codec_.min_samples), READ_AHEAD)
        for (path, rel), (wav, why) in reads:
            if wav is None:
                skipped[rel] = why
                bar.update(1)
                continue
            file_segs = [(i, start / sr, n / sr, wav[start:start + n])
                         for i, (start, n) in enumerate(segment_bounds(len(wav), sr, segment_length))]
            pending.append((rel, file_segs))
            n_pending += len(file_segs)
            pending_s += len(wav) / sr
            if n_pending >= batch_size or pending_s >= MAX_BATCH_AUDIO_S:
                flush()
        flush()
    finally:
        bar.close()

    metadata = {
        "format": FORMAT_VERSION,
        "codec": codec_.name,
        "vocab_size": codec_.vocab_size,
        "sample_rate": sr,
        "checkpoint_hash": codec_.checkpoint,
        "checkpoint_file": codec_.checkpoint_file,
        "segment_length": segment_length,
        **codec_.describe(),
        **dataset_stats(out, batches, codec_),
        "batches": len(batches),
        "files_skipped": skipped,
        "input_dir": str(root.resolve()),
    }
    _write_json(out / METADATA_FILE, metadata)
    return EncodeResult(out_dir=out, codec=codec_.name, files_found=len(files), files_encoded=stats["files"],
                        files_done_before=len(rels) - len(todo), segments=stats["segments"],
                        audio_seconds=stats["seconds"], elapsed_s=time.perf_counter() - t0, skipped=skipped,
                        batches=written, metadata=metadata)


__all__ = ["encode", "EncodeResult", "EncodeError", "make_codec", "find_audio_files", "segment_bounds",
           "dummy_s3_tokenizer", "load_s3_tokenizer", "S3Codec", "Codec", "AUDIO_EXTENSIONS", "CODECS"]
