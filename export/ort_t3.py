"""T3 on onnxruntime: the exported ``t3_prefill`` / ``t3_decode`` graphs (``t3_onnx``) behind the
``T3`` interface, so ``T3.generate``, ``T3Request`` and the engine run over them unchanged.

``OrtT3`` is a ``T3`` whose backbone and speech head are the two sessions: the embeddings and the
conditioning encoder are the torch modules, loaded from the bundle's extras (the backbone's weights
are never materialised in torch: the model is built on the meta device and those two modules are
replaced by stand-ins). A prefill keeps the graph's ``present`` keys/values; each decode step feeds
them back as ``past_key_values`` and keeps the new ones. The alignment heads' attention
(multilingual, behaviour "0.1.7") comes from the graphs' ``alignment_attn`` output and fills the
request's ``AttentionProbe`` as the torch backbone does, so the alignment-guided EOS runs the same.

The torch side (embeddings, sampling, the request state) runs on the CPU in fp32; ``device``
only picks onnxruntime's execution provider.

``OrtT3Runner`` is the engine's T3 runner (``engine.runners.T3RunnerProtocol``) over the same
sessions; see its docstring for the two decode modes.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..engine.t3_runner import T3Runner
from ..models.t3.backbone import AttentionProbe
from ..models.t3.request import T3Request
from ..models.t3.t3 import CACHE_LEN_QUANTUM, T3
from ._onnx import open_session, require_onnxruntime
from .t3_onnx import ALIGNMENT_OUTPUT, DECODE, PREFILL, PREFILL_PROBE_QUERIES, UNUSED_BY_RUNTIME, t3_config_from_json

log = logging.getLogger(__name__)

EXTRAS_PREFIX = "t3."
_NP_DTYPES = {torch.float32: np.float32, torch.int64: np.int64, torch.int32: np.int32, torch.bool: np.bool_,
              torch.float16: np.float16}
# The prefill session runs its matrices from the memory-mapped weights file, unpacked: measured on
# the Intel Xeon VM (2 threads, Turbo at full size, 150-token prompt) this holds 58 MB of anonymous
# memory instead of 1236 MB, for a prefill of 538 ms instead of 375 ms (decode keeps its packed
# copy: 61 ms per token packed against 100 unpacked).
PREFILL_SESSION_CONFIG = {"session.disable_prepacking": "1"}


class _InOnnx(nn.Module):
    """Stands in for a module whose computation runs in onnxruntime (no parameters)."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"the {self.what} of an OrtT3 runs in onnxruntime: call prefill/decode_step "
                           "(or make_engine_runner for the engine), not the torch module")

    def extra_repr(self) -> str:
        return self.what


def _ort_value(x):
    """A CPU array (or tensor, or OrtValue) as an OrtValue; the caller keeps ``x`` alive while the
    session runs (onnxruntime reads numpy memory in place)."""
    ort = require_onnxruntime()
    if isinstance(x, ort.OrtValue) or getattr(x, "is_device_value", False):  # (a TrtValue: bound as it is)
        return x
    if torch.is_tensor(x):
        x = x.detach().cpu().numpy()
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x))


