"""chatterbox_rt.tokens.analyze: exact statistics on hand-made token streams, parquet loading, plots.

The vectorised n-gram counting is compared with a pure-Python Counter over every window.
"""
import collections
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chatterbox_rt.tokens.analyze import (
    GOOD_GINI, GOOD_SPARSITY, POOR_GINI, POOR_SPARSITY, _flatten, _ngram_counts_flat, _top_share, analyze,
    gini, load_sequences, ngram_counts, plot, recommend, scale_stats,
)

# Vocabularies: tiny (many repeats), odd sizes, and the codecs' own.
VOCABS = (2, 3, 7, 4096, 6561)


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
@pytest.mark.parametrize("path", ["fast", "staged"])
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
    for _ in range(20):
        counts = rng.integers(1, 6, int(rng.integers(1, 40)))
        for k in (1, 3, 10, 100):
            assert _top_share(counts, k, 1000) == pytest.approx(np.sort(counts)[::-1][:k].sum() / 1000)


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
