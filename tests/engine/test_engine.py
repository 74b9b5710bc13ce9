"""chatterbox_rt.Engine on dummy weights (T3 cut to 2 layers; S3Gen at full size), fp32 on a CPU.

What a user relies on: a request's output does not depend on what else runs (batch invariance:
identical tokens, and alone exactly ``TTS.generate``'s waveform), requests join a running batch,
wait for slots, stream, cancel, fail alone, and bad input is refused at submit with nothing queued.
"""
import asyncio
import threading
import time

import pytest
import torch

import chatterbox_rt
from chatterbox_rt import TTS
from chatterbox_rt.engine import Engine, EngineClosed, RequestCancelled, RequestFailed
from chatterbox_rt.models.t3.config import smaller_backbone

NEAR_GREEDY = dict(temperature=1e-4)
TEXTS = ["Hello there.", "A second sentence, a bit longer.", "Third.", "The fourth one is here.",
         "Five, six.", "Seven eight nine ten."]


def small_tts(variant: str, seed: int = 0) -> TTS:
    over = smaller_backbone(variant, num_layers=2)
    if variant == "multilingual":  # the alignment heads moved into the two layers kept
        over["alignment_heads"] = ((1, 15), (1, 11), (0, 2))
    return TTS.from_dummy(variant, seed=seed, device="cpu", **over)


@pytest.fixture(scope="module")
def english():
    return small_tts("chatterbox")


@pytest.fixture(scope="module")
def nano():
    return small_tts("nano")


def solo_tokens(tts, text, seed, **kw):
    return tts.t3_tokens(text, seed=seed, **kw)


def wait_for(cond, timeout=120.0):
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise TimeoutError("condition not reached")
        time.sleep(0.005)


# ---------------------------------------------------------------------------------- public names


def test_public_names(english):
    assert chatterbox_rt.Engine is Engine
    with english.engine(max_batch=2, max_len=256) as eng:
        assert isinstance(eng, Engine) and eng.mode == "invariant"
        s = eng.stats()
        for key in ("queued", "running", "slots_in_use", "tokens_per_s"):
            assert key in s


# ------------------------------------------------------------------ a request alone == TTS.generate


@pytest.mark.parametrize("variant", ["chatterbox", "nano"])
def test_alone_equals_generate(variant, english, nano):
    tts = english if variant == "chatterbox" else nano
    kw = dict(max_new_tokens=16, seed=7)
    want = tts.generate("Hello there.", watermark=False, **kw)
    want_tokens = tts.t3_tokens("Hello there.", **kw)
    with Engine(tts, max_batch=2, max_len=512) as eng:
        req = eng.submit("Hello there.", watermark=False, **kw)
        got = req.result(timeout=300)
    assert req.status == "done"
    assert torch.equal(req.tokens, want_tokens)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert torch.equal(got, want)  # the same waveform, bit for bit
    m = req.metrics
    assert m.n_tokens == 16 and m["n_tokens"] == 16
    for name in ("queue_ms", "prefill_ms", "t3_ms", "s3gen_ms", "first_audio_ms", "total_ms"):
        assert m[name] is not None and m[name] >= 0
    chunks = list(req.chunks())
    assert len(chunks) == 1 and torch.equal(chunks[0], got[0])


# ------------------------------------------------------------------------------ batch invariance ★


# Tests about tokens run S3Gen with one CFM step: its cost is not what they test.
FAST_S3GEN = dict(watermark=False, n_steps=1)


def _run_mixed(tts, settings, join_after=None, max_batch=8):
    """Submit requests (some once the others are decoding) -> their tokens."""
    with Engine(tts, max_batch=max_batch, max_len=512) as eng:
        first = [eng.submit(t, **FAST_S3GEN, **kw) for t, kw in settings[:join_after]]
        if join_after is not None:
            wait_for(lambda: all(r.metrics.n_tokens >= 3 for r in first))  # now joining mid-way
        later = [eng.submit(t, **FAST_S3GEN, **kw) for t, kw in settings[join_after:]] if join_after else []
        reqs = first + later
        for r in reqs:
            r.result(timeout=600)
    return reqs


