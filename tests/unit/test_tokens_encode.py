"""chatterbox_rt.tokens.encode: an audio corpus -> S3 tokens / SNAC codes in Parquet, resumable.

The S3 tokenizer is VC's dummy one at real shapes (``VC.from_dummy(0)``), built once per module; the
corpus is a few seconds of mixed formats, rates and channel counts, plus files that must be skipped.
"""
import hashlib
import importlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch

import chatterbox_rt.tokens as tokens_pkg
from chatterbox_rt.audio import load_audio, resample
from chatterbox_rt.cli import main
from chatterbox_rt.models.s3tokenizer import S3Tokenizer, S3TokenizerConfig
from chatterbox_rt.tokens import EncodeError, encode
from chatterbox_rt.tokens.encode import (BATCH_GLOB, METADATA_FILE, PROGRESS_FILE, S3Codec, dummy_s3_tokenizer,
                                         find_audio_files, segment_bounds)

ENC = importlib.import_module("chatterbox_rt.tokens.encode")  # the package's attribute `encode` is the function
DATA = Path(__file__).resolve().parents[1] / "data"
S3_SR = 16000
ENCODED = ["D.MP3", "a.wav", "silent.wav", "stereo.wav", "sub/b.flac", "sub/deeper/c.ogg"]
SKIPPED = {"bad.wav": "cannot read", "empty.wav": "no samples", "tiny.wav": "too short", "zero.flac": "cannot read"}
SMALL = S3TokenizerConfig(n_state=64, n_head=1, n_layer=1, window_s=3, overlap_s=2)  # 3 s windows, 1 s stride
S3_SCHEMA = pa.schema([("file_path", pa.string()), ("segment", pa.int32()), ("offset_s", pa.float64()),
                       ("duration", pa.float64()), ("tokens", pa.list_(pa.int16())), ("n_tokens", pa.int32())])


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    speech, sr = load_audio(DATA / "speech_en_3s.wav")  # 22.05 kHz
    rng = np.random.default_rng(0)
    (root / "sub" / "deeper").mkdir(parents=True)
    sf.write(root / "a.wav", speech[:int(2.0 * sr)], sr, subtype="PCM_16")
    sf.write(root / "sub" / "b.flac", resample(speech, sr, S3_SR)[:int(1.5 * S3_SR)], S3_SR)
    t = np.arange(int(1.2 * 48000)) / 48000
    sf.write(root / "sub" / "deeper" / "c.ogg", (0.3 * np.sin(2 * np.pi * 440 * t * (1 + t))).astype(np.float32), 48000)
    stereo, ssr = sf.read(DATA / "speech_stereo_44k.wav", dtype="float32")
    assert stereo.ndim == 2 and stereo.shape[1] == 2
    sf.write(root / "stereo.wav", stereo[:int(1.6 * ssr)], ssr)
    mix = resample(speech, sr, 24000)[:24000] + 0.05 * rng.standard_normal(24000).astype(np.float32)
    sf.write(root / "D.MP3", mix, 24000)  # the extension is matched in any case
    sf.write(root / "silent.wav", np.zeros(8000, np.float32), S3_SR)  # silence is encoded (VC would refuse it)
    (root / "bad.wav").write_bytes(b"RIFF\x00\x00\x00\x00not a wav file")
    sf.write(root / "empty.wav", np.zeros(0, np.float32), S3_SR)  # a valid header, no frames
    (root / "zero.flac").write_bytes(b"")
    sf.write(root / "tiny.wav", 0.1 * rng.standard_normal(100).astype(np.float32), S3_SR)
    (root / "notes.txt").write_text("not audio")
    sf.write(root / ".hidden.wav", speech[:sr], sr)
    return root


@pytest.fixture(scope="module")
def vc():
    from chatterbox_rt.vc import VC

    return VC.from_dummy(seed=0, device="cpu")


@pytest.fixture(scope="module")
def tok():
    return dummy_s3_tokenizer(0)


@pytest.fixture
def fast(tok, monkeypatch):
    """encode(dummy_weights=True, seed=0) reuses the module's tokenizer instead of building it again."""
    monkeypatch.setattr(ENC, "dummy_s3_tokenizer", lambda seed, device="cpu": tok if seed == 0 else
                        dummy_s3_tokenizer(seed, device))
    return tok


