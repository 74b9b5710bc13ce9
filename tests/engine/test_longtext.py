"""Long text (chatterbox_rt.longtext, engine/longtext.py): splitting, joining, and a long request in
the engine, on dummy weights (Nano's T3 cut to 2 layers; S3Gen at full size), fp32 on a CPU.

What a user relies on: no segment can exceed the model's limits; a text that fits one request runs
unchanged; a long request is exactly its segments run alone (each with its derived seed) and joined;
it streams in order; the joins are free of clicks; one segment failing or a cancel ends the whole
request and frees every segment; 20 000 characters go through the API, the CLI and the server.
"""
import time

import numpy as np
import pytest
import torch

from chatterbox_rt import TTS
from chatterbox_rt.engine import RequestCancelled, RequestFailed
from chatterbox_rt.engine.longtext import LongRequest
from chatterbox_rt.longtext import (JOIN_FADE_S, JOIN_PAUSE_S, MAX_SEGMENT_CHARS, Joiner, fit_tokens,
                                    segment_seed, segment_text, split_text, text_weight)
from chatterbox_rt.models.t3.config import smaller_backbone
from chatterbox_rt.tts import dummy_voice

SR = 24000
SENTENCE = "The quick brown fox jumps over the lazy dog, and then it runs away. "
# Each segment draws this many speech tokens (random weights rarely stop on their own).
FIXED = dict(max_new_tokens=3, stop_on_eos=False, watermark=False)


