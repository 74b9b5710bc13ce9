"""T3's ONNX graphs and the onnxruntime T3 against torch T3 (small backbones, fp32, CPU).

What the export promises: the graphs match torch at several dynamic sizes, the weights are stored
once, the bundle rebuilds T3 without the checkpoint, and a T3 running on onnxruntime draws the very
tokens torch draws for the same weights and seed: alone (``T3.generate``), under the multilingual
alignment control, and through the engine's runner beside other requests.
"""
import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from chatterbox_rt.export._onnx import rel_error  # noqa: E402
from chatterbox_rt.export.ort_t3 import OrtT3, OrtT3Runner  # noqa: E402
from chatterbox_rt.export.t3_onnx import (ALIGNMENT_OUTPUT, DATA_FILE, DECODE, PREFILL,  # noqa: E402
                                          export_t3, t3_config_from_json, t3_graph_specs)
from chatterbox_rt.models.t3 import T3, T3Cond  # noqa: E402
from chatterbox_rt.models.t3.alignment import AlignmentController  # noqa: E402
from chatterbox_rt.models.t3.backbone import AttentionProbe  # noqa: E402
from chatterbox_rt.models.t3.config import smaller_backbone  # noqa: E402
from chatterbox_rt.models.t3.request import T3Request  # noqa: E402

TOL = 1e-4
NEAR_GREEDY = dict(temperature=1e-4)
# Llama (CFG, learned positions, RoPE), GPT-2 (no CFG, wpe), and multilingual 0.1.7 (alignment control).
VARIANTS = ["chatterbox", "nano", "multilingual"]
# intermediate 1536 > 1024: the MLP's down projection is a BlockedLinear, exported in checkpoint layout.
SMALL = dict(num_layers=2, hidden_size=256, intermediate_size=1536)


def small_t3(variant: str, seed: int = 0) -> T3:
    heads = 4 if variant == "nano" else 16  # the alignment heads index head 15
    over = smaller_backbone(variant, num_heads=heads, **SMALL, **({"gpt2_vocab_size": 64} if variant == "nano" else {}))
    if variant == "multilingual":
        over["alignment_heads"] = ((1, 15), (1, 11), (0, 2))  # moved into the two layers kept
    return T3.from_dummy(variant, seed=seed, **over)