@pytest.fixture(scope="module")
def whole(corpus, tok, tmp_path_factory):
    """The corpus as whole files, batch size 3."""
    out = tmp_path_factory.mktemp("whole")
    real = ENC.dummy_s3_tokenizer
    ENC.dummy_s3_tokenizer = lambda seed, device="cpu": tok
    try:
        result = encode(corpus, out, dummy_weights=True, batch_size=3, device="cpu", progress=False)
    finally:
        ENC.dummy_s3_tokenizer = real
    return out, result


def rows(out) -> dict:
    """(file_path, segment) -> row dict, over every batch file of ``out``."""
    table = pa.concat_tables([pq.read_table(f) for f in sorted(Path(out).glob(BATCH_GLOB))])
    return {(r["file_path"], r["segment"]): r for r in table.to_pylist()}


def token_rows(out) -> dict:
    return {k: r["tokens"] for k, r in rows(out).items()}


def small_tokenizer(seed):
    from chatterbox_rt.checkpoint import init_dummy_conv_

    return init_dummy_conv_(S3Tokenizer(SMALL), seed).eval()


def single(tok, wav) -> list:
    tokens, lens = tok([torch.from_numpy(np.ascontiguousarray(wav))])
    return tokens[0, :int(lens[0])].tolist()


# ---------------------------------------------------------------------------------------------
# S3
# ---------------------------------------------------------------------------------------------
def test_package_exports():
    for name in ("encode", "EncodeResult", "analyze", "plot", "load_sequences", "TokenAnalysis", "ScaleStats",
                 "learn_rules", "apply_rules", "undo_rules", "evaluate", "MergeRules", "MergeReport"):
        assert name in tokens_pkg.__all__ and hasattr(tokens_pkg, name), name
    assert callable(tokens_pkg.encode) and callable(tokens_pkg.analyze)


def test_finds_audio_recursively_in_sorted_order(corpus):
    rels = [p.relative_to(corpus).as_posix() for p in find_audio_files(corpus)]
    assert rels == sorted(ENCODED + list(SKIPPED))  # .txt and hidden files left out
    with pytest.raises(EncodeError, match="does not exist"):
        find_audio_files(corpus / "nope")


