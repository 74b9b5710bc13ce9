"""chatterbox_rt.tokens.analyze: exact statistics on hand-made token streams, parquet loading, plots.

The n-gram counters (numpy's two paths and the C++ one, csrc/cpu/ngram_counts.cpp) are compared
with a pure-Python Counter over every window, and the whole analysis from the C++ kernels with the
numpy path's, value for value.
"""
import collections
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chatterbox_rt.kernels import _native, dispatch
from chatterbox_rt.tokens.analyze import (
    GOOD_GINI, GOOD_SPARSITY, POOR_GINI, POOR_SPARSITY, _flatten, _ngram_counts_flat, _ngram_summary, _top_share,
    analyze, gini, load_sequences, ngram_counts, plot, recommend, scale_stats,
)

# Vocabularies: tiny (many repeats), odd sizes, and the codecs' own.
VOCABS = (2, 3, 7, 4096, 6561)
HAS_CPP = _native.ngram_counts_available()
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="the native extension (chatterbox_rt._C) is not built")
PATHS = ["fast", "staged", pytest.param("cpp", marks=needs_cpp)]


def write_dataset(out_dir, rows, codec="s3", batch_rows=2, vocab_size=None):
    """The encoder's layout: rows = list of token arrays (s3) or of per-scale lists (snac)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for b, first in enumerate(range(0, len(rows), batch_rows)):
        chunk = rows[first:first + batch_rows]
        cols = {"file_path": pa.array([f"clip{first + i // 2}.wav" for i in range(len(chunk))]),
                "segment": pa.array([i % 2 for i in range(len(chunk))], pa.int32()),
                "offset_s": pa.array([0.0] * len(chunk), pa.float64()),
                "duration": pa.array([1.0] * len(chunk), pa.float64())}
        if codec == "s3":
            cols["tokens"] = pa.array([np.asarray(r).tolist() for r in chunk], pa.list_(pa.int16()))
            cols["n_tokens"] = pa.array([len(r) for r in chunk], pa.int32())
        else:
            for k in range(len(chunk[0])):
                cols[f"tokens_scale_{k}"] = pa.array([np.asarray(r[k]).tolist() for r in chunk], pa.list_(pa.int16()))
                cols[f"n_tokens_scale_{k}"] = pa.array([len(r[k]) for r in chunk], pa.int32())
                cols[f"shape_scale_{k}"] = pa.array([[1, len(r[k])] for r in chunk], pa.list_(pa.int32()))
        pq.write_table(pa.table(cols), out_dir / f"tokens_batch_{b:04d}.parquet")
    meta = {"codec": codec}
    if vocab_size:
        meta["vocab_size"] = vocab_size
    (out_dir / "metadata.json").write_text(json.dumps(meta))
    return out_dir


def counter_ngrams(seqs, n):
    return collections.Counter(tuple(s[i:i + n].tolist()) for s in seqs for i in range(len(s) - n + 1))


# ---------------------------------------------------------------------------------------------
# n-gram counting against the Counter oracle
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("vocab", VOCABS)
def test_ngram_counts_match_counter(vocab, path):
    rng = np.random.default_rng(vocab)
    for trial in range(6):
        alphabet = min(vocab, int(rng.integers(1, 6)))
        seqs = [rng.integers(0, alphabet, int(rng.integers(0, 15))) for _ in range(int(rng.integers(1, 25)))]
        seqs.append(np.zeros(9, np.int64))  # one long run
        tok, lengths = _flatten(seqs, vocab)
        for max_n in (1, 2, 3, 5, 7):
            got = _ngram_counts_flat(tok, lengths, vocab, max_n, path)
            assert sorted(got) == list(range(1, max_n + 1))
            for n in range(1, max_n + 1):
                want = sorted(counter_ngrams(seqs, n).values(), reverse=True)
                assert sorted(got[n].tolist(), reverse=True) == want, f"vocab {vocab} n={n} trial {trial}"


def test_staged_path_beyond_seven():
    rng = np.random.default_rng(3)
    seqs = [rng.integers(0, 3, int(rng.integers(0, 20))) for _ in range(30)]
    got = ngram_counts(seqs, 6561, max_n=10)  # max_n > 7 takes the staged path
    for n in (8, 9, 10):
        assert got[n].tolist() == sorted(counter_ngrams(seqs, n).values(), reverse=True)


def test_ngrams_never_cross_rows():
    got = ngram_counts([np.array([0, 1]), np.array([2, 3]), np.array([], np.int64), np.array([4])], 10, max_n=3)
    assert got[1].tolist() == [1] * 5
    assert got[2].tolist() == [1, 1]  # (0, 1), (2, 3); not (1, 2) nor (3, 4)
    assert got[3].size == 0


def test_top_share_matches_sorting():
    rng = np.random.default_rng(0)
    for trial in range(300):
        counts = rng.integers(1, int(rng.integers(2, 40)), int(rng.integers(1, 300)))
        if trial % 4 == 0:
            counts[:] = counts[0]  # all tied: the histogram branch
        for k in (1, 3, 10, 100):
            want = float(np.sort(counts)[::-1][:k].sum() / 1000)
            assert _top_share(counts, k, 1000) == want
            # the same with the 1s apart, as the C++ counter reports them
            assert _top_share(counts[counts >= 2], k, 1000, int(np.count_nonzero(counts == 1))) == want


def _random_sources(seed):
    """Awkward token streams: empty input, empty rows, rows shorter than 7, one row, long runs."""
    rng = np.random.default_rng(seed)
    yield 6561, [np.zeros(0, np.int16)]
    yield 6561, [np.array([5], np.int16)]
    yield 6561, [np.array([1, 2, 3], np.int16), np.zeros(0, np.int16), np.array([4, 4], np.int16)]
    yield 2, [rng.integers(0, 2, 400)]  # one row
    yield 4096, [rng.integers(0, 4096, int(rng.integers(0, 9))) for _ in range(40)]  # mostly shorter than 7
    for vocab in (2, 3, 4096, 6561):
        alphabet = min(vocab, int(rng.integers(2, 7)))
        codes = rng.choice(vocab, alphabet, replace=False)
        rows = [np.repeat(codes[rng.integers(0, alphabet, 60)], rng.geometric(0.6, 60))[:int(rng.integers(0, 90))]
                for _ in range(int(rng.integers(1, 30)))]
        yield vocab, [r.astype(np.int16) for r in rows]


@needs_cpp
@pytest.mark.parametrize("seed", [0, 1])
def test_cpp_and_numpy_analyses_are_identical(seed):
    for vocab, rows in _random_sources(seed):
        want = analyze({"s3": rows}, vocab_size=vocab, ngram_path="numpy").to_dict(arrays=True)
        got = analyze({"s3": rows}, vocab_size=vocab, ngram_path="cpp").to_dict(arrays=True)
        assert got == want, f"vocab {vocab}"
        tok, lengths = _flatten(rows, vocab)
        for n, (big, once) in _ngram_summary(tok, lengths, vocab, 7, "cpp").items():
            ref = _ngram_counts_flat(tok, lengths, vocab, 7, "numpy")[n]
            assert big.tolist() == ref[ref >= 2].tolist() and once == int(np.count_nonzero(ref == 1))


@needs_cpp
def test_cpp_path_uses_all_95_bits_of_context():
    # 19-bit tokens, max_n 6: each window carries 5 x 19 = 95 bits of preceding tokens
    vocab = 2 ** 19 - 1
    rng = np.random.default_rng(7)
    codes = np.array([0, 1, vocab - 1, vocab - 2])
    rows = [codes[rng.integers(0, 4, int(rng.integers(0, 30)))] for _ in range(30)]
    want = analyze({"s3": rows}, vocab_size=vocab, max_n=6, ngram_path="numpy").to_dict(arrays=True)
    assert analyze({"s3": rows}, vocab_size=vocab, max_n=6, ngram_path="cpp").to_dict(arrays=True) == want
    for n in range(1, 7):
        assert want["scales"]["s3"]["ngram_unique"][str(n)] == len(counter_ngrams(rows, n))


@needs_cpp
def test_token_dtypes_give_the_same_analysis():
    rng = np.random.default_rng(4)
    rows = [rng.integers(0, 120, int(rng.integers(0, 40))) for _ in range(20)]
    want = analyze({"s3": rows}, vocab_size=120, ngram_path="numpy").to_dict(arrays=True)
    for dtype in (np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64):
        for path in ("cpp", "numpy"):
            got = analyze({"s3": [r.astype(dtype) for r in rows]}, vocab_size=120, ngram_path=path)
            assert got.to_dict(arrays=True) == want, (dtype, path)


def test_backend_choice(monkeypatch):
    rows = [np.array([1, 2, 1, 2, 1])]
    monkeypatch.setenv(dispatch.ENV_VAR, "native")  # plain torch elsewhere: numpy here
    monkeypatch.setattr(_native, "ngram_counts", lambda *a, **k: pytest.fail("the C++ counter ran"))
    assert analyze({"s3": rows}, vocab_size=8).scales["s3"].ngram_unique[2] == 2
    monkeypatch.setenv(dispatch.ENV_VAR, "cpp")
    monkeypatch.setattr(_native, "ngram_counts_available", lambda: False)
    with pytest.raises(dispatch.KernelUnavailable, match="ngram_counts"):
        analyze({"s3": rows}, vocab_size=8)
    monkeypatch.delenv(dispatch.ENV_VAR)  # auto: numpy when the extension is missing
    assert analyze({"s3": rows}, vocab_size=8).scales["s3"].ngram_unique[2] == 2


def test_paths_that_cannot_run_raise():
    tok, lengths = _flatten([np.array([1, 2, 3])], 6561)
    with pytest.raises(ValueError, match="path must be one of"):
        _ngram_counts_flat(tok, lengths, 6561, 3, "radix")
    with pytest.raises(ValueError, match="95 bits"):
        _ngram_summary(tok, lengths, 6561, 9, "cpp")  # 8 x 13 = 104 bits of context


# ---------------------------------------------------------------------------------------------
# Statistics on hand-made inputs
# ---------------------------------------------------------------------------------------------
def test_gini_uniform_and_one_hot():
    assert gini(np.full(100, 7)) == pytest.approx(0.0, abs=1e-12)
    assert gini(np.eye(1, 100)[0] * 50) == pytest.approx(1 - 1 / 100)
    assert gini(np.zeros(5)) == 0.0
    # Over the whole codebook: a single used code of 10 is the one-hot case.
    s = scale_stats("s3", [np.full(20, 4)], vocab_size=10)
    assert s.gini == pytest.approx(0.9) and s.gini_used == pytest.approx(0.0)


def test_runs_and_repetition():
    s = scale_stats("s3", [np.array([1, 1, 1, 2, 2, 3]), np.array([3, 3])], vocab_size=8)
    # Runs 3, 2, 1 | 2: the row boundary splits the 3s.
    assert s.max_run_length == 3 and s.mean_run_length == pytest.approx(2.0)
    assert s.run_length_hist.tolist() == [0, 1, 2, 1]
    assert s.repetition_rate == pytest.approx(4 / 6)  # 4 repeats among 6 positions with a predecessor
    assert (s.n_tokens, s.n_sequences, s.unique) == (8, 2, 3)


def test_bigram_diversity_sparsity_and_coverage():
    s = scale_stats("s3", [np.array([0, 1, 0, 1, 0])], vocab_size=4)
    assert s.unique_bigrams == 2 and s.bigram_diversity == pytest.approx(0.5)  # (0,1), (1,0) of 4 bigrams
    assert s.transition_sparsity == pytest.approx(0.5)  # 2 of the 2 x 2 transitions are zero
    assert s.ngram_diversity[3] == pytest.approx(2 / 3) and s.ngram_top10_coverage[3] == pytest.approx(1.0)
    assert s.ngram_diversity[6] == 0.0  # no 6-gram in 5 tokens
    assert s.top_k_coverage == {10: 1.0, 100: 1.0, 1000: 1.0}
    assert s.rank_frequency.tolist() == [3, 2]

    s = scale_stats("s3", [np.arange(20) % 12], vocab_size=12)
    assert s.top_k_coverage[10] == pytest.approx(18 / 20)  # codes 0..7 twice, then two of 8..11 once


def test_recommendation_thresholds():
    assert recommend(GOOD_GINI + 0.01, GOOD_SPARSITY + 0.01) == "good"
    assert recommend(GOOD_GINI, GOOD_SPARSITY + 0.01) == "moderate"  # strict inequalities
    assert recommend(GOOD_GINI + 0.01, GOOD_SPARSITY) == "moderate"
    assert recommend(POOR_GINI - 0.01, POOR_SPARSITY - 0.01) == "poor"
    assert recommend(POOR_GINI - 0.01, 0.9) == "moderate"
    assert recommend(0.7, 0.7) == "moderate"


def test_overall_recommendation_is_best_scale():
    rng = np.random.default_rng(0)
    # 40 of 4096 codes in a fixed cycle: gini 1 - 40/4096, 40 of the 40 x 40 transitions used.
    skewed = [np.tile(np.arange(40), 10)]
    uniform = [rng.permutation(np.repeat(np.arange(8), 40))]
    a = analyze({"scale_0": uniform, "scale_1": skewed}, vocab_size=4096)
    assert a.scales["scale_1"].transition_sparsity == pytest.approx(1 - 40 / 1600)
    assert a.codec == "snac"
    assert a.scales["scale_1"].recommendation == "good"
    assert a.recommendation == "good"
    a = analyze({"s3": uniform}, vocab_size=8)
    assert a.recommendation == a.scales["s3"].recommendation == "poor"


def test_out_of_range_tokens_and_bad_arguments():
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        analyze({"s3": [np.array([1, 10])]}, vocab_size=10)
    with pytest.raises(ValueError, match="negative|\\[0"):
        analyze({"s3": [np.array([-1, 2])]}, vocab_size=10)
    with pytest.raises(ValueError, match="codec"):
        analyze({"s3": [np.array([1])]}, codec="wav2vec")
    with pytest.raises(ValueError, match="scale names"):
        analyze({"foo": [np.array([1])]})


# ---------------------------------------------------------------------------------------------
# Datasets on disk
# ---------------------------------------------------------------------------------------------
def test_load_s3_layout_keeps_row_order(tmp_path):
    rows = [np.array([1, 2, 3]), np.array([], np.int16), np.array([6560]), np.array([5, 5]), np.array([7])]
    d = write_dataset(tmp_path / "s3", rows, batch_rows=2)
    seqs = load_sequences(d)
    assert list(seqs) == ["s3"]
    assert [s.tolist() for s in seqs["s3"]] == [r.tolist() for r in rows]
    a = analyze(d)
    assert a.codec == "s3" and a.scales["s3"].vocab_size == 6561 and a.scales["s3"].n_tokens == 7


def test_load_snac_layout(tmp_path):
    rng = np.random.default_rng(1)
    rows = [[rng.integers(0, 4096, n), rng.integers(0, 4096, 2 * n), rng.integers(0, 4096, 4 * n)] for n in (3, 1, 5)]
    d = write_dataset(tmp_path / "snac", rows, codec="snac", vocab_size=4096)
    seqs = load_sequences(d)
    assert list(seqs) == ["scale_0", "scale_1", "scale_2"]
    for k in range(3):
        assert [s.tolist() for s in seqs[f"scale_{k}"]] == [r[k].tolist() for r in rows]
    a = analyze(d)
    assert a.codec == "snac" and a.scales["scale_2"].n_tokens == 36 and a.scales["scale_0"].vocab_size == 4096


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_sequences(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "empty")):
        load_sequences(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(pa.table({"codes": pa.array([[1, 2]], pa.list_(pa.int16()))}), bad / "tokens_batch_0000.parquet")
    with pytest.raises(ValueError, match="neither the S3 layout"):
        load_sequences(bad)


def test_json_table_and_plots(tmp_path):
    rng = np.random.default_rng(2)
    a = analyze({"s3": [rng.integers(0, 30, 200) for _ in range(5)]}, vocab_size=6561)
    d = json.loads(a.to_json(tmp_path / "stats.json"))
    assert json.loads((tmp_path / "stats.json").read_text()) == d
    s = d["scales"]["s3"]
    assert s["n_tokens"] == 1000 and set(s["ngram_diversity"]) == {str(n) for n in range(1, 8)}
    assert "rank_frequency" not in s and "rank_frequency" in a.to_dict(arrays=True)["scales"]["s3"]
    table = a.format_table()
    assert "| metric" in table and "transition sparsity" in table and a.recommendation in table
    paths = plot(a, tmp_path / "plots")
    assert sorted(p.name for p in paths) == ["s3_rank_frequency.png", "s3_run_lengths.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_warns_when_the_corpus_is_too_small_for_the_vocabulary():
    from chatterbox_rt.tokens.analyze import MIN_TOKENS_PER_CODE, analyze as run

    rng = np.random.default_rng(0)
    small = run({"s3": [rng.integers(0, 50, 400)]}, vocab_size=50)  # 8 tokens per code
    big = run({"s3": [rng.integers(0, 50, 50 * MIN_TOKENS_PER_CODE)]}, vocab_size=50)
    assert "needs a larger corpus" in small.format_table()
    assert "needs a larger corpus" not in big.format_table()
