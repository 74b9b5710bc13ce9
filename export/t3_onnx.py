"""T3's transformer and speech head as two ONNX graphs: ``t3_prefill`` (the prompt) and
``t3_decode`` (one token per row over the keys/values of the earlier ones).

Only the backbone and the speech head go to ONNX; the embeddings, the conditioning encoder, the
sampling, EOS and the alignment control stay in Python (``T3``, ``T3Request``) and run the same
for every backend. The graphs follow the onnx-community names (``inputs_embeds``,
``position_ids``, ``attention_mask``, ``past_key_values.{i}.key``, ``present.{i}.value``, ``logits``)
with two differences: the logits are the speech head's of the last position only (``[B, V]``,
what the sampler reads), and the prefill is its own graph (no empty past).

The export wrappers run our backbone's own submodules (projections, norms, ``_rope``,
``_rotate_half``, ``_probe``) without the static ``KVCache``: a decode step concatenates the past
keys/values with the new ones and masks by ``attention_mask`` (1 = attend), so rows of different
requests, with histories of different lengths, can share a step (left-padded). RoPE and GPT-2's
learned positions come from ``position_ids``, per row. The linear layers are called as plain
``F.linear`` on the checkpoint layout: our decode-shaped CPU products branch on the row count,
which a trace would freeze.

The multilingual model's alignment-guided EOS (behaviour "0.1.7") reads the softmax attention of
a few (layer, head) pairs of batch row 0; with ``alignment_heads`` in the config both graphs also
output it as ``alignment_attn [n_pairs, n_query, L]`` in ``alignment_heads`` order: the prompt's
last ``PREFILL_PROBE_QUERIES`` positions over the ``P`` prompt keys, then the step's query over
its ``S + 1`` keys (masked by row 0's ``attention_mask``).

Prefill and decode hold the same weights, stored once (``DATA_FILE``).
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.t3.backbone import AttentionProbe, KVCache, _probe, _rotate_half
from ..models.t3.config import BackboneConfig, RopeScaling, SamplingDefaults, T3Config
from ..models.t3.linear import BlockedLinear, Conv1D, Linear
from ._onnx import DEFAULT_OPSET, ExportError, check_graph, export_graph, random_inputs, rel_error, save_shared
from .spec import ComponentExport, Dim, GraphCheck, GraphSpec, T, check_size_sets

PREFILL = "t3_prefill"
DECODE = "t3_decode"
DATA_FILE = "t3.onnx.data"
ALIGNMENT_OUTPUT = "alignment_attn"
# Llama prompts end with two start-of-speech positions: the query rows the alignment control reads
# after the prefill (``T3Request``: n_query = P - text_end).
PREFILL_PROBE_QUERIES = 2
# fp32 export check: max |ort - torch| / max |torch| per output.
CHECK_TOL = 1e-4

# Shape profile defaults (rows = 2 per request with CFG).
MAX_BATCH = 64
OPT_BATCH = 4
OPT_PREFILL = {"llama": 128, "gpt2": 512}  # conditioning + text + start tokens of a typical sentence
OPT_PAST = {"llama": 512, "gpt2": 1024}


def _past_names(i: int) -> tuple[str, str]:
    return f"past_key_values.{i}.key", f"past_key_values.{i}.value"


def _present_names(i: int) -> tuple[str, str]:
    return f"present.{i}.key", f"present.{i}.value"


def max_sequence(cfg: T3Config) -> int:
    """Most cache entries a request can hold: GPT-2's positions; for Llama the conditioning, every
    text position, the two start tokens and every speech position."""
    if not cfg.learned_pos_emb:
        return cfg.backbone.n_positions
    cond = 1 + (cfg.perceiver_queries if cfg.use_perceiver else cfg.speech_cond_prompt_len) + int(cfg.emotion_adv)
    return cond + cfg.text_pos_len + 2 + cfg.speech_pos_len


def t3_graph_specs(cfg: T3Config, *, max_batch: int = MAX_BATCH, max_len: Optional[int] = None,
                   opt_prefill: Optional[int] = None, opt_past: Optional[int] = None) -> dict:
    """``{"t3_prefill": GraphSpec, "t3_decode": GraphSpec}`` for ``cfg``."""
    b = cfg.backbone
    L, H, Dh, D, V = b.num_layers, b.num_heads, b.head_dim, b.hidden_size, cfg.speech_vocab_size
    max_len = int(max_len or max_sequence(cfg))
    opt_p = min(opt_prefill or OPT_PREFILL[b.kind], max_len)
    opt_s = min(opt_past or OPT_PAST[b.kind], max_len - 1)
    n_pairs = len(cfg.alignment_heads)
    p_min = PREFILL_PROBE_QUERIES if n_pairs else 1
    batch = Dim(1, min(OPT_BATCH, max_batch), max_batch)

    def kv(names, length):
        return [T(n, "float32", "batch", H, length, Dh) for i in range(L) for n in names(i)]

    align_p = [T(ALIGNMENT_OUTPUT, "float32", n_pairs, PREFILL_PROBE_QUERIES, "prefill_len")] if n_pairs else []
    align_d = [T(ALIGNMENT_OUTPUT, "float32", n_pairs, 1, "total_len")] if n_pairs else []
    prefill = GraphSpec(
        PREFILL, "t3",
        inputs=[T("inputs_embeds", "float32", "batch", "prefill_len", D)],
        outputs=[T("logits", "float32", "batch", V)] + kv(_present_names, "prefill_len") + align_p,
        dims={"batch": batch, "prefill_len": Dim(p_min, opt_p, max_len)},
        doc="T3 prompt: causal attention over inputs_embeds (positions 0..P-1); speech logits of the last "
            "position and every layer's keys/values" + (f"; {ALIGNMENT_OUTPUT}: softmax attention of the "
                                                         f"alignment heads {list(cfg.alignment_heads)}, batch row 0, "
                                                         f"last {PREFILL_PROBE_QUERIES} queries" if n_pairs else ""))
    decode = GraphSpec(
        DECODE, "t3",
        inputs=[T("inputs_embeds", "float32", "batch", 1, D), T("position_ids", "int64", "batch"),
                T("attention_mask", "int64", "batch", "total_len")] + kv(_past_names, "past_len"),
        outputs=[T("logits", "float32", "batch", V)] + kv(_present_names, "total_len") + align_d,
        dims={"batch": batch, "past_len": Dim(1, opt_s, max_len - 1), "total_len": Dim(2, opt_s + 1, max_len)},
        doc="T3 decode step: one token per row at position_ids (RoPE / learned positions), attending to the "
            "past keys/values and itself where attention_mask is 1 (total_len = past_len + 1; the new entry "
            "is the last); present = past + this step" + (f"; {ALIGNMENT_OUTPUT}: the alignment heads' "
                                                          "softmax attention of batch row 0" if n_pairs else ""))
    return {PREFILL: prefill, DECODE: decode}


# ------------------------------------------------------------------------------ export wrappers


class _T3Graph(nn.Module):
    """The backbone and speech head of ``t3`` without its KV cache (weights shared, not copied,
    except blocked linear layers, which are exported in the checkpoint layout)."""

    def __init__(self, t3):
        super().__init__()
        cfg = t3.config
        self.tfmr, self.head = t3.tfmr, t3.speech_head
        self.kind = cfg.backbone.kind
        self.num_layers = cfg.backbone.num_layers
        self.pairs = [tuple(p) for p in cfg.alignment_heads]
        heads: dict = {}
        for layer, head in self.pairs:
            heads.setdefault(layer, []).append(head)
        self.heads = heads
        self._dense: dict = {}
        for m in self.tfmr.modules():
            if isinstance(m, BlockedLinear):
                # as [out, in]; persistent, so the exporter makes it an initializer (stored once), not a constant
                name = f"_dense{len(self._dense)}"
                w = m.dense_weight().detach()
                self.register_buffer(name, (w.t() if m.conv1d else w).contiguous())
                self._dense[id(m)] = name

    def _linear(self, m: nn.Module, x: Tensor) -> Tensor:
        if isinstance(m, (Linear, Conv1D)) and m.packed:
            m._unpack()  # a oneDNN-packed weight (after a torch forward) back to its dense parameter
        name = self._dense.get(id(m))
        if name is not None:
            w = getattr(self, name)
        elif isinstance(m, Conv1D):
            w = m.weight.t()
        else:
            w = m.weight
        return F.linear(x, w, m.bias)

    # one layer -> (x, k, v, attention of the probed heads or None)

    def _attention(self, q, k, v, past, mask, layer_idx):
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # [B, H, S + 1, Dh]
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        probed = None
        if layer_idx in self.heads:
            probed = self._probe(q, k, mask, layer_idx)
        return out, k, v, probed

    def _probe(self, q, k, mask, layer_idx) -> Tensor:
        """[len(heads), n_query, L] softmax attention of batch row 0 (backbone ``_probe``)."""
        heads = self.heads[layer_idx]
        if mask is None:  # prefill: the causal probe of the torch backbone, as is
            probe = AttentionProbe(heads={layer_idx: heads}, row=0, n_query=PREFILL_PROBE_QUERIES)
            _probe(probe, layer_idx, q, k, None)
            return probe.out[layer_idx]
        # decode: the same scores, masked by row 0's attention_mask instead of its position
        qs = torch.cat([q[0, h:h + 1, -1:] for h in heads]).float()  # [h, 1, Dh]
        ks = torch.cat([k[0, h:h + 1] for h in heads]).float()  # [h, L, Dh]
        scores = qs @ ks.transpose(-1, -2) / math.sqrt(q.shape[-1])
        return scores.masked_fill(~mask[0:1, 0], float("-inf")).softmax(-1)

    def _llama_layer(self, layer, x, cos, sin, past, mask, i):
        a, mlp = layer.self_attn, layer.mlp
        h = layer.input_layernorm(x)
        B, T_, _ = h.shape
        q, k, v = (self._linear(p, h).view(B, T_, a.num_heads, a.head_dim).transpose(1, 2)
                   for p in (a.q_proj, a.k_proj, a.v_proj))  # [B, H, T, Dh]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        out, k, v, probed = self._attention(q, k, v, past, mask, i)
        x = x + self._linear(a.o_proj, out.transpose(1, 2).reshape(B, T_, -1))
        h = layer.post_attention_layernorm(x)
        x = x + self._linear(mlp.down_proj, F.silu(self._linear(mlp.gate_proj, h)) * self._linear(mlp.up_proj, h))
        return x, k, v, probed

    def _gpt2_block(self, block, x, past, mask, i):
        a, mlp = block.attn, block.mlp
        h = block.ln_1(x)
        B, T_, D = h.shape
        q, k, v = self._linear(a.c_attn, h).split(D, dim=2)
        q, k, v = (t.view(B, T_, a.num_heads, a.head_dim).transpose(1, 2) for t in (q, k, v))
        out, k, v, probed = self._attention(q, k, v, past, mask, i)
        x = x + self._linear(a.c_proj, out.transpose(1, 2).reshape(B, T_, D))
        h = block.ln_2(x)
        x = x + self._linear(mlp.c_proj, F.gelu(self._linear(mlp.c_fc, h), approximate="tanh"))
        return x, k, v, probed

    def run(self, x: Tensor, positions: Tensor, past: Optional[list], mask: Optional[Tensor]) -> tuple:
        """``x`` [B, T, D] at ``positions`` [B, T]; ``past`` [(k, v)] per layer or None (prefill);
        ``mask`` [B, 1, 1, S + 1] bool or None (causal) -> (logits, k0, v0, k1, ..., [alignment])."""
        presents, probed = [], {}
        if self.kind == "llama":
            cos, sin = self.tfmr._rope(positions, x.dtype)
            layers = self.tfmr.layers
        else:
            x = x + self.tfmr.wpe(positions)
            layers = self.tfmr.h
        for i, layer in enumerate(layers):
            p = past[i] if past is not None else None
            if self.kind == "llama":
                x, k, v, att = self._llama_layer(layer, x, cos, sin, p, mask, i)
            else:
                x, k, v, att = self._gpt2_block(layer, x, p, mask, i)
            presents += [k, v]
            if att is not None:
                probed[i] = att
        h = self.tfmr.norm(x) if self.kind == "llama" else self.tfmr.ln_f(x)
        outs = [self._linear(self.head, h[:, -1])] + presents
        if self.pairs:
            outs.append(torch.stack([probed[layer][self.heads[layer].index(head)] for layer, head in self.pairs]))
        return tuple(outs)


class T3PrefillGraph(_T3Graph):
    def forward(self, inputs_embeds: Tensor):
        B, P, _ = inputs_embeds.shape
        positions = torch.arange(P, device=inputs_embeds.device)[None].expand(B, P)
        return self.run(inputs_embeds, positions, None, None)


class T3DecodeGraph(_T3Graph):
    def forward(self, inputs_embeds: Tensor, position_ids: Tensor, attention_mask: Tensor, *past_key_values: Tensor):
        B = inputs_embeds.shape[0]
        past = [(past_key_values[2 * i], past_key_values[2 * i + 1]) for i in range(self.num_layers)]
        mask = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, S + 1]
        return self.run(inputs_embeds, position_ids.view(B, 1), past, mask)


# ------------------------------------------------------------------------------ config JSON


def _to_json(v):
    if dataclasses.is_dataclass(v):
        return {f.name: _to_json(getattr(v, f.name)) for f in dataclasses.fields(v) if f.init}
    if isinstance(v, (tuple, list)):
        return [_to_json(x) for x in v]
    return v


def t3_config_to_json(cfg: T3Config) -> dict:
    """Every field of ``cfg`` as JSON values (``t3_config_from_json`` reverses it)."""
    return _to_json(cfg)


def t3_config_from_json(d: Union[Mapping, str]) -> T3Config:
    """The ``T3Config`` of ``t3_config_to_json`` (or of an export's ``config``, which holds it under
    ``"t3_config"``; a JSON string is parsed first)."""
    if isinstance(d, str):
        d = json.loads(d)
    d = dict(d.get("t3_config", d))
    bb = dict(d.pop("backbone"))
    rs = bb.pop("rope_scaling", None)
    backbone = BackboneConfig(**bb, rope_scaling=RopeScaling(**rs) if rs is not None else None)
    sampling = SamplingDefaults(**d.pop("sampling"))
    heads = tuple(tuple(int(x) for x in p) for p in d.pop("alignment_heads", ()))
    return T3Config(**d, backbone=backbone, sampling=sampling, alignment_heads=heads)


# ------------------------------------------------------------------------------ checks


def _decode_case(spec: GraphSpec, sizes: dict, seed: int) -> dict:
    """Random decode inputs at ``sizes``: row b left-padded by min(b, past_len - 1) entries, its
    position the count of its real entries (as a batch of requests of different lengths has)."""
    sizes = dict(sizes, total_len=sizes["past_len"] + 1)
    case = random_inputs(spec, sizes, seed=seed)
    B, S = sizes["batch"], sizes["past_len"]
    mask = torch.ones(B, S + 1, dtype=torch.long)
    pos = torch.empty(B, dtype=torch.long)
    for b in range(B):
        pad = min(b, S - 1)
        mask[b, :pad] = 0
        pos[b] = S - pad
    case["attention_mask"], case["position_ids"] = mask, pos
    return case


def _check_cases(spec: GraphSpec, limit: int) -> list:
    cases = []
    for n, sizes in enumerate(check_size_sets(spec, limit=limit)):
        if spec.name == PREFILL:
            cases.append(random_inputs(spec, sizes, seed=n))
        else:
            cases.append(_decode_case(spec, sizes, seed=n))
    return cases


@torch.inference_mode()
def check_against_backbone(t3, prefill: T3PrefillGraph, decode: T3DecodeGraph, *, prompt_len: int = 9,
                           steps: int = 3, seed: int = 0) -> float:
    """The export wrappers against ``t3``'s own cached forward (static ``KVCache``, decode-shaped
    products) on a prompt and a few steps; -> max relative error over logits, keys/values and the
    alignment attention. Guards the wrappers themselves: the graph check compares ONNX with them."""
    cfg, b = t3.config, t3.config.backbone
    B = 2 if cfg.uses_cfg else 1
    g = torch.Generator().manual_seed(seed)
    dev, dt = t3.device, t3.dtype
    x = torch.randn(B, prompt_len, b.hidden_size, generator=g).to(dev, dt)
    cache = KVCache(b.num_layers, b.num_heads, b.head_dim, B, prompt_len + steps, dt, dev)
    probe = AttentionProbe(heads=t3._probe_heads(), n_query=PREFILL_PROBE_QUERIES) if cfg.alignment_heads else None
    want = [t3.speech_head(t3.tfmr(x, cache, probe=probe)[:, -1])]
    got = prefill(x)
    worst = rel_error(got[0].float().cpu(), want[0].float().cpu())
    kv = list(got[1:1 + 2 * b.num_layers])
    for i in range(b.num_layers):
        for j in range(2):
            worst = max(worst, rel_error(kv[2 * i + j].float().cpu(), cache.kv[i, j, :, :, :prompt_len].float().cpu()))
    if probe is not None:
        worst = max(worst, rel_error(got[-1].cpu(), t3._stack_probe(probe).cpu()))
    for s in range(steps):
        pos = torch.full((B,), prompt_len + s, dtype=torch.long, device=dev)
        e = torch.randn(B, 1, b.hidden_size, generator=g).to(dev, dt)
        sp = AttentionProbe(heads=t3._probe_heads(), n_query=1) if probe is not None else None
        want = t3.speech_head(t3.tfmr(e, cache, pos=pos, kv_len=prompt_len + s + 1, probe=sp)[:, -1])
        mask = torch.ones(B, prompt_len + s + 1, dtype=torch.long, device=dev)
        got = decode(e, pos, mask, *kv)
        worst = max(worst, rel_error(got[0].float().cpu(), want.float().cpu()))
        kv = list(got[1:1 + 2 * b.num_layers])
        if sp is not None:
            worst = max(worst, rel_error(got[-1].cpu(), t3._stack_probe(sp).cpu()))
    n = prompt_len + steps
    for i in range(b.num_layers):
        for j in range(2):
            worst = max(worst, rel_error(kv[2 * i + j].float().cpu(), cache.kv[i, j, :, :, :n].float().cpu()))
    return worst


# Not in extras: in the graphs (backbone, speech head) or never read at inference (the text head).
UNUSED_BY_RUNTIME = ("tfmr.", "speech_head.", "text_head.")


def t3_extras(t3) -> dict:
    """The T3 tensors the onnxruntime T3 needs beside the graphs (everything but the backbone,
    the speech head and the text head, which inference never reads), keys prefixed ``t3.``."""
    return {f"t3.{k}": v.detach().cpu().contiguous() for k, v in t3.state_dict().items()
            if not k.startswith(UNUSED_BY_RUNTIME)}


def export_t3(t3, out_dir, *, opset: int = DEFAULT_OPSET, specs: Optional[dict] = None, tol: float = CHECK_TOL,
              n_checks: int = 3, threads: Optional[int] = None) -> ComponentExport:
    """Write ``t3_prefill.onnx`` and ``t3_decode.onnx`` (weights once, in ``t3.onnx.data``) to
    ``out_dir``, check each against torch at ``n_checks`` sets of dynamic sizes (``tol``: relative,
    fp32), and describe them for the bundle.

    ``t3``: a ``T3`` (fp32; its device is where the torch side of the check runs). ``specs``:
    ``t3_graph_specs`` with other profile sizes."""
    cfg = t3.config
    if t3.dtype != torch.float32:
        raise ExportError(f"T3 export is fp32: got a {t3.dtype} model (export from fp32 weights)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    specs = specs or t3_graph_specs(cfg)
    wrappers = {PREFILL: T3PrefillGraph(t3).eval(), DECODE: T3DecodeGraph(t3).eval()}
    backbone_err = check_against_backbone(t3, wrappers[PREFILL], wrappers[DECODE])
    if not backbone_err <= tol:
        raise ExportError(f"T3 export wrappers differ from the torch backbone by {backbone_err:.3g} (tolerance {tol:g})")
    models = {}
    for name, spec in specs.items():
        example = _check_cases(spec, limit=3)[-1]
        args = tuple(example[n].to(t3.device) for n in spec.input_names)
        models[name] = export_graph(wrappers[name], args, spec, out_dir, opset=opset)
    save_shared(models, out_dir, DATA_FILE)
    del models
    checks = []
    dev = t3.device
    for name, spec in specs.items():

        def reference(_w=wrappers[name], _spec=spec, **case):
            return _w(*(case[n].to(dev) for n in _spec.input_names))

        res = check_graph(out_dir / spec.file, spec, reference, _check_cases(spec, n_checks), tol=tol,
                          threads=threads)
        res["backbone_max_rel_error"] = backbone_err
        checks.append(GraphCheck(spec, res))
    config = {
        "t3_config": t3_config_to_json(cfg),
        "graphs": {PREFILL: specs[PREFILL].file, DECODE: specs[DECODE].file},
        "data_file": DATA_FILE,
        "alignment_output": ALIGNMENT_OUTPUT if cfg.alignment_heads else None,
        "alignment_heads": [list(p) for p in cfg.alignment_heads],
        "prefill_probe_queries": PREFILL_PROBE_QUERIES,
        "opset": opset,
    }
    return ComponentExport(component="t3", graphs=checks, extras=t3_extras(t3), config=config)