def make_cond(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    return T3Cond(torch.randn(1, cfg.speaker_embed_size, generator=g) * 0.1,
                  torch.randint(0, 6561, (1, cfg.speech_cond_prompt_len), generator=g), 0.5)


def make_text(cfg, n=12, seed=0):
    body = torch.randint(1, 255, (n,), generator=torch.Generator().manual_seed(seed + 7))
    if cfg.is_gpt:
        return body
    return torch.cat([torch.tensor([cfg.start_text_token]), body, torch.tensor([cfg.stop_text_token])])


@pytest.fixture(scope="module")
def exported(tmp_path_factory, one_thread):
    """variant -> (torch T3, ComponentExport, OrtT3, bundle dir), exported once per module."""
    out = {}
    for variant in VARIANTS:
        m = small_t3(variant)
        d = tmp_path_factory.mktemp(f"t3-{variant}")
        ex = export_t3(m, d, threads=1)
        config = json.loads(json.dumps(ex.config))  # as the manifest stores it
        ort_t3 = OrtT3.load(d, config, ex.extras, threads=1)
        out[variant] = (m, ex, ort_t3, d)
    return out


# ------------------------------------------------------------------------------ the graphs


def test_specs_declare_the_onnx_community_names():
    cfg = small_t3("multilingual").config
    specs = t3_graph_specs(cfg)
    pre, dec = specs[PREFILL], specs[DECODE]
    L = cfg.backbone.num_layers
    kv = lambda fmt: [fmt.format(i, w) for i in range(L) for w in ("key", "value")]  # noqa: E731
    assert pre.input_names == ["inputs_embeds"]
    assert pre.output_names == ["logits"] + kv("present.{}.{}") + [ALIGNMENT_OUTPUT]
    assert dec.input_names == ["inputs_embeds", "position_ids", "attention_mask"] + kv("past_key_values.{}.{}")
    assert dec.output_names == ["logits"] + kv("present.{}.{}") + [ALIGNMENT_OUTPUT]
    H, Dh = cfg.backbone.num_heads, cfg.backbone.head_dim
    assert dec.input_spec("past_key_values.1.value").axes == ("batch", H, "past_len", Dh)
    assert dec.outputs[1].axes == ("batch", H, "total_len", Dh)
    assert dec.outputs[-1].axes == (3, 1, "total_len")
    assert pre.outputs[-1].axes == (3, 2, "prefill_len")
    assert pre.outputs[0].axes == ("batch", cfg.speech_vocab_size)
    # no alignment output without alignment heads
    nano = t3_graph_specs(small_t3("nano").config)
    assert ALIGNMENT_OUTPUT not in nano[PREFILL].output_names + nano[DECODE].output_names


@pytest.mark.parametrize("variant", VARIANTS)
def test_export_checks_pass_and_weights_are_stored_once(exported, variant):
    m, ex, _, d = exported[variant]
    assert ex.component == "t3"
    assert [g.spec.name for g in ex.graphs] == [PREFILL, DECODE]
    for g in ex.graphs:
        c = g.check
        assert c["cases"] >= 3 and c["max_rel_error"] <= TOL, c
        assert set(c["per_output"]) == set(g.spec.output_names)
        assert c["backbone_max_rel_error"] <= TOL
        assert (d / g.spec.file).is_file()
    weights = sum(p.numel() * 4 for n, p in m.named_parameters() if n.startswith(("tfmr.", "speech_head.")))
    if m.config.backbone.kind == "llama":
        weights -= m.tfmr.embed_tokens.weight.numel() * 4  # never read: not in the graphs
    data = (d / DATA_FILE).stat().st_size
    assert 0.95 * weights <= data <= 1.05 * weights, (data, weights)  # once, not once per graph
    for g in ex.graphs:
        assert (d / g.spec.file).stat().st_size < 1 << 20  # the graph alone; weights in the data file


@pytest.mark.parametrize("variant", VARIANTS)
def test_bundle_rebuilds_t3_without_its_backbone_weights(exported, variant):
    m, ex, ort_t3, _ = exported[variant]
    assert t3_config_from_json(json.dumps(ex.config)) == m.config
    want = {f"t3.{k}" for k in m.state_dict() if not k.startswith(("tfmr.", "speech_head.", "text_head."))}
    assert set(ex.extras) == want
    sd = m.state_dict()
    for k, v in ex.extras.items():
        assert torch.equal(v, sd[k[3:]])
    # no backbone or speech-head weights in torch: only the embeddings and the cond encoder
    assert not [n for n, _ in ort_t3.named_parameters() if n.startswith(("tfmr.", "speech_head."))]
    assert sum(p.numel() for p in ort_t3.parameters()) == sum(v.numel() for v in ex.extras.values())
    assert ort_t3.device == torch.device("cpu") and ort_t3.dtype == torch.float32
    with pytest.raises(RuntimeError, match="onnxruntime"):
        ort_t3.tfmr(torch.zeros(1, 1, m.config.hidden_size))


# ------------------------------------------------------------------------------ OrtT3 vs torch


@pytest.mark.parametrize("variant", VARIANTS)
def test_prefill_and_decode_logits_match_torch(exported, variant):
    m, _, ort_t3, _ = exported[variant]
    cfg = m.config
    with torch.inference_mode():
        embeds, len_cond = m.prompt_embeds(make_cond(cfg), make_text(cfg), cfg=cfg.uses_cfg)
        B, P, _ = embeds.shape
        text_end = len_cond + make_text(cfg).numel()
        probes = [None, None]
        if cfg.alignment_heads:
            probes = [AttentionProbe(heads=m._probe_heads(), n_query=P - text_end) for _ in range(2)]
        want, got = m.prefill(embeds, probes[0], max_len=P + 8), ort_t3.prefill(embeds, probes[1])
        assert rel_error(got, want) <= TOL
        if probes[0] is not None:
            assert rel_error(m._stack_probe(probes[1]), m._stack_probe(probes[0])) <= TOL
        pos = torch.full((B,), P)
        speech_pos = torch.ones(B, dtype=torch.long) if cfg.learned_pos_emb else None
        for i, t in enumerate(torch.randint(0, 6561, (5,), generator=torch.Generator().manual_seed(1))):
            probes = [AttentionProbe(heads=m._probe_heads(), n_query=1) for _ in range(2)] \
                if cfg.alignment_heads else [None, None]
            want = m.decode_step(t.expand(B), pos, speech_pos, kv_len=P + i + 1, probe=probes[0])
            got = ort_t3.decode_step(t.expand(B), pos, speech_pos, kv_len=P + i + 1, probe=probes[1])
            assert rel_error(got, want) <= TOL, i
            if probes[0] is not None:
                a, b = m._stack_probe(probes[1]), m._stack_probe(probes[0])
                assert a.shape == b.shape == (3, 1, P + i + 1) and rel_error(a, b) <= TOL
            pos += 1
            if speech_pos is not None:
                speech_pos += 1


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("settings", [NEAR_GREEDY, dict(seeded=True)], ids=["near_greedy", "seeded_defaults"])
def test_generate_draws_torch_tokens(exported, variant, settings):
    m, _, ort_t3, _ = exported[variant]
    cfg = m.config
    kw = {k: v for k, v in settings.items() if k != "seeded"}
    runs = []
    for t3 in (m, ort_t3):
        runs.append(t3.generate(make_cond(cfg), make_text(cfg), max_new_tokens=40,
                                generator=torch.Generator().manual_seed(5), **kw))
    assert runs[0].numel() > 10
    assert torch.equal(runs[1], runs[0]), (runs[0].tolist(), runs[1].tolist())


@pytest.mark.parametrize("kw", [dict(repetition_penalty=1.0), dict(repetition_penalty=1.0, cfg_weight=0.0), {}],
                         ids=["forced_eos", "forced_eos_no_cfg", "defaults"])
def test_multilingual_alignment_control_sees_torch_attention(exported, monkeypatch, kw):
    """Behaviour 0.1.7: the alignment controller gets the same attention from onnxruntime as from
    torch at every step, and ends the sequence at the same place (repetition penalty 1: greedy
    repeats a token and the control forces EOS)."""
    m, _, ort_t3, _ = exported["multilingual"]
    assert m.config.behaviour == "0.1.7" and m.config.alignment_heads
    seen = []
    real_step = AlignmentController.step

    def recording(self, attn, logits, prev):
        seen[-1].append(attn.clone())
        return real_step(self, attn, logits, prev)

    monkeypatch.setattr(AlignmentController, "step", recording)
    tokens = []
    for t3 in (m, ort_t3):
        seen.append([])
        tokens.append(t3.generate(make_cond(m.config), make_text(m.config), max_new_tokens=30,
                                  generator=torch.Generator().manual_seed(2), **NEAR_GREEDY, **kw))
    assert torch.equal(tokens[1], tokens[0]), (tokens[0].tolist(), tokens[1].tolist())
    if kw:
        assert tokens[0].numel() < 30  # the control ended it
    assert len(seen[0]) == len(seen[1]) > 1
    for a, b in zip(seen[0], seen[1]):
        assert a.shape == b.shape and rel_error(b, a) <= TOL


# ------------------------------------------------------------------------------ the engine's runner


def _run_requests(t3, runner, settings, join_after: int):
    """Engine-like loop over ``runner``: requests ``join_after:`` join once the first ones have drawn
    3 tokens; a finished request frees its slot at once. -> each request's tokens."""
    reqs = [T3Request(t3, make_cond(t3.config, s["seed"]), make_text(t3.config, s["n"], s["seed"]),
                      max_new_tokens=s["max_new_tokens"], generator=torch.Generator().manual_seed(s["seed"]),
                      **NEAR_GREEDY) for s in settings]
    running, waiting = [], list(reqs)

    def admit(n):
        for _ in range(n):
            r = waiting.pop(0)
            slot = runner.allocate(r.rows)
            assert slot is not None
            r.sample(runner.prefill(r, slot))
            running.append((r, slot))

    admit(join_after)
    steps = 0
    while running or waiting:
        if waiting and (steps >= 3 or not running):
            admit(len(waiting))
        for (r, s), lg in zip(running, runner.decode(running)):
            r.sample(lg)
        for r, s in [x for x in running if x[0].finished]:
            runner.release(s, r.rows)
            running.remove((r, s))
        steps += 1
    assert runner.slots_in_use == 0 and not runner.cache
    return [r.tokens() for r in reqs]


@pytest.mark.parametrize("mode", ["invariant", "dense"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_runner_requests_draw_their_solo_torch_tokens(exported, variant, mode):
    m, _, ort_t3, _ = exported[variant]
    settings = [dict(seed=1, n=12, max_new_tokens=20), dict(seed=2, n=5, max_new_tokens=14),
                dict(seed=3, n=20, max_new_tokens=24)]
    runner = ort_t3.make_engine_runner(8, 512, mode=mode)
    assert isinstance(runner, OrtT3Runner) and runner.mode == mode and runner.max_len == 512
    got = _run_requests(ort_t3, runner, settings, join_after=2)
    for s, toks in zip(settings, got):
        want = m.generate(make_cond(m.config, s["seed"]), make_text(m.config, s["n"], s["seed"]),
                          max_new_tokens=s["max_new_tokens"], generator=torch.Generator().manual_seed(s["seed"]),
                          **NEAR_GREEDY)
        assert torch.equal(toks, want), (s, want.tolist(), toks.tolist())


def test_runner_decode_logits_are_batch_invariant(exported):
    """Invariant mode: a request's logits are bit-identical alone and beside another request."""
    _, _, ort_t3, _ = exported["chatterbox"]
    cfg = ort_t3.config

    def step_logits(with_other: bool):
        runner = ort_t3.make_engine_runner(4, 256)
        req = T3Request(ort_t3, make_cond(cfg, 1), make_text(cfg, 9, 1), max_new_tokens=8,
                        generator=torch.Generator().manual_seed(0), **NEAR_GREEDY)
        items = [(req, runner.allocate(req.rows))]
        if with_other:
            other = T3Request(ort_t3, make_cond(cfg, 2), make_text(cfg, 15, 2), max_new_tokens=8,
                              generator=torch.Generator().manual_seed(1), **NEAR_GREEDY)
            items.append((other, runner.allocate(other.rows)))
        for r, s in items:
            r.sample(runner.prefill(r, s))
        return runner.decode(items)[0]

    assert torch.equal(step_logits(True), step_logits(False))


def test_runner_refuses_cuda_graphs_and_unknown_modes(exported):
    _, _, ort_t3, _ = exported["nano"]
    with pytest.raises(ValueError, match="cuda_graphs"):
        ort_t3.make_engine_runner(2, 256, cuda_graphs=True)
    with pytest.raises(ValueError, match="mode"):
        ort_t3.make_engine_runner(2, 256, mode="fast")
    r = ort_t3.make_engine_runner(2, 256, cuda_graphs=None)
    assert r.group_rows == 1 and r.allocate(1) == 0 and r.allocate(1) == 1 and r.allocate(1) is None


def test_engine_over_ort_t3_gives_solo_tokens(exported):
    """``chatterbox_rt.Engine`` with the T3 of a TTS swapped for the OrtT3 (the engine builds the
    runner through ``make_engine_runner``): each request's tokens are torch's solo tokens."""
    from chatterbox_rt import TTS
    from chatterbox_rt.engine import Engine
    from chatterbox_rt.engine import engine as engine_mod

    with open(engine_mod.__file__) as f:
        wired = "make_engine_runner" in f.read()
    if not wired:
        pytest.skip("this Engine does not build other backends' T3 runners yet")
    m, _, ort_t3, _ = exported["nano"]
    heads = m.config.backbone.num_heads
    over = smaller_backbone("nano", num_heads=heads, gpt2_vocab_size=64, **SMALL)
    tts = TTS.from_dummy("nano", seed=0, device="cpu", **over)
    tts.t3.load_state_dict(m.state_dict())
    texts = ["Hello there.", "A second one, longer."]
    want = [tts.t3_tokens(t, seed=i, max_new_tokens=12, **NEAR_GREEDY) for i, t in enumerate(texts)]
    tts.t3 = ort_t3
    with Engine(tts, max_batch=2, max_len=512) as eng:
        reqs = [eng.submit(t, seed=i, max_new_tokens=12, watermark=False, n_steps=1, **NEAR_GREEDY)
                for i, t in enumerate(texts)]
        for r in reqs:
            r.result(timeout=300)
        assert eng.mode == "invariant"
    for r, w in zip(reqs, want):
        assert r.status == "done" and torch.equal(r.tokens, w)


def test_decode_step_checks_its_position(exported):
    m, _, ort_t3, _ = exported["nano"]
    with torch.inference_mode():
        embeds, _ = m.prompt_embeds(make_cond(m.config), make_text(m.config), cfg=False)
        P = embeds.shape[1]
        ort_t3.prefill(embeds)
        tok = torch.tensor([5])
        with pytest.raises(ValueError, match="past"):
            ort_t3.decode_step(tok, torch.tensor([P + 1]), None)
        with pytest.raises(ValueError, match="kv_len"):
            ort_t3.decode_step(tok, torch.tensor([P]), None, kv_len=P + 3)
        # rewinding to an earlier position recomputes from there, as the static cache overwrites
        a = ort_t3.decode_step(tok, torch.tensor([P]), None)
        ort_t3.decode_step(torch.tensor([7]), torch.tensor([P + 1]), None)
        b = ort_t3.decode_step(tok, torch.tensor([P]), None)
    assert np.array_equal(a.numpy(), b.numpy())


# ------------------------------------------------------------------------------ IOBinding


@pytest.mark.parametrize("variant", VARIANTS)
def test_iobinding_runs_as_plain_runs(exported, variant):
    """The IOBinding path (the default on a GPU, where it keeps the cache on the device) bound to
    CPU memory: the same logits, keys/values and tokens as plain runs, for generate (alignment
    output included where the variant has one) and the Engine's runner."""
    m, ex, ort_t3, d = exported[variant]
    bound = OrtT3.load(d, json.loads(json.dumps(ex.config)), ex.extras, threads=1, iobinding=True)
    assert bound.iobinding and not ort_t3.iobinding  # CPU default: plain runs
    cfg = m.config
    g = torch.Generator().manual_seed(3)
    embeds = torch.randn(2, 9, cfg.backbone.hidden_size, generator=g) * 0.3
    a, b = ort_t3.run_prefill(embeds), bound.run_prefill(embeds)
    assert torch.equal(a[0], b[0]) and all(np.array_equal(x.numpy(), y.numpy()) for x, y in zip(a[1], b[1]))
    # a decode step over the bound run's own keys/values (OrtValues bound back as the past)
    x = torch.randn(2, 1, cfg.backbone.hidden_size, generator=g) * 0.3
    mask, pos = torch.ones(2, 10, dtype=torch.long), torch.full((2,), 9)
    sa, sb = ort_t3.run_decode(x, pos, mask, a[1]), bound.run_decode(x, pos, mask, b[1])
    assert torch.equal(sa[0], sb[0]) and sb[1][0].shape() == [2, cfg.backbone.num_heads, 10, cfg.backbone.head_dim]
    logits_before = sb[0].clone()
    bound.run_decode(x * 2, pos, mask, b[1])
    assert torch.equal(sb[0], logits_before)  # the returned logits are not the reused buffer
    for kw in (NEAR_GREEDY, {}):
        runs = [t3.generate(make_cond(cfg), make_text(cfg), max_new_tokens=30,
                            generator=torch.Generator().manual_seed(5), **kw) for t3 in (ort_t3, bound)]
        assert torch.equal(runs[0], runs[1]) and runs[0].numel() > 5
    settings = [dict(seed=1, n=12, max_new_tokens=12), dict(seed=2, n=5, max_new_tokens=9)]
    got = [_run_requests(t3, t3.make_engine_runner(4, 256), settings, join_after=2) for t3 in (ort_t3, bound)]
    assert all(torch.equal(x, y) for x, y in zip(*got))


def test_iobinding_needs_onnxruntime_sessions(exported):
    from chatterbox_rt.export.trt_session import TrtSession

    m, ex, _, d = exported["chatterbox"]

    def factory(path, device, threads):
        return TrtSession(lambda feeds, stream=None: {}, [], [], name=path.stem)

    with pytest.raises(ValueError, match="iobinding=True needs onnxruntime sessions"):
        OrtT3.load(d, ex.config, ex.extras, threads=1, session_factory=factory, iobinding=True)
