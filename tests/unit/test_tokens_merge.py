"""chatterbox_rt.tokens.merge: known compressions on crafted rows, exact round trips on unseen input,
BPE against a plain-Python reference learner, rules files, evaluation, and input errors.
"""
import collections
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chatterbox_rt.tokens.merge import (
    METHODS, MergeReport, MergeRules, ScaleCode, apply_rules, evaluate, learn_rules, undo_rules,
)

V = 64  # a small base vocabulary keeps the crafted inputs readable
SNAC_V = 4096


def assert_rows_equal(got, want):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert np.array_equal(np.asarray(g), np.asarray(w)), f"row {i}: {np.asarray(g)[:20]} != {np.asarray(w)[:20]}"


def runny_rows(rng, n_rows, alphabet, vocab=V):
    """Rows of repeated tokens (so rl and bpe find something to learn), some empty."""
    rows = []
    for _ in range(n_rows):
        k = int(rng.integers(0, 40))
        rows.append(np.repeat(rng.integers(0, alphabet, k), rng.geometric(0.4, k)).astype(np.int64) % vocab)
    return rows


def snac_rows(rng, n_rows, alphabet=3, ragged=True):
    out = {"scale_0": [], "scale_1": [], "scale_2": []}
    for _ in range(n_rows):
        n = int(rng.integers(0, 12))
        extra = rng.integers(0, 3, 3) if ragged else np.zeros(3, int)  # lengths that don't align exactly
        for k in range(3):
            out[f"scale_{k}"].append(rng.integers(0, alphabet, n * 2 ** k + int(extra[k])))
    return out


def reference_bpe(rows, base, merges, min_freq):
    """Textbook BPE: recount every pair, merge the most frequent (ties: smallest ids) left to right."""
    rows = [list(map(int, r)) for r in rows]
    learned = []
    for j in range(merges):
        counts = collections.Counter(p for r in rows for p in zip(r[:-1], r[1:]))
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        if counts[best] < min_freq:
            break
        z = base + j
        for i, r in enumerate(rows):
            out, t = [], 0
            while t < len(r):
                if t + 1 < len(r) and (r[t], r[t + 1]) == best:
                    out.append(z)
                    t += 2
                else:
                    out.append(r[t])
                    t += 1
            rows[i] = out
        learned.append(best)
    return learned, rows


# ---------------------------------------------------------------------------------------------
# Known behaviour on crafted rows
# ---------------------------------------------------------------------------------------------
def test_rl_compresses_crafted_rows_by_known_ratio():
    rows = [np.array([5, 5, 5, 5, 1, 5, 5, 5, 5, 2]), np.array([3, 3, 5, 5, 5, 5])]
    rules = learn_rules(rows, "rl", vocab_size=V, min_freq=2)
    assert rules.runs.tolist() == [[5, 4]]  # (3, 2) occurs once: below min_freq
    enc = apply_rules(rules, rows)
    assert [e.tolist() for e in enc] == [[V, 1, V, 2], [3, 3, V]]
    assert sum(map(len, rows)) / sum(map(len, enc)) == pytest.approx(16 / 7)
    # Longer runs are cut greedily into learned lengths; the rest stays plain.
    assert apply_rules(rules, np.full(9, 5)).tolist() == [V, V, 5]


def test_rl_greedy_uses_longest_learned_length_first():
    rules = MergeRules("rl", V, runs=[[7, 2], [7, 5]])
    assert apply_rules(rules, np.full(13, 7)).tolist() == [V + 1, V + 1, V, 7]  # 5 + 5 + 2 + 1
    assert undo_rules(rules, np.array([V + 1, V, 7])).tolist() == [7] * 8


def test_bpe_merges_most_frequent_pair_first():
    rows = [np.array([0, 1, 0, 1, 2, 3]), np.array([0, 1, 2, 3, 9])]
    rules = learn_rules(rows, "bpe", vocab_size=V, merges=2, min_freq=2)
    assert rules.pairs.tolist() == [[0, 1], [2, 3]]  # (0, 1) x3 before (2, 3) x2
    assert [e.tolist() for e in apply_rules(rules, rows)] == [[V, V, V + 1], [V, V + 1, 9]]


def test_bpe_repeated_token_pairs_do_not_overlap():
    rules = learn_rules([np.full(8, 7)], "bpe", vocab_size=V, merges=2, min_freq=2)  # 7 x8 -> z x4 -> zz x2
    assert rules.pairs.tolist() == [[7, 7], [V, V]]
    assert apply_rules(rules, np.full(5, 7)).tolist() == [V + 1, 7]
    assert apply_rules(rules, np.full(3, 7)).tolist() == [V, 7]


def test_bpe_stops_below_min_freq():
    rules = learn_rules([np.array([1, 2, 3, 4, 1, 2])], "bpe", vocab_size=V, merges=100, min_freq=2)
    assert rules.pairs.tolist() == [[1, 2]]