def test_dummy_tokenizer_is_vcs(vc, tok):
    ours = tok.state_dict()
    theirs = {k[len("tokenizer."):]: v for k, v in vc.s3gen.state_dict().items() if k.startswith("tokenizer.")}
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_schema_tokens_and_metadata(whole, corpus, vc, tok):
    out, result = whole
    files = sorted(out.glob(BATCH_GLOB))
    assert [f.name for f in files] == ["tokens_batch_0000.parquet", "tokens_batch_0001.parquet"]
    for f in files:
        assert pq.read_schema(f).equals(S3_SCHEMA), pq.read_schema(f)
    got = rows(out)
    assert sorted(k[0] for k in got) == ENCODED and all(k[1] == 0 for k in got)
    for rel in ENCODED:
        r = got[(rel, 0)]
        wav16, _ = load_audio(corpus / rel, target_sr=S3_SR)
        expected = single(tok, wav16) if rel == "silent.wav" else vc.source_tokens(str(corpus / rel))[0].tolist()
        assert r["tokens"] == expected, rel
        assert r["n_tokens"] == len(expected) == math.ceil(len(wav16) // 160 / 4)
        assert r["offset_s"] == 0.0 and r["duration"] == pytest.approx(len(wav16) / S3_SR)
    assert result.files_encoded == len(ENCODED) and result.files_found == len(ENCODED) + len(SKIPPED)
    assert result.throughput > 0 and result.segments == len(ENCODED)
    meta = json.loads((out / METADATA_FILE).read_text())
    assert (meta["codec"], meta["vocab_size"], meta["checkpoint_hash"]) == ("s3", 6561, "dummy (seed 0)")
    assert meta["segment_length"] is None and meta["files_encoded"] == len(ENCODED)
    assert meta["total_duration_s"] == pytest.approx(sum(r["duration"] for r in got.values()))
    assert set(meta["files_skipped"]) == set(SKIPPED)
    for rel, why in SKIPPED.items():
        assert why in meta["files_skipped"][rel], meta["files_skipped"]
    flat = np.concatenate([r["tokens"] for r in got.values()])
    counts = np.bincount(flat)
    s3 = meta["scales"]["s3"]
    assert (s3["min"], s3["max"], s3["unique"], s3["n_tokens"]) == (flat.min(), flat.max(), len(set(flat)), len(flat))
    assert len(s3["most_common"]) == 20 and s3["most_common"][0][1] == counts.max()
    assert [c for _, c in s3["most_common"]] == sorted((c for _, c in s3["most_common"]), reverse=True)


def test_batch_size_does_not_change_tokens(whole, corpus, fast, tmp_path):
    out, _ = whole
    encode(corpus, tmp_path, dummy_weights=True, batch_size=1, device="cpu", progress=False)
    assert len(list(tmp_path.glob(BATCH_GLOB))) == len(ENCODED)  # a batch holds >= batch_size segments
    assert token_rows(tmp_path) == token_rows(out)


def test_segments_are_tokenised_alone(corpus, fast, tmp_path):
    result = encode(corpus, tmp_path, dummy_weights=True, segment_length=0.5, batch_size=4, device="cpu",
                    progress=False)
    got = rows(tmp_path)
    for rel in ENCODED:
        wav16, _ = load_audio(corpus / rel, target_sr=S3_SR)
        bounds = segment_bounds(len(wav16), S3_SR, 0.5)
        assert sorted(s for f, s in got if f == rel) == list(range(len(bounds))), rel
        for i, (start, n) in enumerate(bounds):
            r = got[(rel, i)]
            assert r["offset_s"] == pytest.approx(i * 0.5) and r["duration"] == pytest.approx(n / S3_SR)
            assert r["tokens"] == single(fast, wav16[start:start + n]), (rel, i)
    assert result.segments == len(got)
    assert json.loads((tmp_path / METADATA_FILE).read_text())["segment_length"] == 0.5


def test_segment_bounds():
    assert segment_bounds(16000, S3_SR, None) == [(0, 16000)]
    assert segment_bounds(16000, S3_SR, 0.5) == [(0, 8000), (8000, 8000)]
    assert segment_bounds(16000 + 639, S3_SR, 0.5) == [(0, 8000), (8000, 8639)]  # < 40 ms tail joins
    assert segment_bounds(16000 + 640, S3_SR, 0.5) == [(0, 8000), (8000, 8000), (16000, 640)]
    assert segment_bounds(300, S3_SR, 0.5) == [(0, 300)]
    with pytest.raises(EncodeError, match="segment length"):
        encode(DATA, DATA / "x", dummy_weights=True, segment_length=0.01)


def test_long_utterances_take_the_windowed_path():
    """Past the window, batched windows (batch_size at a time, across utterances) equal each
    utterance's own tokenizer call; a small tokenizer with a 3 s window keeps this cheap."""
    tok = small_tokenizer(5)
    rng = np.random.default_rng(1)
    wavs = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (int(7.3 * S3_SR), S3_SR, int(3.5 * S3_SR),
                                                                         2 * S3_SR, int(9.9 * S3_SR))]
    codec = S3Codec(tok, checkpoint="test", batch_size=2)
    got = codec.encode(wavs)
    for w, r in zip(wavs, got, strict=True):
        assert r["tokens"].tolist() == single(tok, w)
    assert len(got[0]["tokens"]) > 3 * SMALL.token_rate  # several windows were joined


def test_checkpoint_directory(corpus, tmp_path, monkeypatch):
    """--ckpt reads only the tokenizer.* tensors of the S3Gen file; the hash is the file's. (A small
    tokenizer stands in for the real one, so that the file is small.)"""
    from safetensors.torch import save_file

    import chatterbox_rt.models.s3tokenizer as s3t

    class Small(S3Tokenizer):
        def __init__(self, config=SMALL):
            super().__init__(config)

    monkeypatch.setattr(s3t, "S3Tokenizer", Small)
    tok = small_tokenizer(7)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    sd = {f"tokenizer.{k}": v for k, v in tok.state_dict().items()}
    sd["flow.unrelated"] = torch.zeros(3)
    save_file(sd, str(ckpt / "s3gen.safetensors"))
    out = tmp_path / "out"
    encode(corpus, out, ckpt=ckpt, device="cpu", progress=False)
    meta = json.loads((out / METADATA_FILE).read_text())
    assert meta["checkpoint_hash"] == hashlib.sha256((ckpt / "s3gen.safetensors").read_bytes()).hexdigest()
    assert meta["checkpoint_file"] == str(ckpt / "s3gen.safetensors")
    got = token_rows(out)
    assert sorted(rel for rel, _ in got) == ENCODED
    for (rel, _), t in got.items():
        wav16, _ = load_audio(corpus / rel, target_sr=S3_SR)
        assert t == single(tok, wav16), rel
    save_file({"tokenizer.encoder.conv1.weight": torch.zeros(1)}, str(ckpt / "s3gen.safetensors"))
    with pytest.raises(Exception, match="missing"):
        encode(corpus, tmp_path / "o2", ckpt=ckpt, device="cpu", progress=False, overwrite=True)
    with pytest.raises(Exception, match="no S3Gen checkpoint"):
        encode(corpus, tmp_path / "o3", ckpt=tmp_path, progress=False)