class OrtT3(T3):
    """A ``T3`` whose transformer and speech head run in onnxruntime (see the module docstring).

    Build with ``OrtT3.load``. ``prefill`` / ``decode_step`` keep one sequence's keys/values (the
    rows of one request, as ``T3.generate`` runs); the engine's runner keeps its own per request."""

    def __init__(self, config, bundle_dir, extras: Mapping[str, Tensor], *, graph_config: Optional[Mapping] = None,
                 device: str = "cpu", threads: Optional[int] = None, session_factory=None,
                 iobinding: Optional[bool] = None):
        with torch.device("meta"):
            super().__init__(config)
        self.tfmr = _InOnnx("transformer backbone")
        self.speech_head = _InOnnx("speech head")
        self.text_head = _InOnnx("text head (unused at inference)")
        self.to_empty(device="cpu")
        self._load_extras(extras)
        self.eval()
        gc = dict(graph_config or {})
        graphs = gc.get("graphs", {})
        bundle_dir = Path(bundle_dir)
        self.bundle_dir = bundle_dir
        self.ort_device = str(device)
        # Both graphs read one weights file. onnxruntime memory-maps it, and by default each session
        # also keeps its own pre-packed copy of every matrix (anonymous memory: twice the weights).
        # The fp32 prefill (once per request, large GEMMs) runs from the mapped file instead, so only
        # the decode step, which prepacking speeds up most, holds a copy (PREFILL_SESSION_CONFIG).
        # A quantised prefill keeps its packing: MatMulNBits unpacked is 2.5x slower (English int8,
        # 2 rows x 150 positions, AMD EPYC 2 threads: 538 against 1364 ms) for 519 MiB of packed
        # 8-bit weights (the fp32 bundle's T3 holds 2173 MiB).
        dense = not gc.get("weight_bits")
        self._prefill_sess = open_session(bundle_dir / graphs.get(PREFILL, f"{PREFILL}.onnx"), device=device,
                                          threads=threads, session_factory=session_factory,
                                          config=PREFILL_SESSION_CONFIG if str(device) == "cpu" and dense else None)
        self._decode_sess = open_session(bundle_dir / graphs.get(DECODE, f"{DECODE}.onnx"), device=device,
                                         threads=threads, session_factory=session_factory)
        # IOBinding (default: where onnxruntime runs on a GPU, and the sessions are onnxruntime's):
        # inputs bound in place from torch tensors on the session's device, the logits written
        # into a buffer allocated once per batch size, the keys/values left where onnxruntime puts
        # them (device memory on a GPU) and bound back as the next step's past: nothing of the
        # cache crosses to the host. Plain runs would copy every present to the host and back.
        bindable = all(hasattr(x, "io_binding") for x in (self._prefill_sess, self._decode_sess))
        if iobinding and not bindable:
            raise ValueError("iobinding=True needs onnxruntime sessions (these sessions have no io_binding)")
        on_gpu = str(device).startswith("cuda")
        self.iobinding = bool(bindable and (on_gpu if iobinding is None else iobinding))
        dev = torch.device(device) if on_gpu else torch.device("cpu")
        self._bind_device = ("cuda" if on_gpu else "cpu", dev.index or 0, dev)
        self._logits_bufs: dict = {}
        L = config.backbone.num_layers
        self._kv_names = [n for i in range(L) for n in (f"present.{i}.key", f"present.{i}.value")]
        self._past_names = [n for i in range(L) for n in (f"past_key_values.{i}.key", f"past_key_values.{i}.value")]
        self._pairs = [tuple(p) for p in config.alignment_heads]
        self._pair_index = {p: j for j, p in enumerate(self._pairs)}
        self._probe_queries = int(gc.get("prefill_probe_queries", PREFILL_PROBE_QUERIES))
        for sess, name in ((self._prefill_sess, PREFILL), (self._decode_sess, DECODE)):
            outs = {o.name for o in sess.get_outputs()}
            want = {"logits", *self._kv_names} | ({ALIGNMENT_OUTPUT} if self._pairs else set())
            if not want <= outs:
                raise ValueError(f"{name}.onnx in {bundle_dir} lacks outputs {sorted(want - outs)}: it was exported "
                                 "for another T3 config")
        self._out_names = ["logits"] + self._kv_names + ([ALIGNMENT_OUTPUT] if self._pairs else [])
        self._kv: Optional[list] = None  # prefill/decode_step's sequence: present OrtValues
        self._kv_len = 0

    @classmethod
    def load(cls, bundle_dir, config_json: Union[Mapping, str], extras: Mapping[str, Tensor], *, device: str = "cpu",
             threads: Optional[int] = None, session_factory=None, iobinding: Optional[bool] = None) -> "OrtT3":
        """From an export's files: ``bundle_dir`` holding ``t3_prefill.onnx``, ``t3_decode.onnx`` and
        ``t3.onnx.data``; ``config_json``: ``ComponentExport.config`` (a dict or its JSON text);
        ``extras``: the ``t3.``-prefixed tensors of ``ComponentExport.extras`` (other keys ignored).
        ``device``: onnxruntime's provider ("cpu" or "cuda"); ``threads``: its intra-op threads;
        ``session_factory``: opens the graphs instead of onnxruntime (``_onnx.open_session``);
        ``iobinding``: run through onnxruntime's IOBinding (default: on a CUDA device)."""
        if isinstance(config_json, str):
            config_json = json.loads(config_json)
        cfg = t3_config_from_json(config_json)
        return cls(cfg, bundle_dir, extras, graph_config=config_json, device=device, threads=threads,
                   session_factory=session_factory, iobinding=iobinding)

    def _load_extras(self, extras: Mapping[str, Tensor]) -> None:
        sd = {k[len(EXTRAS_PREFIX):]: v for k, v in extras.items() if k.startswith(EXTRAS_PREFIX)}
        sd = {k: v for k, v in sd.items() if not k.startswith(UNUSED_BY_RUNTIME)}
        res = self.load_state_dict(sd, strict=False)
        missing = [k for k in res.missing_keys if not k.startswith(UNUSED_BY_RUNTIME)]
        if missing or res.unexpected_keys:
            raise ValueError(f"T3 extras do not match this config: missing {missing[:8]}, "
                             f"unexpected {res.unexpected_keys[:8]}")

    # The torch side lives on the CPU in fp32 whatever onnxruntime runs on.
    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def __repr__(self) -> str:
        return f"OrtT3({self.config.variant}, {self.bundle_dir}, device={self.ort_device})"

    # ------------------------------------------------------------------ the sessions

    def _run(self, sess, feeds: dict) -> tuple:
        """-> (logits [B, V] tensor, present OrtValues, alignment [n_pairs, n, L] tensor or None)."""
        if self.iobinding:
            return self._run_bound(sess, feeds)
        arrays = {k: (v.detach().cpu().numpy() if torch.is_tensor(v) else v) for k, v in feeds.items()}
        outs = sess.run_with_ort_values(self._out_names, {k: _ort_value(v) for k, v in arrays.items()})
        logits = torch.from_numpy(outs[0].numpy().copy())
        kv = list(outs[1:1 + len(self._kv_names)])
        attn = torch.from_numpy(outs[-1].numpy().copy()) if self._pairs else None
        return logits, kv, attn

    def _run_bound(self, sess, feeds: dict) -> tuple:
        """``_run`` through IOBinding (see ``__init__``)."""
        ort = require_onnxruntime()
        kind, index, dev = self._bind_device
        io = sess.io_binding()
        keep = []  # the bound tensors stay alive until the run is over
        for name, v in feeds.items():
            if isinstance(v, ort.OrtValue):
                io.bind_ortvalue_input(name, v)
                continue
            t = torch.as_tensor(v).detach().to(dev).contiguous()
            keep.append(t)
            io.bind_input(name, kind, index, _NP_DTYPES[t.dtype], list(t.shape), t.data_ptr())
        B = int(feeds["inputs_embeds"].shape[0])
        buf = self._logits_bufs.get(B)
        if buf is None:
            buf = self._logits_bufs[B] = torch.empty(B, self.config.speech_vocab_size, dtype=torch.float32, device=dev)
        io.bind_output("logits", kind, index, np.float32, list(buf.shape), buf.data_ptr())
        for name in self._kv_names:
            io.bind_output(name, kind, index)
        if self._pairs:
            io.bind_output(ALIGNMENT_OUTPUT, "cpu")
        if kind == "cuda":
            torch.cuda.current_stream(dev).synchronize()  # the bound tensors' copies ran on torch's stream
            io.synchronize_inputs()
        sess.run_with_iobinding(io)
        if kind == "cuda":
            io.synchronize_outputs()
        outs = io.get_outputs()
        logits = buf.to("cpu", copy=True)  # the buffer is the next call's
        kv = list(outs[1:1 + len(self._kv_names)])
        attn = torch.from_numpy(outs[-1].numpy().copy()) if self._pairs else None
        return logits, kv, attn

    def run_prefill(self, embeds: Tensor) -> tuple:
        """``embeds`` [B, P, D] -> (logits [B, V], keys/values [OrtValue, ...], alignment or None)."""
        return self._run(self._prefill_sess, {"inputs_embeds": embeds.float().contiguous()})

    def run_decode(self, x: Tensor, position_ids: Tensor, attention_mask, past: Sequence) -> tuple:
        """One step: ``x`` [B, 1, D] at ``position_ids`` [B] over ``past`` (OrtValues or arrays
        [B, H, S, Dh] per layer, key then value), ``attention_mask`` [B, S + 1] -> as ``run_prefill``."""
        feeds = {"inputs_embeds": x.float().contiguous(), "position_ids": position_ids.to(torch.long),
                 "attention_mask": attention_mask}
        feeds.update(zip(self._past_names, past))
        return self._run(self._decode_sess, feeds)

    def fill_probe(self, probe: Optional[AttentionProbe], attn: Optional[Tensor]) -> None:
        """``probe.out`` from the graphs' alignment output (``[n_pairs, n, L]``, batch row 0), as the
        torch backbone fills it: per layer ``[len(heads), n_query, L]`` in ``probe.heads`` order."""
        if probe is None:
            return
        if attn is None:
            raise ValueError("an attention probe was asked for, but these T3 graphs have no alignment output")
        if probe.row != 0:
            raise ValueError("the T3 graphs give the alignment attention of batch row 0 only")
        if probe.n_query > attn.shape[1]:
            raise ValueError(f"the probe wants {probe.n_query} query rows; the graph gives {attn.shape[1]}")
        attn = attn[:, attn.shape[1] - probe.n_query:]
        for layer, heads in probe.heads.items():
            try:
                idx = [self._pair_index[(layer, h)] for h in heads]
            except KeyError as e:
                raise ValueError(f"alignment head {e} was not exported (graphs have {self._pairs})") from None
            probe.out[layer] = attn[idx]

    # ------------------------------------------------------------------ T3's forward

    def prefill(self, embeds: Tensor, probe: Optional[AttentionProbe] = None, max_len: int = 0) -> Tensor:
        """Run the prompt, keep its keys/values; -> speech logits of the last position [B, V]."""
        logits, self._kv, attn = self.run_prefill(embeds)
        self._kv_len = embeds.shape[1]
        self.fill_probe(probe, attn)
        return logits

    def decode_step(self, tokens: Tensor, pos: Tensor, speech_pos: Optional[Tensor], kv_len: Optional[int] = None,
                    probe: Optional[AttentionProbe] = None) -> Tensor:
        """One token per row at cache position ``pos`` [B] (every row the same: one request's
        rows) -> logits [B, V]. The step attends to the ``pos`` entries before it (``kv_len``, if
        given, must be ``pos + 1``, what ``T3.generate`` passes)."""
        if self._kv is None:
            raise RuntimeError("decode_step before prefill")
        p = pos.tolist()
        if len(set(p)) != 1:
            raise ValueError(f"OrtT3.decode_step runs the rows of one sequence at one position, got {p}")
        p = int(p[0])
        if p > self._kv_len:
            raise ValueError(f"decode position {p} is past the {self._kv_len} entries held")
        if kv_len is not None and kv_len != p + 1:
            raise ValueError(f"kv_len {kv_len} != position + 1 ({p + 1})")
        past = self._kv
        if p < self._kv_len:  # rewinding: the static cache would overwrite entry p
            past = [np.ascontiguousarray(v.numpy()[:, :, :p]) for v in past]
        x = self.embed_speech(tokens, speech_pos)
        B = x.shape[0]
        mask = np.ones((B, p + 1), dtype=np.int64)
        logits, self._kv, attn = self.run_decode(x, pos, mask, past)
        self._kv_len = p + 1
        self.fill_probe(probe, attn)
        return logits

    def allocate_cache(self, max_batch: int, max_len: int):
        raise NotImplementedError("an OrtT3 keeps onnxruntime's keys/values; the engine uses make_engine_runner")

    def prefill_rows(self, *args, **kwargs):
        raise NotImplementedError("an OrtT3 runs in the engine through make_engine_runner (OrtT3Runner)")

    decode_rows = prefill_rows

    # ------------------------------------------------------------------ the engine

    def make_engine_runner(self, max_rows: int, max_len: int, **kw) -> "OrtT3Runner":
        """The engine's T3 runner over these sessions (``mode``: "invariant" (default) | "dense";
        ``cuda_graphs`` is accepted for the torch runner's signature and must not be True)."""
        return OrtT3Runner(self, max_rows, max_len, **kw)


