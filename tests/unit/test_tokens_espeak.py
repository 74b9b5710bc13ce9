"""The issue's "done when" for ``chatterbox-rt tokens``, as a user runs it: a folder of spoken WAV and
FLAC files made by eSpeak NG (``scripts/espeak_corpus.py``) plus a corrupt one, then ``tokens encode``,
``tokens analyze`` and ``tokens bpe`` each in a fresh interpreter. The corrupt file is reported and
skipped; the dataset, the analysis JSON, the plots and the rules are written and read back."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("espeakng_loader")
ROOT = Path(__file__).resolve().parents[2]


def _cli(*argv, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, "-m", "chatterbox_rt.cli", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600, check=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("espeak_corpus", ROOT / "scripts" / "espeak_corpus.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path_factory.mktemp("corpus")
    assert mod.main([str(out), "--n", "4"]) == 0
    return out


def test_encode_analyze_bpe_on_an_espeak_corpus(corpus, tmp_path):
    import soundfile as sf

    from chatterbox_rt.tokens.analyze import load_sequences
    from chatterbox_rt.tokens.merge import MergeRules, apply_rules, undo_rules
    from chatterbox_rt.vc import VC

    out = tmp_path / "tok"
    r = _cli("tokens", "encode", str(corpus), "--out", str(out), "--dummy-weights", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "corrupt.wav" in r.stderr and "skipped" in r.stderr
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["files_encoded"] == 4 and "corrupt.wav" in meta["files_skipped"]
    seqs = load_sequences(out)["s3"]
    assert len(seqs) == 4
    # the tokens of each file are the voice-conversion path's (same dummy tokenizer weights)
    vc = VC.from_dummy(0, device="cpu")
    first = sorted(p for p in corpus.iterdir() if p.name != "corrupt.wav")[0]
    assert sf.info(str(first)).duration > 1.0
    np.testing.assert_array_equal(seqs[0], vc.source_tokens(first)[0].numpy())

    r = _cli("tokens", "analyze", str(out), "--json", str(tmp_path / "a.json"), "--plot", str(tmp_path / "plots"),
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "recommendation" in r.stdout
    stats = json.loads((tmp_path / "a.json").read_text())
    assert stats["scales"]["s3"]["n_tokens"] == sum(s.size for s in seqs)
    assert sorted(p.suffix for p in (tmp_path / "plots").iterdir()) == [".png", ".png"]

    r = _cli("tokens", "bpe", str(out), "--method", "rl-bpe", "--merges", "20", "--min-freq", "2",
             "--save", str(tmp_path / "rules.json"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rules = MergeRules.load(tmp_path / "rules.json")
    for s in seqs:
        np.testing.assert_array_equal(undo_rules(rules, apply_rules(rules, s)), s)