# ---------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------
def test_resume(whole, corpus, fast, tmp_path, monkeypatch):
    ref = token_rows(whole[0])
    out = tmp_path / "out"
    first = encode(corpus, out, dummy_weights=True, batch_size=2, device="cpu", progress=False)
    batches = sorted(out.glob(BATCH_GLOB))
    assert len(batches) == 3 and first.files_encoded == len(ENCODED)
    stamps = {b: b.stat().st_mtime_ns for b in batches}

    def no_load(*a, **k):
        raise AssertionError("nothing is left to encode: the tokenizer must not load")

    with monkeypatch.context() as m:
        m.setattr(ENC, "dummy_s3_tokenizer", no_load)
        again = encode(corpus, out, dummy_weights=True, batch_size=5, device="cpu", progress=False)
    assert (again.files_encoded, again.files_done_before, again.batches) == (0, len(ENCODED), [])
    assert {b: b.stat().st_mtime_ns for b in sorted(out.glob(BATCH_GLOB))} == stamps
    assert set(again.skipped) == set(SKIPPED)  # unreadable files are retried (and reported) every run

    lost = pq.read_table(batches[1], columns=["file_path"]).column("file_path").to_pylist()
    batches[1].unlink()
    redo = encode(corpus, out, dummy_weights=True, batch_size=2, device="cpu", progress=False)
    assert redo.files_encoded == len(set(lost)) and [b.name for b in redo.batches] == ["tokens_batch_0003.parquet"]
    assert pq.read_table(redo.batches[0], columns=["file_path"]).column("file_path").to_pylist() == lost
    assert token_rows(out) == ref
    progress = json.loads((out / PROGRESS_FILE).read_text())
    assert sorted(progress["batches"]) == ["tokens_batch_0000.parquet", "tokens_batch_0002.parquet",
                                           "tokens_batch_0003.parquet"]
    assert json.loads((out / METADATA_FILE).read_text())["files_encoded"] == len(ENCODED)


def test_interrupted_run_resumes(whole, corpus, fast, tmp_path, monkeypatch):
    out = tmp_path / "out"
    calls = {"n": 0}
    real = S3Codec.encode

    def crash_on_second(self, wavs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, wavs)

    monkeypatch.setattr(S3Codec, "encode", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        encode(corpus, out, dummy_weights=True, batch_size=2, device="cpu", progress=False)
    assert [b.name for b in out.glob(BATCH_GLOB)] == ["tokens_batch_0000.parquet"]
    assert not list(out.glob(".*.tmp")) and not (out / METADATA_FILE).exists()
    done = json.loads((out / PROGRESS_FILE).read_text())["batches"]["tokens_batch_0000.parquet"]
    monkeypatch.setattr(S3Codec, "encode", real)
    result = encode(corpus, out, dummy_weights=True, batch_size=2, device="cpu", progress=False)
    assert result.files_done_before == len(done) and result.files_encoded == len(ENCODED) - len(done)
    assert token_rows(out) == token_rows(whole[0])


def test_batch_written_but_not_recorded_is_adopted(corpus, fast, tmp_path):
    """A crash between a batch's rename and progress.json's update: the batch's files are not redone."""
    out = tmp_path / "out"
    encode(corpus, out, dummy_weights=True, batch_size=2, device="cpu", progress=False)
    progress = json.loads((out / PROGRESS_FILE).read_text())
    del progress["batches"]["tokens_batch_0002.parquet"]
    (out / PROGRESS_FILE).write_text(json.dumps(progress))
    (out / ".tokens_batch_0003.parquet.tmp").write_bytes(b"half a file")
    result = encode(corpus, out, dummy_weights=True, batch_size=2, device="cpu", progress=False)
    assert result.files_encoded == 0 and not list(out.glob(".*.tmp"))
    assert "tokens_batch_0002.parquet" in json.loads((out / PROGRESS_FILE).read_text())["batches"]


def test_other_settings_are_refused(corpus, fast, tmp_path):
    out = tmp_path / "out"
    encode(corpus, out, dummy_weights=True, device="cpu", progress=False, max_files=2)
    for kw, what in (({"segment_length": 1.0}, "1 s segments"), ({"seed": 1}, "dummy (seed 1)")):
        with pytest.raises(EncodeError, match="--overwrite") as e:
            encode(corpus, out, dummy_weights=True, device="cpu", progress=False, max_files=2, **kw)
        assert what in str(e.value) and "dummy (seed 0)" in str(e.value)
    result = encode(corpus, out, dummy_weights=True, device="cpu", progress=False, max_files=2, segment_length=1.0,
                    overwrite=True)
    assert result.files_encoded == 2 and result.files_done_before == 0
    assert json.loads((out / METADATA_FILE).read_text())["segment_length"] == 1.0
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "tokens_batch_0000.parquet").write_bytes(b"x")
    with pytest.raises(EncodeError, match="no progress.json"):
        encode(corpus, stray, dummy_weights=True, device="cpu", progress=False)