def test_batch_invariance_seeded_defaults_mixed_settings_joining_midway(english):
    settings = [
        (TEXTS[0], dict(seed=1, max_new_tokens=24)),  # reference defaults
        (TEXTS[1], dict(seed=2, max_new_tokens=9)),  # finishes early
        (TEXTS[2], dict(seed=3, max_new_tokens=30, temperature=1.3, top_p=0.9, min_p=0.1)),
        (TEXTS[3], dict(seed=4, max_new_tokens=17, repetition_penalty=2.0, cfg_weight=0.0)),  # one row, no CFG
        (TEXTS[4], dict(seed=5, max_new_tokens=21, cfg_weight=1.0, top_k=50)),
        (TEXTS[5], dict(seed=6, max_new_tokens=12, exaggeration=1.5)),
    ]
    reqs = _run_mixed(english, settings, join_after=2)
    for r, (text, kw) in zip(reqs, settings, strict=True):
        want = solo_tokens(english, text, **kw)
        assert torch.equal(r.tokens, want), f"request {text!r} {kw}: tokens changed by batching"
        assert r.metrics.n_tokens == kw["max_new_tokens"]  # rows finished at different steps


def test_batch_invariance_near_greedy(english):
    settings = [(t, dict(seed=i, max_new_tokens=10 + 3 * i, **NEAR_GREEDY)) for i, t in enumerate(TEXTS)]
    reqs = _run_mixed(english, settings, join_after=3)
    for r, (text, kw) in zip(reqs, settings, strict=True):
        assert torch.equal(r.tokens, solo_tokens(english, text, **kw))


def test_batch_invariance_gpt2_variant(nano):
    settings = [(t, dict(seed=10 + i, max_new_tokens=8 + 4 * i)) for i, t in enumerate(TEXTS[:5])]
    settings[2][1].update(temperature=0.5, top_k=20)
    reqs = _run_mixed(nano, settings, join_after=2)
    for r, (text, kw) in zip(reqs, settings, strict=True):
        assert torch.equal(r.tokens, solo_tokens(nano, text, **kw))


def test_batch_invariance_multilingual_alignment_control_per_row():
    tts = small_tts("multilingual")
    assert tts.t3.config.alignment_heads  # the 0.1.7 behaviour: alignment-guided EOS on each row
    settings = [(t, dict(seed=20 + i, max_new_tokens=14 + 2 * i, language_id="en")) for i, t in enumerate(TEXTS[:4])]
    reqs = _run_mixed(tts, settings, join_after=1)
    for r, (text, kw) in zip(reqs, settings, strict=True):
        assert torch.equal(r.tokens, solo_tokens(tts, text, **kw))


def test_group_size_does_not_change_tokens(english):
    """Two requests per weight pass or four: the same tokens (the invariant grouping)."""
    settings = [(t, dict(seed=30 + i, max_new_tokens=12)) for i, t in enumerate(TEXTS[:4])]
    with Engine(english, max_batch=4, max_len=512) as eng:
        eng._runner.group_rows = 2
        small = [eng.submit(t, **FAST_S3GEN, **kw) for t, kw in settings]
        for r in small:
            r.result(600)
    big = _run_mixed(english, settings)
    for a, b in zip(small, big, strict=True):
        assert torch.equal(a.tokens, b.tokens)


def test_dense_mode_on_cpu_gives_the_solo_tokens_near_greedy(english):
    """The GPU's decode layout (slots as rows, masked attention over a shared length), run on
    the CPU: the same tokens where no two candidates are within rounding (near-greedy)."""
    settings = [(t, dict(seed=40 + i, max_new_tokens=8 + 3 * i, **NEAR_GREEDY)) for i, t in enumerate(TEXTS[:4])]
    with Engine(english, max_batch=4, max_len=512, mode="dense") as eng:
        assert eng.mode == "dense"
        reqs = [eng.submit(t, **FAST_S3GEN, **kw) for t, kw in settings]
        for r in reqs:
            r.result(600)
    for r, (text, kw) in zip(reqs, settings, strict=True):
        assert torch.equal(r.tokens, solo_tokens(english, text, **kw))


# -------------------------------------------------------------------------------------- S3Gen batching


def test_s3gen_batches_requests_finishing_together_and_each_matches_its_solo_run(english, monkeypatch):
    import chatterbox_rt.engine.engine as engine_mod

    sizes = []
    real = engine_mod.decode_batch

    def spy(s3gen, items, **kw):
        sizes.append(len(items))
        return real(s3gen, items, **kw)

    monkeypatch.setattr(engine_mod, "decode_batch", spy)
    kw = [dict(seed=50 + i, max_new_tokens=12, stop_on_eos=False) for i in range(3)]
    texts = TEXTS[:3]
    with Engine(english, max_batch=4, max_len=512) as eng:
        reqs = [eng.submit(t, watermark=False, **k) for t, k in zip(texts, kw, strict=True)]
        wavs = [r.result(600) for r in reqs]
    assert max(sizes) >= 2, f"requests finishing on one step were not batched: {sizes}"
    for wav, t, k in zip(wavs, texts, kw, strict=True):
        want = english.generate(t, watermark=False, **k)
        assert wav.shape == want.shape
        # The batch tolerance of the S3Gen batch tests (padding changes rounding only).
        err = (wav - want).abs().max().item() / want.abs().max().item()
        assert err < 2e-3, err