def chapter(n_chars: int) -> str:
    return (SENTENCE * (n_chars // len(SENTENCE) + 1))[:n_chars].strip()


@pytest.fixture(scope="module")
def nano(one_thread):
    return TTS.from_dummy("nano", seed=0, device="cpu", **smaller_backbone("nano", num_layers=2))


@pytest.fixture(scope="module")
def short_voice(nano):
    """A voice whose S3Gen prompt is 0.4 s: long-text tests then spend their time on the segments."""
    return dummy_voice(nano.builtin_voice.t3.cond_prompt_speech_tokens.shape[1], seed=5, prompt_seconds=0.4)


@pytest.fixture(scope="module")
def engine(nano):
    eng = nano.engine(max_batch=4)
    yield eng
    eng.close(wait=False)


# ---------------------------------------------------------------------------------- splitting


def test_split_prefers_sentences_then_clauses_then_words_then_characters():
    text = "One. Two is here! Three? " * 3
    assert split_text(text, max_chars=20) == ["One. Two is here!", "Three? One.", "Two is here! Three?",
                                              "One. Two is here!", "Three?"]
    clause = "alpha beta gamma, delta epsilon; zeta eta theta iota"
    assert split_text(clause, max_chars=25) == ["alpha beta gamma,", "delta epsilon;", "zeta eta theta iota"]
    assert split_text("word " * 10, max_chars=12) == ["word word", "word word", "word word", "word word",
                                                       "word word"]
    assert split_text("x" * 25, max_chars=10) == ["x" * 10, "x" * 10, "x" * 5]
    # A closing quote stays with its sentence; "3.14" and "e.g.," do not end one.
    assert split_text('"Stop!" she said. Pi is 3.14, e.g., today.', max_chars=20) == \
        ['"Stop!" she said.', "Pi is 3.14, e.g.,", "today."]


def test_dense_scripts_weigh_more_and_split_without_spaces():
    zh = "今天天气很好。我们去公园散步吧！你觉得怎么样？"
    assert text_weight("abc") == 3 and text_weight("今天") == 6
    pieces = split_text(zh, max_chars=50)  # the sentences weigh 21, 25 and 19
    assert pieces == ["今天天气很好。我们去公园散步吧！", "你觉得怎么样？"]
    assert all(text_weight(p) <= 9 for p in split_text("今天天气很好，我们去公园散步吧", max_chars=9))


def test_no_segment_exceeds_the_limits():
    text = chapter(5000) + " " + "supercalifragilistic" * 30
    count = len  # a token per character
    for limit in (40, 120, 1000):
        segs = segment_text(text, count, limit)
        assert all(count(s) <= limit and text_weight(s) <= MAX_SEGMENT_CHARS for s in segs)
        assert "".join(segs).replace(" ", "") == text.replace(" ", "")  # nothing lost or reordered
    with pytest.raises(ValueError, match="too few"):
        fit_tokens(["abc"], lambda t: len(t) + 2, 2)


def test_short_text_is_one_unchanged_segment_and_split_overrides():
    text = "  Hello there.   How are you?  "
    assert segment_text(text, len, 1000) == [text]  # exactly what the reference would take
    assert segment_text(text, len, 1000, split=True) == ["Hello there. How are you?"]
    long = chapter(2000)
    segs = segment_text(long, len, 10_000)
    assert len(segs) >= len(long) // MAX_SEGMENT_CHARS and all(len(s) <= MAX_SEGMENT_CHARS for s in segs)
    assert all(s.endswith(".") for s in segs[:-1])  # whole sentences, packed
    assert segment_text(long, len, 10_000, split=False) == [long]


def test_segment_seeds_are_deterministic_and_distinct():
    seeds = [segment_seed(7, i) for i in range(100)]
    assert seeds == [segment_seed(7, i) for i in range(100)] and len(set(seeds)) == 100
    assert segment_seed(7, 0) != segment_seed(8, 0)
    assert all(0 <= s < 2**31 - 1 for s in seeds)


# ---------------------------------------------------------------------------------- joining


def _join_whole(segments):
    j = Joiner(SR)
    out = []
    for i, seg in enumerate(segments):
        out += [j.push(seg), j.end_segment(last=i == len(segments) - 1)]
    return torch.cat(out)


def test_joiner_streamed_equals_whole_and_puts_a_faded_pause_between():
    g = torch.Generator().manual_seed(0)
    segs = [torch.randn(n, generator=g) * 0.3 + 0.2 for n in (5000, 37, 12000)]  # a DC offset: the worst case
    whole = _join_whole(segs)
    pause, fade = int(JOIN_PAUSE_S * SR), int(JOIN_FADE_S * SR)
    assert whole.numel() == sum(s.numel() for s in segs) + 2 * pause
    for trial in range(3):
        j, out = Joiner(SR), []
        for i, seg in enumerate(segs):
            cuts = sorted(torch.randint(0, seg.numel() + 1, (5,), generator=g).tolist())
            for a, b in zip([0] + cuts, cuts + [seg.numel()]):
                out.append(j.push(seg[a:b]))
            out.append(j.end_segment(last=i == len(segs) - 1))
        assert torch.equal(torch.cat(out), whole)
    # The first segment's start and the last one's end are untouched; the rest is faded to zero.
    assert torch.equal(whole[:100], segs[0][:100]) and torch.equal(whole[-100:], segs[2][-100:])
    a = segs[0].numel()
    assert torch.count_nonzero(whole[a: a + pause]) == 0
    assert torch.equal(whole[: a - fade], segs[0][: a - fade])
    # No click: the largest sample-to-sample step across a join is no larger than inside a segment.
    steps = whole.diff().abs()
    inside = segs[2].diff().abs().max()
    for at in (a, a + pause, a + pause + 37 + pause):
        assert steps[at - fade - 2: at + fade + 2].max() <= inside


# ---------------------------------------------------------------------------------- the engine


# Segments share S3Gen batches; padding changes only rounding (the engine's S3Gen batch tolerance).
S3GEN_BATCH_RTOL = 2e-3


def assert_close(got, want):
    assert got.shape == want.shape
    err = (got - want).abs().max().item() / want.abs().max().item()
    assert err < S3GEN_BATCH_RTOL, err


def test_long_request_is_its_segments_alone_joined(nano, engine, short_voice):
    text = chapter(900)
    segs = nano.segments(text, short_voice)
    assert len(segs) >= 3
    req = engine.submit(text, short_voice, seed=11, **FIXED)
    assert isinstance(req, LongRequest) and req.progress[1] == len(segs)
    got = req.result(timeout=300).reshape(-1)
    assert req.status == "done" and req.progress == (len(segs), len(segs))
    alone = [engine.submit(s, short_voice, seed=segment_seed(11, i), split=False, **FIXED) for i, s in enumerate(segs)]
    for r in alone:
        r.result(timeout=300)
    assert torch.equal(req.tokens, torch.cat([r.tokens for r in alone]))  # T3: exactly the same tokens
    assert_close(got, _join_whole([r.result().reshape(-1) for r in alone]))
    assert req.metrics.n_tokens == 3 * len(segs) and req.tokens.numel() == 3 * len(segs)
    # TTS.generate takes the long text directly (through the default engine): the same waveform.
    assert_close(nano.generate(text, short_voice, seed=11, **FIXED).reshape(-1), got)


def test_a_text_that_fits_runs_exactly_as_before(nano, engine):
    text = "Hello there. How are you?"
    req = engine.submit(text, seed=3, **FIXED)
    assert not isinstance(req, LongRequest)
    assert torch.equal(req.result(timeout=300), nano.generate(text, seed=3, split=False, **FIXED))


def test_long_stream_comes_in_order(engine, short_voice):
    text = chapter(700)
    req = engine.submit(text, short_voice, seed=5, stream=True, **FIXED)
    chunks = list(req.chunks(timeout=300))
    assert len(chunks) >= 2 and req.status == "done"
    segs = req.segments
    # Segment 0 streams (its own streamed output); the others decode whole.
    first = engine.submit(segs[0], short_voice, seed=segment_seed(5, 0), stream=True, split=False,
                          **FIXED).result(timeout=300).reshape(-1)
    rest = [engine.submit(s, short_voice, seed=segment_seed(5, i + 1), split=False, **FIXED)
            .result(timeout=300).reshape(-1) for i, s in enumerate(segs[1:])]
    assert_close(torch.cat(chunks), _join_whole([first] + rest))


def test_post_and_watermark_apply_once_to_the_joined_audio(engine, short_voice):
    from chatterbox_rt.post import apply_post
    from chatterbox_rt.watermark import watermark_output

    text = chapter(650)
    plain = engine.submit(text, short_voice, seed=2, **FIXED).result(timeout=300)
    clean = engine.submit(text, short_voice, seed=2, post="clean", **FIXED).result(timeout=300)
    assert_close(clean, apply_post(plain, SR, "clean"))
    assert clean.abs().max() <= 10 ** (-1 / 20)  # the limiter's ceiling
    marked = engine.submit(text, short_voice, seed=2, post="clean", **dict(FIXED, watermark=True)).result(timeout=300)
    assert_close(marked, watermark_output(apply_post(plain, SR, "clean"), SR))
    with pytest.raises(ValueError, match="post"):
        engine.submit(text, short_voice, post="loud")


def test_one_failing_segment_fails_the_request_and_frees_the_rest(engine, short_voice, monkeypatch):
    from chatterbox_rt.engine.engine import Engine

    real = Engine._keep_samples

    def keep(self, job, n):
        if job.request.parent is not None and job.request.index == 1:
            raise RuntimeError("segment boom")
        return real(self, job, n)

    monkeypatch.setattr(Engine, "_keep_samples", keep)
    req = engine.submit(chapter(900), short_voice, seed=1, **FIXED)
    with pytest.raises(RequestFailed, match="segment 2 of .* failed: segment boom"):
        req.result(timeout=300)
    deadline = time.monotonic() + 60
    while not all(c.done() for c in req.children) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert all(c.done() for c in req.children)
    monkeypatch.undo()
    while engine.stats()["slots_in_use"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats()["slots_in_use"] == 0


def test_cancel_ends_every_segment(engine, short_voice):
    req = engine.submit(chapter(1500), short_voice, seed=1, max_new_tokens=40, stop_on_eos=False, watermark=False)
    req.cancel()
    with pytest.raises(RequestCancelled):
        req.result(timeout=300)
    deadline = time.monotonic() + 60
    while not all(c.done() for c in req.children) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert all(c.status == "cancelled" or c.status == "done" for c in req.children)
    assert any(c.status == "cancelled" for c in req.children)


# ---------------------------------------------------------------------------------- a chapter


CHAPTER_CHARS = 20_000
CHAPTER = dict(max_new_tokens=1, stop_on_eos=False, watermark=False, n_steps=1)


def test_a_20000_character_chapter_through_the_api(nano, short_voice):
    text = chapter(CHAPTER_CHARS + 1)
    segs = nano.segments(text, short_voice)
    assert len(text) >= CHAPTER_CHARS and len(segs) > 60
    with nano.engine(max_batch=16) as eng:
        req = eng.submit(text, short_voice, seed=0, **CHAPTER)
        wav = req.result(timeout=600)
    assert req.status == "done" and req.metrics.n_tokens == len(segs)
    pause = int(JOIN_PAUSE_S * SR)
    assert wav.numel() > (len(segs) - 1) * pause and torch.isfinite(wav).all()


@pytest.mark.slow
def test_a_20000_character_chapter_through_the_cli(nano, short_voice, tmp_path, capsys, monkeypatch):
    import soundfile as sf

    from chatterbox_rt import cli

    monkeypatch.setattr(cli, "_load_tts", lambda args: nano)
    monkeypatch.setattr(nano, "builtin_voice", short_voice)
    text_file = tmp_path / "chapter.txt"
    text_file.write_text(chapter(CHAPTER_CHARS + 1))
    out = tmp_path / "chapter.wav"
    rc = cli.main(["synth", "--text-file", str(text_file), "-o", str(out), "--dummy-weights", "--variant", "nano",
                   "--tokens", "1", "--seed", "0", "--no-watermark", "--batch", "16", "--device", "cpu"])
    _, err = capsys.readouterr()
    assert rc == 0, err
    assert "synthesising" in err and "segment" in err  # the progress bar
    wav, sr = sf.read(out)
    assert sr == SR and len(wav) > 60 * int(JOIN_PAUSE_S * SR)
    assert np.isfinite(wav).all()