def test_model_choice_errors(corpus, tmp_path):
    with pytest.raises(EncodeError, match="--ckpt DIR"):
        encode(corpus, tmp_path, progress=False)
    with pytest.raises(EncodeError, match="not both"):
        encode(corpus, tmp_path, ckpt=tmp_path, dummy_weights=True, progress=False)
    with pytest.raises(EncodeError, match="unknown codec"):
        encode(corpus, tmp_path, codec="mimi", progress=False)
    with pytest.raises(EncodeError, match="batch_size"):
        encode(corpus, tmp_path, dummy_weights=True, batch_size=0, progress=False)


# ---------------------------------------------------------------------------------------------
# SNAC
# ---------------------------------------------------------------------------------------------
SNAC_CONFIG = {"sampling_rate": 24000, "encoder_dim": 16, "encoder_rates": [2, 3], "decoder_dim": 64,
               "decoder_rates": [3, 2], "attn_window_size": 4, "codebook_size": 256, "codebook_dim": 4,
               "vq_strides": [4, 2, 1]}


@pytest.fixture(scope="module")
def snac_ckpt(tmp_path_factory):
    snac = pytest.importorskip("snac")
    torch.manual_seed(0)
    model = snac.SNAC(**SNAC_CONFIG).eval()
    d = tmp_path_factory.mktemp("snac")
    (d / "config.json").write_text(json.dumps(SNAC_CONFIG))
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    return d, model


def test_snac_codes_equal_model_encode(corpus, snac_ckpt, tmp_path, fast):
    d, model = snac_ckpt
    out = tmp_path / "out"
    result = encode(corpus, out, codec="snac", snac_checkpoint=d, segment_length=0.5, batch_size=4, device="cpu",
                    progress=False)
    encoded = ENCODED + ["tiny.wav"]  # 100 samples: too short for the S3 tokenizer's STFT, not for SNAC
    assert result.files_encoded == len(encoded)
    got = rows(out)
    schema = pq.read_schema(sorted(out.glob(BATCH_GLOB))[0])
    for k in range(3):
        assert schema.field(f"tokens_scale_{k}").type == pa.list_(pa.int16())
        assert schema.field(f"n_tokens_scale_{k}").type == pa.int32()
        assert schema.field(f"shape_scale_{k}").type == pa.list_(pa.int32())
    assert "tokens" not in schema.names
    for rel in encoded:
        wav24, _ = load_audio(corpus / rel, target_sr=24000)
        for i, (start, n) in enumerate(segment_bounds(len(wav24), 24000, 0.5)):
            r = got[(rel, i)]
            assert r["offset_s"] == pytest.approx(start / 24000) and r["duration"] == pytest.approx(n / 24000)
            with torch.inference_mode():
                codes = model.encode(torch.from_numpy(wav24[start:start + n])[None, None])
            for k, c in enumerate(codes):
                assert r[f"tokens_scale_{k}"] == c[0].tolist(), (rel, i, k)
                assert r[f"n_tokens_scale_{k}"] == c.shape[1] and r[f"shape_scale_{k}"] == list(c.shape)
    meta = json.loads((out / METADATA_FILE).read_text())
    assert (meta["codec"], meta["vocab_size"], meta["sample_rate"]) == ("snac", 256, 24000)
    assert meta["checkpoint_hash"] == hashlib.sha256((d / "pytorch_model.bin").read_bytes()).hexdigest()
    assert sorted(meta["scales"]) == ["scale_0", "scale_1", "scale_2"]
    # the analysis reads it
    from chatterbox_rt.tokens import load_sequences

    seqs = load_sequences(out)
    assert sorted(seqs) == ["scale_0", "scale_1", "scale_2"] and len(seqs["scale_0"]) == len(got)
    # S3 into a SNAC dataset: refused
    with pytest.raises(EncodeError, match="codec snac"):
        encode(corpus, out, dummy_weights=True, device="cpu", progress=False)