def test_s3gen_workspace_is_allocated_once_and_reused_without_stale_data(english):
    from chatterbox_rt.engine.s3gen_runner import S3GenWorkspace, Utterance, decode_batch

    ref = english.builtin_voice.gen
    ws = S3GenWorkspace(english.s3gen, max_batch=2, max_tokens=40)
    ptrs = (ws.tokens.data_ptr(), ws.noise.data_ptr())
    assert ws.nbytes == ws.tokens.numel() * 8 + ws.noise.numel() * 4 > 0

    def utts(lengths, seed):
        g = torch.Generator().manual_seed(seed)
        return [Utterance(torch.randint(0, 6561, (n,), generator=g), ref, torch.Generator().manual_seed(seed + i), 2)
                for i, n in enumerate(lengths)]

    for lengths, seed in (((40, 33), 1), ((12,), 2), ((50,), 3)):  # the last one does not fit: own tensors
        got = decode_batch(english.s3gen, utts(lengths, seed), workspace=ws)
        want = decode_batch(english.s3gen, utts(lengths, seed))
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)
    assert (ws.tokens.data_ptr(), ws.noise.data_ptr()) == ptrs


def test_engine_sizes_its_buffers_at_construction(nano):
    with Engine(nano, max_batch=2, max_len=256, s3gen_batch=3) as eng:
        st = eng.stats()
        assert st["kv_cache_bytes"] == eng._runner.cache.kv.numel() * 4 > 0
        assert eng._s3_work.max_batch == 3 and eng._s3_work.max_tokens >= eng.max_len
        assert st["s3gen_buffer_bytes"] == eng._s3_work.nbytes > 0


# ------------------------------------------------------------------------------------------ streaming


def test_stream_chunks_and_tokens(english):
    kw = dict(seed=60, max_new_tokens=48, stop_on_eos=False)
    with Engine(english, max_batch=2, max_len=512) as eng:
        req = eng.submit("Stream this one.", stream=True, watermark=False, chunk_tokens=12, first_chunk_tokens=6,
                         **kw)
        chunks = list(req.chunks(timeout=600))
    assert req.status == "done" and len(chunks) >= 3
    assert all(c.dim() == 1 and c.dtype == torch.float32 for c in chunks)
    # The stream carries the same tokens as the whole request, and as much audio.
    assert torch.equal(req.tokens, english.t3_tokens("Stream this one.", **kw))
    whole = english.generate("Stream this one.", watermark=False, **kw)
    assert sum(c.numel() for c in chunks) == whole.shape[-1]
    assert torch.equal(req.result(), torch.cat(chunks)[None])


def test_tts_stream_and_early_exit_cancels(nano):
    chunks = list(nano.stream("Short.", seed=1, max_new_tokens=30, stop_on_eos=False, watermark=False,
                              chunk_tokens=10, first_chunk_tokens=5))
    assert len(chunks) >= 2
    gen = nano.stream("Another.", seed=2, max_new_tokens=200, stop_on_eos=False, watermark=False,
                      chunk_tokens=10, first_chunk_tokens=5)
    next(gen)
    gen.close()  # leaving the loop cancels the request and frees its slot
    eng = nano.default_engine()
    wait_for(lambda: eng.stats()["running"] == 0 and eng.stats()["cancelled"] >= 1)
    nano.close()


def test_asyncio_interfaces(nano):
    async def main(eng):
        r1 = eng.submit("Async one.", seed=1, max_new_tokens=10, watermark=False)
        r2 = eng.submit("Async two.", seed=2, max_new_tokens=20, watermark=False, stream=True,
                        chunk_tokens=8, first_chunk_tokens=4)
        wav = await r1.aresult()
        chunks = [c async for c in r2.achunks()]
        return wav, chunks, r2

    with Engine(nano, max_batch=2, max_len=512) as eng:
        wav, chunks, r2 = asyncio.run(main(eng))
    assert wav.shape[0] == 1 and wav.numel() > 0
    assert len(chunks) >= 2 and torch.equal(torch.cat(chunks)[None], r2.result())


# ------------------------------------------------------------------------------- memory and waiting