class OrtT3Runner:
    """``T3RunnerProtocol`` on an ``OrtT3``: slots as in the torch runner, keys/values per request
    (the ``present`` OrtValues of its last call; no shared cache buffer).

    Decode modes:

    * ``"invariant"`` (default): every request's rows run alone, one decode call per request.
      A request's logits are then bit-identical whatever else runs (the very call ``OrtT3.generate``
      makes: same graph, same shapes), which is the engine's batch-invariance promise, and the
      alignment probe (batch row 0) is always the request's own conditional row. Cost: the weights
      are read once per request per step.
    * ``"dense"``: the rows of every running request without an alignment probe share one decode
      call, left-padded to the longest history (``attention_mask`` 0 on the padding,
      ``position_ids`` each request's own); requests with a probe run alone. The weights are read
      once per step, but a request's rounding depends on its neighbours (padding, batch size),
      as in the torch dense mode; each step also gathers every request's keys/values into the
      padded batch (one copy of the cache).
    """

    allocate = T3Runner.allocate
    groups = T3Runner.groups
    slots_in_use = T3Runner.slots_in_use

    def __init__(self, t3: OrtT3, max_rows: int, max_len: int, *, mode: Optional[str] = None,
                 cuda_graphs: Optional[bool] = None):
        if cuda_graphs:
            raise ValueError("cuda_graphs=True is for the torch backend; the onnxruntime T3 runner has none")
        mode = mode or "invariant"
        if mode not in ("invariant", "dense"):
            raise ValueError(f"mode must be 'invariant' or 'dense', got {mode!r}")
        self.t3 = t3
        self.mode = mode
        self.max_rows = int(max_rows)
        self.max_len = -(-int(max_len) // CACHE_LEN_QUANTUM) * CACHE_LEN_QUANTUM
        self._free = [True] * self.max_rows
        rows = 2 if t3.config.uses_cfg else 1
        self.group_rows = rows if mode == "invariant" else self.max_rows
        # slot -> [kv (OrtValues or arrays [rows, H, S, Dh] per layer, key then value), S]
        self.cache: Optional[dict] = {}

    def release(self, slot: int, n: int) -> None:
        T3Runner.release(self, slot, n)
        if self.cache is not None:
            self.cache.pop(slot, None)

    def free(self) -> None:
        self.cache = None

    def _state(self, req: T3Request, slot: int) -> list:
        state = self.cache.get(slot)
        if state is None:
            raise RuntimeError(f"decode of slot {slot} before its prefill")
        if state[1] != req.input_pos:
            raise RuntimeError(f"slot {slot} holds {state[1]} entries, the request's step is at {req.input_pos}")
        return state

    @torch.inference_mode()
    def prefill(self, req: T3Request, slot: int) -> Tensor:
        embeds = req.embeds()
        logits, kv, attn = self.t3.run_prefill(embeds)
        self.cache[slot] = [kv, embeds.shape[1]]
        self.t3.fill_probe(req.prefill_probe(), attn)
        req.release_embeds()
        return logits

    def _inputs(self, group: Sequence[tuple[T3Request, int]]) -> tuple[Tensor, Tensor]:
        """The embedded last tokens [rows, 1, D] and their positions [rows] of ``group``."""
        t3 = self.t3
        tokens = torch.cat([req.last_token().expand(req.rows) for req, _ in group])
        pos = torch.tensor([req.input_pos for req, _ in group for _ in range(req.rows)], dtype=torch.long)
        spos = torch.tensor([req.speech_pos for req, _ in group for _ in range(req.rows)], dtype=torch.long)
        return t3.embed_speech(tokens, spos if t3.config.learned_pos_emb else None), pos

    def _decode_alone(self, req: T3Request, slot: int) -> Tensor:
        state = self._state(req, slot)
        x, pos = self._inputs([(req, slot)])
        mask = np.ones((req.rows, state[1] + 1), dtype=np.int64)
        logits, kv, attn = self.t3.run_decode(x, pos, mask, state[0])
        state[0], state[1] = kv, state[1] + 1
        self.t3.fill_probe(req.current_probe(), attn)
        return logits

    def _decode_padded(self, group: Sequence[tuple[T3Request, int]]) -> list[Tensor]:
        states = [self._state(req, slot) for req, slot in group]
        S = max(s[1] for s in states)
        x, pos = self._inputs(group)
        B = x.shape[0]
        mask = np.zeros((B, S + 1), dtype=np.int64)
        past = []
        for j in range(len(self.t3._past_names)):
            first = states[0][0][j]
            shape = first.shape() if callable(getattr(first, "shape", None)) else first.shape
            past.append(np.zeros((B, shape[1], S, shape[3]), dtype=np.float32))
        row = 0
        for (req, _), (kv, n) in zip(group, states):
            mask[row:row + req.rows, S - n:] = 1
            for j, v in enumerate(kv):
                past[j][row:row + req.rows, :, S - n:] = v.numpy() if hasattr(v, "numpy") else v
            row += req.rows
        logits, kv, _ = self.t3.run_decode(x, pos, mask, past)
        arrays = [v.numpy() for v in kv]
        out, row = [], 0
        for (req, _), state in zip(group, states):
            n = state[1]
            state[0] = [a[row:row + req.rows, :, S - n:] for a in arrays]
            state[1] = n + 1
            out.append(logits[row:row + req.rows])
            row += req.rows
        return out

    @torch.inference_mode()
    def decode(self, items: Sequence[tuple[T3Request, int]]) -> list[Tensor]:
        """One decode step for each (request, slot) -> each request's logits ``[rows, V]``."""
        if self.mode == "invariant":
            return [self._decode_alone(req, slot) for req, slot in items]
        plain = [(r, s) for r, s in items if r.current_probe() is None]
        out: dict = {}
        for r, s in items:
            if r.current_probe() is not None:
                out[id(r)] = self._decode_alone(r, s)
        for group in self.groups(plain):
            for (r, _), lg in zip(group, self._decode_padded(group)):
                out[id(r)] = lg
        return [out[id(r)] for r, _ in items]