def test_bpe_pairs_never_span_rows():
    rules = learn_rules([np.array([1]), np.array([2]), np.array([1]), np.array([2])], "bpe", vocab_size=V, min_freq=1)
    assert rules.n_rules == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bpe_matches_reference_learner(seed):
    rng = np.random.default_rng(seed)
    rows = runny_rows(rng, 30, alphabet=6)
    rules = learn_rules(rows, "bpe", vocab_size=V, merges=40, min_freq=2)
    want_pairs, want_rows = reference_bpe(rows, V, 40, 2)
    assert [tuple(p) for p in rules.pairs.tolist()] == want_pairs
    assert [e.tolist() for e in apply_rules(rules, rows)] == want_rows


def test_rl_bpe_builds_on_rl_symbols():
    rows = [np.array([4, 4, 4, 9, 4, 4, 4, 9, 4, 4, 4, 9])]
    rules = learn_rules(rows, "rl-bpe", vocab_size=V, merges=10, min_freq=2)
    assert rules.runs.tolist() == [[4, 3]] and rules.pairs[0].tolist() == [V, 9]
    assert rules.new_vocab_size == V + 1 + len(rules.pairs)
    enc = apply_rules(rules, rows)
    assert len(enc[0]) < 4
    assert_rows_equal(undo_rules(rules, enc), rows)


def test_cross_scale_tuples_and_known_ratio():
    frame = ([1], [2, 3], [4, 5, 6, 7])
    other = ([8], [9, 9], [9, 9, 9, 9])
    rows = {f"scale_{k}": [np.array(frame[k] * 3 + other[k]), np.array(frame[k])] for k in range(3)}
    rows["scale_2"][1] = np.array(frame[2] + [11])  # a tail token past the last whole frame
    rules = learn_rules(rows, "cross-scale", vocab_size=SNAC_V, merges=10, min_freq=2)
    assert rules.tuples.tolist() == [[1, 2, 3, 4, 5, 6, 7]]
    enc = apply_rules(rules, rows)
    assert isinstance(enc[0], ScaleCode)
    assert enc[0].symbols.tolist() == [SNAC_V] * 3 + [8, 9, 9, 9, 9, 9, 9]  # unseen frame: raw tokens
    assert enc[1].symbols.tolist() == [SNAC_V] and [t.tolist() for t in enc[1].tails] == [[], [], [11]]
    assert sum(map(len, enc)) == 10 + 2 and (28 + 8) / 12 == pytest.approx(3.0)
    back = undo_rules(rules, enc)
    for k in range(3):
        assert_rows_equal(back[f"scale_{k}"], rows[f"scale_{k}"])


# ---------------------------------------------------------------------------------------------
# Exact round trips on input the rules never saw
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["rl", "bpe", "rl-bpe"])
@pytest.mark.parametrize("seed", [0, 1])
def test_round_trip_unseen_1d(method, seed):
    rng = np.random.default_rng(seed)
    rules = learn_rules(runny_rows(rng, 40, alphabet=5), method, vocab_size=V, merges=60, min_freq=2)
    assert rules.n_rules > 0
    unseen = runny_rows(rng, 30, alphabet=V) + [rng.integers(0, V, 300), np.zeros(0, np.int64),
                                                 np.full(1000, 3), np.array([V - 1])]
    enc = apply_rules(rules, unseen)
    assert all(e.max(initial=0) < rules.new_vocab_size for e in enc)
    assert_rows_equal(undo_rules(rules, enc), unseen)
    one = unseen[0]
    assert np.array_equal(undo_rules(rules, apply_rules(rules, one)), one)  # a single row in, a single row out


@pytest.mark.parametrize("seed", [0, 1])
def test_round_trip_unseen_cross_scale(seed):
    rng = np.random.default_rng(seed)
    rules = learn_rules(snac_rows(rng, 40, alphabet=2, ragged=False), "cross-scale", vocab_size=SNAC_V,
                        merges=30, min_freq=2)
    assert rules.n_rules > 0
    unseen = snac_rows(rng, 30, alphabet=SNAC_V)
    for data in (unseen, snac_rows(rng, 30, alphabet=2)):
        back = undo_rules(rules, apply_rules(rules, data))
        for s in data:
            assert_rows_equal(back[s], data[s])
    row = {s: unseen[s][1] for s in unseen}
    back = undo_rules(rules, apply_rules(rules, row))
    assert all(np.array_equal(back[s], row[s]) for s in row)


# ---------------------------------------------------------------------------------------------
# Rules files
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip(method, tmp_path):
    rng = np.random.default_rng(5)
    data = snac_rows(rng, 20, alphabet=2, ragged=False) if method == "cross-scale" else runny_rows(rng, 20, 4)
    rules = learn_rules(data, method, vocab_size=SNAC_V if method == "cross-scale" else V, merges=20)
    loaded = MergeRules.load(rules.save(tmp_path / "rules.json"))
    assert loaded.method == method and loaded.vocab_size == rules.vocab_size and loaded.scales == rules.scales
    for name in ("runs", "pairs", "tuples"):
        assert np.array_equal(getattr(loaded, name), getattr(rules, name))
    if method != "cross-scale":
        assert_rows_equal(apply_rules(loaded, data), apply_rules(rules, data))