def test_requests_wait_for_slots_and_never_fitting_ones_are_refused(english):
    with Engine(english, max_batch=2, max_len=300) as eng:
        assert eng.stats()["slots_total"] == 4  # two rows per request (CFG)
        reqs = [eng.submit(t, **FAST_S3GEN, seed=i, max_new_tokens=10) for i, t in enumerate(TEXTS[:5])]
        wait_for(lambda: eng.stats()["running"] > 0)
        assert eng.stats()["running"] <= 2  # the others wait in the queue
        with pytest.raises(ValueError, match="KV-cache entries"):
            eng.submit("Too long for these slots.", max_new_tokens=1000)
        for r in reqs:
            r.result(600)
        assert [r.status for r in reqs] == ["done"] * 5
        assert eng.stats()["slots_in_use"] == 0
        assert eng.stats()["submitted"] == 5  # the refused one never entered the queue


@pytest.mark.parametrize("bad, error", [
    (dict(text=""), ValueError),
    (dict(text=42), TypeError),
    (dict(temperature=0.0), ValueError),
    (dict(top_p=1.5), ValueError),
    (dict(max_new_tokens=0), ValueError),
    (dict(bogus=1), TypeError),
    (dict(n_steps=0), ValueError),
    (dict(exaggeration=float("nan")), ValueError),
    (dict(voice="clip.wav"), TypeError),
    (dict(chunk_tokens=0, stream=True), ValueError),
    (dict(seed="x"), TypeError),
])
def test_bad_input_is_refused_at_submit_with_generates_errors(english, bad, error):
    kw = dict(bad)
    text = kw.pop("text", "Fine text.")
    voice = kw.pop("voice", None)
    with Engine(english, max_batch=1, max_len=256) as eng:
        with pytest.raises(error):
            eng.submit(text, voice, **kw)
        if "chunk_tokens" not in kw and "bogus" not in kw and "seed" not in kw:
            with pytest.raises(error):  # the same error TTS.generate gives
                english.generate(text, voice, **kw)
        assert eng.stats()["submitted"] == 0 and eng.stats()["queued"] == 0


# ------------------------------------------------------------------------------ cancel, close, faults


def test_cancel_queued_and_running(english):
    with Engine(english, max_batch=1, max_len=512) as eng:
        running = eng.submit(TEXTS[0], seed=1, max_new_tokens=400, stop_on_eos=False, **FAST_S3GEN)
        queued = eng.submit(TEXTS[1], seed=2, max_new_tokens=8, **FAST_S3GEN)
        wait_for(lambda: running.metrics.n_tokens >= 2)
        assert queued.status == "queued"
        assert queued.cancel()
        assert running.cancel()
        with pytest.raises(RequestCancelled):
            running.result(120)
        with pytest.raises(RequestCancelled):
            queued.result(120)
        assert running.status == queued.status == "cancelled"
        after = eng.submit(TEXTS[2], seed=3, max_new_tokens=8, **FAST_S3GEN)  # the slot is free again
        after.result(300)
        assert torch.equal(after.tokens, solo_tokens(english, TEXTS[2], 3, max_new_tokens=8))
        assert not after.cancel()  # already done


def test_close_without_waiting_cancels_and_refuses_new_work(nano):
    eng = Engine(nano, max_batch=1, max_len=768)
    a = eng.submit("One.", seed=1, max_new_tokens=300, stop_on_eos=False, watermark=False)
    b = eng.submit("Two.", seed=2, max_new_tokens=5, watermark=False)
    wait_for(lambda: a.metrics.n_tokens >= 1)
    eng.close(wait=False)
    assert a.status == "cancelled" and b.status == "cancelled"
    with pytest.raises(EngineClosed):
        eng.submit("Three.")
    eng.close()  # idempotent


def test_context_manager_drains(nano):
    with Engine(nano, max_batch=2, max_len=512) as eng:
        reqs = [eng.submit(t, seed=i, max_new_tokens=6, watermark=False) for i, t in enumerate(TEXTS[:3])]
    assert [r.status for r in reqs] == ["done"] * 3


def test_generate_batch(nano):
    with Engine(nano, max_batch=4, max_len=512) as eng:
        wavs = eng.generate_batch(TEXTS[:3], seed=5, max_new_tokens=8, watermark=False)
    assert len(wavs) == 3
    for wav, text in zip(wavs, TEXTS[:3], strict=True):
        want = nano.generate(text, seed=5, max_new_tokens=8, watermark=False)
        assert wav.shape == want.shape
        assert (wav - want).abs().max() <= 2e-3 * want.abs().max()