def test_snac_missing_pieces(corpus, snac_ckpt, tmp_path, monkeypatch, capsys):
    with pytest.raises(EncodeError, match="--snac-checkpoint DIR.*config.json and pytorch_model.bin"):
        encode(corpus, tmp_path / "o", codec="snac", progress=False)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text(json.dumps(SNAC_CONFIG))
    with pytest.raises(EncodeError, match="has no pytorch_model.bin"):
        encode(corpus, tmp_path / "o", codec="snac", snac_checkpoint=tmp_path / "half", progress=False)
    monkeypatch.setitem(sys.modules, "snac", None)  # the package is not installed
    with pytest.raises(ImportError, match="pip install snac"):
        encode(corpus, tmp_path / "o", codec="snac", snac_checkpoint=snac_ckpt[0], progress=False)
    rc = main(["tokens", "encode", str(corpus), "--out", str(tmp_path / "o"), "--codec", "snac"])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip().splitlines()[-1].startswith("chatterbox-rt: error: --codec snac needs "
                                                                "--snac-checkpoint")


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def test_cli_encode_analyze_bpe(corpus, fast, tmp_path, capsys):
    out = tmp_path / "tokens"
    rc = main(["tokens", "encode", str(corpus), "--out", str(out), "--dummy-weights", "--device", "cpu",
               "--segment-length", "1", "--batch-size", "4", "--max-files", "7"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "encoded 5 file(s)" in captured.out and "skipped bad.wav: cannot read" in captured.err
    assert "Traceback" not in captured.err
    rc = main(["tokens", "analyze", str(out), "--json", str(tmp_path / "a.json"), "--plot", str(tmp_path / "plots")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "s3" in captured.out and json.loads((tmp_path / "a.json").read_text())
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["s3_rank_frequency.png", "s3_run_lengths.png"]
    rules = tmp_path / "rules.json"
    rc = main(["tokens", "bpe", str(out), "--method", "rl-bpe", "--merges", "20", "--min-freq", "2", "--save",
               str(rules)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert str(rules) in captured.out and json.loads(rules.read_text())["method"] == "rl-bpe"


@pytest.mark.parametrize("argv, match", [
    (["--out", "{tmp}/o"], "no model: give --ckpt DIR"),
    (["--out", "{tmp}/o", "--dummy-weights", "--snac-checkpoint", "{tmp}"],
     "--snac-checkpoint applies to --codec snac"),
    (["--out", "{tmp}/o", "--ckpt", "{tmp}/none"], "checkpoint directory not found"),
    (["--out", "{tmp}/o", "--dummy-weights", "--device", "cuda:7"], "--device 'cuda:7'"),
    (["--out", "{tmp}/o", "--dummy-weights", "--batch-size", "0"], "--batch-size must be an integer >= 1"),
    (["--out", "{tmp}/o", "--dummy-weights", "--segment-length", "0"], "--segment-length must be at least 0.04 s"),
])
def test_cli_errors_are_one_line(argv, match, corpus, fast, tmp_path, capsys):
    rc = main(["tokens", "encode", str(corpus)] + [a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and "Traceback" not in err
    assert lines[-1].startswith("chatterbox-rt: error: ") and match in lines[-1], err


def test_cli_missing_dataset_is_one_line(tmp_path, capsys):
    for argv in (["analyze", str(tmp_path / "none")], ["bpe", str(tmp_path), "--method", "rl", "--save",
                                                       str(tmp_path / "r.json")]):
        rc = main(["tokens", *argv])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("chatterbox-rt: error: ") and len(err.strip().splitlines()) == 1, err