def test_load_rejects_bad_files(tmp_path):
    p = tmp_path / "r.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        MergeRules.load(p)
    p.write_text(json.dumps({"method": "bpe"}))
    with pytest.raises(ValueError, match="not a merge-rules file"):
        MergeRules.load(p)
    good = MergeRules("bpe", V, pairs=[[1, 2]]).to_dict()
    p.write_text(json.dumps(good | {"pairs": [[1, 2], [V + 1, 3]]}))  # uses a symbol not made yet
    with pytest.raises(ValueError, match=str(p) + ".*earlier rules"):
        MergeRules.load(p)
    p.write_text(json.dumps(good | {"method": "lzw"}))
    with pytest.raises(ValueError, match="unknown merge method"):
        MergeRules.load(p)
    del good["vocab_size"]
    p.write_text(json.dumps(good))
    with pytest.raises(ValueError, match="vocab_size"):
        MergeRules.load(p)
    with pytest.raises(ValueError, match="length >= 2"):
        MergeRules("rl", V, runs=[[1, 1]])


# ---------------------------------------------------------------------------------------------
# Evaluation and input errors
# ---------------------------------------------------------------------------------------------
def test_evaluate_dict_and_directory(tmp_path):
    rng = np.random.default_rng(7)
    rows = runny_rows(rng, 50, alphabet=4, vocab=6561)
    rules, report = evaluate({"s3": rows}, "rl-bpe", merges=30, min_freq=2, holdout=0.2, seed=3)
    assert isinstance(report, MergeReport)
    assert (report.train_rows, report.heldout_rows) == (40, 10)
    assert report.train_tokens + report.heldout_tokens == sum(map(len, rows))
    assert report.train_ratio > 1.0 and report.heldout_ratio > 1.0
    assert report.new_vocab_size == 6561 + rules.n_rules and report.scale == "s3"
    assert "held-out" in report.format() and json.dumps(report.to_dict())
    _, again = evaluate({"s3": rows}, "rl-bpe", merges=30, min_freq=2, holdout=0.2, seed=3)
    assert again.train_symbols == report.train_symbols  # deterministic by seed

    d = tmp_path / "snac"
    d.mkdir()
    data = snac_rows(rng, 12, alphabet=2, ragged=False)
    cols = {f"tokens_scale_{k}": pa.array([r.tolist() for r in data[f"scale_{k}"]], pa.list_(pa.int16()))
            for k in range(3)}
    cols["file_path"] = pa.array(["a.wav"] * 12)
    pq.write_table(pa.table(cols), d / "tokens_batch_0000.parquet")
    (d / "metadata.json").write_text(json.dumps({"codec": "snac"}))
    rules, report = evaluate(d, "cross-scale", merges=20, holdout=0.25)
    assert rules.scales == ("scale_0", "scale_1", "scale_2") and report.vocab_size == SNAC_V
    assert report.train_tokens + report.heldout_tokens == sum(len(r) for s in data.values() for r in s)
    _, report = evaluate(d, "bpe", merges=5)
    assert report.scale == "scale_2"  # the finest scale by default
    _, report = evaluate(d, "rl", merges=5, scale="scale_0")
    assert report.scale == "scale_0"


def test_bad_inputs():
    rows = [np.array([1, 2, 1, 2])]
    with pytest.raises(ValueError, match="unknown merge method"):
        learn_rules(rows, "huffman", vocab_size=V)
    with pytest.raises(ValueError, match="merges must be >= 1"):
        learn_rules(rows, "bpe", vocab_size=V, merges=0)
    with pytest.raises(ValueError, match="min_freq must be >= 1"):
        learn_rules(rows, "rl", vocab_size=V, min_freq=0)
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        learn_rules([np.array([1, V])], "bpe", vocab_size=V)
    rules = learn_rules(rows, "bpe", vocab_size=V)
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        apply_rules(rules, np.array([-1, 3]))
    with pytest.raises(ValueError, match="symbols must lie"):
        undo_rules(rules, np.array([rules.new_vocab_size]))
    with pytest.raises(ValueError, match="cross-scale needs a multi-scale codec such as snac"):
        evaluate({"s3": rows}, "cross-scale")
    with pytest.raises(ValueError, match="cross-scale needs a multi-scale codec such as snac"):
        learn_rules({"s3": rows}, "cross-scale", vocab_size=V)
    with pytest.raises(ValueError, match="holdout"):
        evaluate({"s3": rows}, "bpe", holdout=1.0)
    with pytest.raises(ValueError, match="no scale"):
        evaluate({"s3": rows}, "bpe", scale="scale_9")


def test_bpe_learning_speed():
    """1000 merges over 1 M tokens: incremental pair counts make a merge one scan (seconds, not minutes)."""
    import time

    rng = np.random.default_rng(0)
    rows = [rng.zipf(1.3, 100_000).clip(1, 6560) for _ in range(10)]
    t0 = time.perf_counter()
    rules = learn_rules(rows, "bpe", vocab_size=6561, merges=1000, min_freq=2)
    assert rules.n_rules == 1000
    assert time.perf_counter() - t0 < 30