def test_a_failure_fails_only_its_request(english, monkeypatch):
    """Inject failures into one request's prefill, one's sampling mid-way and one's S3Gen: those
    fail; the others finish with their solo tokens; the engine keeps serving."""
    import chatterbox_rt.engine.engine as engine_mod
    from chatterbox_rt.engine.t3_runner import T3Runner
    from chatterbox_rt.models.t3.request import T3Request

    real_sample, real_prefill = T3Request.sample, T3Runner.prefill
    real_decode_batch = engine_mod.decode_batch

    def prefill(self, req, slot):
        if req.n_max == 11:
            raise RuntimeError("injected prefill failure")
        return real_prefill(self, req, slot)

    def sample(self, logits):
        if self.n_max == 12 and self.step == 5:
            raise RuntimeError("injected sampling failure")
        return real_sample(self, logits)

    def decode_batch(s3gen, items, **kw):
        if any(u.generator.initial_seed() == 90 for u in items):
            raise RuntimeError("injected S3Gen failure")
        return real_decode_batch(s3gen, items, **kw)

    monkeypatch.setattr(T3Runner, "prefill", prefill)
    monkeypatch.setattr(T3Request, "sample", sample)
    monkeypatch.setattr(engine_mod, "decode_batch", decode_batch)
    settings = [(TEXTS[0], dict(seed=70, max_new_tokens=10)), (TEXTS[1], dict(seed=71, max_new_tokens=11)),
                (TEXTS[2], dict(seed=72, max_new_tokens=12)), (TEXTS[3], dict(seed=73, max_new_tokens=14)),
                (TEXTS[4], dict(seed=90, max_new_tokens=15))]
    with Engine(english, max_batch=6, max_len=512) as eng:
        reqs = [eng.submit(t, stop_on_eos=False, **FAST_S3GEN, **kw) for t, kw in settings]
        for r in reqs:
            r._done.wait(600)
        for r, (t, kw) in zip(reqs, settings, strict=True):
            if kw["seed"] in (71, 72, 90):
                assert r.status == "failed", (t, r.status)
                with pytest.raises(RequestFailed, match="injected"):
                    r.result()
            else:
                assert r.status == "done"
                assert torch.equal(r.tokens, solo_tokens(english, t, stop_on_eos=False, **kw))
        again = eng.submit(TEXTS[0], seed=1, max_new_tokens=6, **FAST_S3GEN)
        assert again.result(300).numel() > 0
        st = eng.stats()
        assert st["failed"] == 3 and st["completed"] == 3 and st["slots_in_use"] == 0


def test_watermark_is_applied_by_default(nano):
    from chatterbox_rt.watermark import get_watermarker

    with Engine(nano, max_batch=1, max_len=512) as eng:
        marked = eng.submit("Marked.", seed=3, max_new_tokens=60, stop_on_eos=False).result(600)
    want = nano.generate("Marked.", seed=3, max_new_tokens=60, stop_on_eos=False)
    assert torch.equal(marked, want)  # the same watermarked waveform generate returns
    assert get_watermarker().detect(marked[0].numpy(), 24000) > 0.5


def test_threads_are_named_and_stop(nano):
    eng = Engine(nano, max_batch=1, max_len=256)
    names = {t.name for t in threading.enumerate()}
    assert {"chatterbox-rt-t3", "chatterbox-rt-s3gen"} <= names
    eng.close()
    assert not eng._t3_thread.is_alive() and not eng._s3_thread.is_alive()


# ------------------------------------------------------------------------------------------- on a GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh runs it)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_on_cuda_dense_with_graphs(dtype):
    """The GPU layout: dense decode captured as CUDA graphs per batch bucket, T3 and S3Gen on their
    own streams. Near-greedy tokens equal the solo run's (fp32); in bf16 most of them do."""
    tts = TTS.from_dummy("chatterbox", seed=0, device="cuda", dtype=dtype,
                         **smaller_backbone("chatterbox", num_layers=2))
    settings = [(t, dict(seed=80 + i, max_new_tokens=12 + 5 * i, **NEAR_GREEDY)) for i, t in enumerate(TEXTS[:5])]
    with Engine(tts, max_batch=8, max_len=512) as eng:
        assert eng.mode == "dense" and eng._runner.graphs is not None
        reqs = [eng.submit(t, watermark=False, **kw) for t, kw in settings]
        wavs = [r.result(300) for r in reqs]
        assert not eng._runner.graphs.failed and eng._runner.graphs.graphs  # captured and replayed
    same = 0
    for r, wav, (text, kw) in zip(reqs, wavs, settings, strict=True):
        want = solo_tokens(tts, text, **kw).cpu()
        same += int(torch.equal(r.tokens, want))
        assert wav.dtype == torch.float32 and wav.device.type == "cpu" and torch.isfinite(wav).all()
    assert same == len(reqs) if dtype == torch.float32 else same >= len(reqs) - 2
