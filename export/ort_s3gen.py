"""S3Gen decoding on onnxruntime: ``OrtS3Gen`` stands in for ``models.s3gen.S3Gen`` wherever the
Python code decodes (``TTS.s3gen_mel``/``s3gen_wav``, the engine's ``decode_batch``).

It runs the graphs ``s3gen_onnx`` writes: the flow encoder, then the whole CFM loop graph when the
request's step count is the one the loop was exported with (else, and where the bundle's CFM is
int8 and has no loop, the estimator graph with the Euler/CFG update in torch: ``euler_cfm``), then
HiFT. What is not a graph is done here as ``S3Gen`` does it, with the same torch calls: joining
prompt and new tokens, the speaker projection (weights from the bundle's extras), the prompt-mel
``cond``, trim-fade, and every random draw (the CFM's x0, HiFT's source phases and noise) from the
caller's generator in the torch path's order, so that a seed gives the same audio on both backends
(to float rounding: ``tests/export/test_s3gen_onnx.py``).

Voice preparation (``embed_ref``, ``tokenizer``, ``speaker_encoder``) is not part of the decoder:
it comes from the bundle's front ends through ``attach_frontends``.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.masks import length_mask
from ..models.s3gen.cfm import MEL_BINS, time_span
from ..models.s3gen.encoder import concat_prompt_tokens
from ..models.s3gen.hift import S3GEN_SR, trim_fade
from ..models.s3gen.s3gen import _pad_rows, _prompt_len
from ._onnx import open_session, to_numpy
from .s3gen_onnx import STREAM_GRAPHS, draw_source_noise

Generators = Union[None, torch.Generator, Sequence[torch.Generator]]


class TorchModuleUnavailable(AttributeError, NotImplementedError):
    """A torch submodule of ``S3Gen`` asked of the onnxruntime decoder. An AttributeError too, so
    ``getattr(s3gen.flow, "decoder", None)`` (the engine's probe for its CUDA-graph CFM) reads None."""


class _TorchOnly(SimpleNamespace):
    """``S3Gen.flow`` / ``S3Gen.mel2wav`` of the onnxruntime decoder: their ``config`` facts, and a
    clear error for the torch modules (streaming goes through ``OrtS3Gen.stream_ops`` instead)."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise TorchModuleUnavailable(f"S3Gen.{self._what}.{name} is a torch module; the onnxruntime S3Gen runs "
                                     "its graphs (flow_mel, hift, stream_ops) only")


def euler_cfm(estimator, noise: Tensor, mask: Tensor, mu: Tensor, spks: Tensor, cond: Tensor, *, n_steps: int,
              meanflow: bool, t_scheduler: str, cfg_rate: float) -> Tensor:
    """The CFM's Euler steps (with CFG as doubled rows, or meanflow's ``r``) around an estimator
    graph: ``estimator(feeds) -> v``, the feeds named as the estimator graph's inputs; as
    ``CausalCFM.forward`` does it, from the unmasked noise."""
    B = noise.shape[0]
    t_span = time_span(n_steps, "linear" if meanflow else t_scheduler, device=noise.device)
    dts = t_span[1:] - t_span[:-1]
    x = noise * mask
    if meanflow:
        for i in range(n_steps):
            v = estimator({"x": x, "mask": mask, "mu": mu, "t": t_span[i].expand(B), "spks": spks, "cond": cond,
                           "r": t_span[i + 1].expand(B)})
            x = x + dts[i] * v
        return x
    w = cfg_rate
    mask_in = torch.cat([mask, mask])
    mu_in, spks_in, cond_in = (torch.cat([a, torch.zeros_like(a)]) for a in (mu, spks, cond))
    for i in range(n_steps):
        v = estimator({"x": torch.cat([x, x]), "mask": mask_in, "mu": mu_in, "t": t_span[i].expand(2 * B),
                       "spks": spks_in, "cond": cond_in})
        x = x + dts[i] * ((1.0 + w) * v[:B] - w * v[B:])
    return x


class OrtS3Gen:
    """``S3Gen``'s decoding API (``flow_mel``, ``hift``, ``mel_lengths``, ``default_steps``,
    ``device``, ``dtype``) over onnxruntime sessions."""

    sr = S3GEN_SR

    def __init__(self, sessions: Mapping[str, object], config: Mapping, extras: Mapping[str, Tensor], *,
                 device="cpu", opener=None):
        self.config = dict(config)
        c = self.config
        self.meanflow = bool(c["meanflow"])
        self.loop_steps = int(c["n_steps"])
        self._has_loop = "cfm_loop" in c["graphs"]  # an int8 bundle's CFM runs the estimator each step
        self._default_steps = int(c.get("default_steps", self.loop_steps))
        self.cfg_rate = float(c["cfg_rate"])
        self.t_scheduler = c["t_scheduler"]
        self.token_mel_ratio = int(c["token_mel_ratio"])
        self.vocab_size = int(c["vocab_size"])
        self.samples_per_frame = int(c["samples_per_frame"])
        self.source_harmonics = int(c["source_harmonics"])
        self.max_tokens = int(c.get("max_tokens", 2500))
        self._device = torch.device(device)
        self._sessions = dict(sessions)
        self._opener = opener  # graph role -> session, for graphs opened on first use
        self.spk_weight = extras["s3gen.spk_embed_affine_layer.weight"].float().to(self._device)
        self.spk_bias = extras["s3gen.spk_embed_affine_layer.bias"].float().to(self._device)
        self.flow = _TorchOnly(_what="flow", config=SimpleNamespace(
            token_mel_ratio=self.token_mel_ratio, vocab_size=self.vocab_size, mel_bins=MEL_BINS))
        self.mel2wav = _TorchOnly(_what="mel2wav", config=SimpleNamespace(
            samples_per_frame=self.samples_per_frame, sampling_rate=int(c["sample_rate"]),
            nb_harmonics=self.source_harmonics - 1))
        self._frontends = None
        self.pre_lookahead_len = int(c.get("pre_lookahead_len", 3))
        self._nsf = None  # the excitation's stand-in HiFT (streaming), from config["nsf"] and extras
        if "nsf" in c and "s3gen.m_source.l_linear.weight" in extras:
            lin = torch.nn.Linear(self.source_harmonics, 1)
            with torch.no_grad():
                lin.weight.copy_(extras["s3gen.m_source.l_linear.weight"].float())
                lin.bias.copy_(extras["s3gen.m_source.l_linear.bias"].float())
            nsf = c["nsf"]
            self._nsf = SimpleNamespace(m_source=SimpleNamespace(l_linear=lin.to(self._device)), config=SimpleNamespace(
                nb_harmonics=self.source_harmonics - 1, samples_per_frame=self.samples_per_frame,
                sampling_rate=int(c["sample_rate"]), nsf_alpha=float(nsf["alpha"]), nsf_sigma=float(nsf["sigma"]),
                nsf_voiced_threshold=float(nsf["voiced_threshold"])))

    @classmethod
    def load(cls, bundle_dir: Union[str, Path], config: Mapping, extras: Mapping[str, Tensor], *,
             device="cpu", threads: Optional[int] = None, session_factory=None) -> "OrtS3Gen":
        """Sessions over ``bundle_dir``'s graphs named in ``config["graphs"]`` (the flow encoder, the
        CFM loop (the estimator where the bundle has no loop) and HiFT now; the estimator on the
        first request for another step count).
        ``session_factory``: opens the graphs instead of onnxruntime (``_onnx.open_session``)."""
        bundle = Path(bundle_dir)
        files = dict(config["graphs"])

        def opener(role: str):
            return open_session(bundle / files[role], device=str(device), threads=threads,
                                session_factory=session_factory)

        cfm = "cfm_loop" if "cfm_loop" in files else "cfm_estimator"
        sessions = {role: opener(role) for role in ("flow_encoder", cfm, "hift")}
        return cls(sessions, config, extras, device=device, opener=opener)

    # ------------------------------------------------------------------ S3Gen's attributes

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def default_steps(self) -> int:
        return self._default_steps

    def _session(self, role: str):
        s = self._sessions.get(role)
        if s is None:
            if self._opener is None:
                raise RuntimeError(f"this OrtS3Gen has no {role} graph")
            s = self._sessions[role] = self._opener(role)
        return s

    def _run(self, role: str, feeds: Mapping[str, object]) -> list:
        outs = self._session(role).run(None, {k: to_numpy(v) for k, v in feeds.items()})
        return [torch.from_numpy(np.ascontiguousarray(o)).to(self._device) for o in outs]

    # ------------------------------------------------------------------ front ends (attached)

    def attach_frontends(self, frontends) -> None:
        """Voice preparation for this decoder (``embed_ref``, ``tokenizer``, ``speaker_encoder``)."""
        self._frontends = frontends

    def _frontend(self, name: str):
        fe = self._frontends
        if fe is None or not hasattr(fe, name):
            raise NotImplementedError(f"OrtS3Gen.{name}: the onnxruntime S3Gen decodes only; voice preparation "
                                      "comes from the bundle's front ends (export with the frontends component)")
        return getattr(fe, name)

    def embed_ref(self, *args, **kwargs) -> dict:
        return self._frontend("embed_ref")(*args, **kwargs)

    @property
    def tokenizer(self):
        return self._frontend("tokenizer")

    @property
    def speaker_encoder(self):
        return self._frontend("speaker_encoder")

    # ------------------------------------------------------------------ flow

    def embed_speaker(self, embedding: Tensor) -> Tensor:
        """x-vector ``[B or 1, 192]`` -> spks ``[B or 1, 80]`` (``FlowFront.embed_speaker``)."""
        e = torch.atleast_2d(torch.as_tensor(embedding)).to(self._device, torch.float32)
        return F.linear(F.normalize(e, dim=1), self.spk_weight, self.spk_bias)

    def mel_lengths(self, token_lens: Tensor, refs: Sequence[Mapping]) -> tuple[Tensor, Tensor, Tensor]:
        """Per request: (full estimator length, prompt mel frames, new mel frames), as ``S3Gen``."""
        p_tok = torch.tensor([int(_prompt_len(r)) for r in refs])
        p_mel = torch.tensor([int(r["prompt_feat"].shape[-2]) for r in refs])
        full = self.token_mel_ratio * (p_tok + torch.as_tensor(token_lens).cpu().long())
        return full, p_mel, full - p_mel

    @torch.inference_mode()
    def flow_mel(self, tokens: Tensor, token_lens: Optional[Tensor], refs: Union[Mapping, Sequence[Mapping]], *,
                 n_steps: Optional[int] = None, noise: Optional[Tensor] = None,
                 generator: Optional[torch.Generator] = None, cfm=None) -> tuple[Tensor, Tensor]:
        """``S3Gen.flow_mel``: speech tokens ``[B, T]`` (``token_lens [B]``) with one reference dict per
        request (or one shared) -> (mel ``[B, 80, M]``, new-frame lengths ``[B]`` on the CPU).
        ``cfm`` (the torch backend's CUDA-graph CFM runner) has no meaning here and must be None."""
        if cfm is not None:
            raise ValueError("the onnxruntime S3Gen runs the exported CFM graphs; it takes no torch cfm runner")
        dev = self._device
        tokens = torch.atleast_2d(torch.as_tensor(tokens)).to(dev).long()
        B = tokens.size(0)
        if token_lens is None:
            token_lens = torch.full((B,), tokens.size(1), dtype=torch.long)
        token_lens = torch.as_tensor(token_lens).long().cpu()
        refs = [refs] * B if isinstance(refs, Mapping) else list(refs)
        if len(refs) != B:
            raise ValueError(f"{len(refs)} reference dicts for a batch of {B}")
        if int(token_lens.min()) < 1:
            raise ValueError("every request needs at least one speech token")
        valid = length_mask(token_lens.to(dev), tokens.size(1))
        if bool((((tokens >= self.vocab_size) | (tokens < 0)) & valid).any()):
            raise ValueError(f"speech tokens must be in [0, {self.vocab_size}); drop T3's special tokens first")
        full, p_mel, new = self.mel_lengths(token_lens, refs)
        if int(new.min()) < 1:
            raise ValueError("the prompt mel is longer than prompt plus new tokens allow")
        L = int(full.max())

        prompt_tok = _pad_rows([torch.atleast_2d(r["prompt_token"])[0, : _prompt_len(r)] for r in refs], dev)
        prompt_lens = torch.tensor([_prompt_len(r) for r in refs], device=dev)
        all_tok, all_lens = concat_prompt_tokens(prompt_tok, prompt_lens, tokens, token_lens.to(dev))
        if all_tok.size(1) > self.max_tokens:
            raise ValueError(f"prompt plus new speech tokens ({all_tok.size(1)}) exceed the exported flow encoder's "
                             f"{self.max_tokens}")
        mu, mask = self._run("flow_encoder", {"tokens": all_tok, "token_lens": all_lens})  # [B, 80, L], [B, 1, L]
        spks = torch.cat([self.embed_speaker(r["embedding"]) for r in refs])
        cond = torch.zeros_like(mu)
        for b, r in enumerate(refs):
            feat = torch.atleast_3d(torch.as_tensor(r["prompt_feat"])).reshape(-1, MEL_BINS)  # [F, 80]
            cond[b, :, : feat.shape[0]] = feat.to(dev, torch.float32).T

        if noise is None:  # the torch path's draw
            noise = torch.randn(B, MEL_BINS, L, generator=generator, device=generator.device if generator else dev,
                                dtype=torch.float32)
        noise = torch.atleast_3d(torch.as_tensor(noise))
        if noise.dim() != 3 or noise.shape[0] != B or noise.shape[1] != MEL_BINS or noise.shape[2] < L:
            raise ValueError(f"noise must be [{B}, {MEL_BINS}, >= {L}] (prompt + new frames), "
                             f"got {list(noise.shape)}")
        noise = noise[..., :L].to(dev, torch.float32)
        mel = self.cfm(noise, mask, mu, spks, cond, n_steps=n_steps or self.default_steps)

        M = int(new.max())
        out = mel.new_zeros(B, MEL_BINS, M)
        for b in range(B):
            s, n = int(p_mel[b]), int(new[b])
            out[b, :, :n] = mel[b, :, s: s + n]
        return out, new

    def cfm(self, noise: Tensor, mask: Tensor, mu: Tensor, spks: Tensor, cond: Tensor, *, n_steps: int) -> Tensor:
        """``CausalCFM.forward`` from the unmasked noise: the loop graph for its step count (where the
        bundle has one: an int8 bundle's estimator runs without it), else the estimator graph with
        the Euler (and CFG) update in torch, as ``CausalCFM`` does it."""
        if n_steps == self.loop_steps and self._has_loop:
            feeds = {"noise": noise, "mask": mask, "mu": mu, "spks": spks, "cond": cond}
            return self._run("cfm_loop", feeds)[0]
        return euler_cfm(lambda feeds: self._run("cfm_estimator", feeds)[0], noise, mask, mu, spks, cond,
                         n_steps=n_steps, meanflow=self.meanflow, t_scheduler=self.t_scheduler,
                         cfg_rate=self.cfg_rate)

    # ------------------------------------------------------------------ vocoder

    @torch.inference_mode()
    def hift(self, mel: Tensor, lengths: Optional[Tensor] = None, *, noise_free: bool = False,
             generator: Generators = None, fade: bool = True) -> Tensor:
        """``S3Gen.hift``: mel ``[B, 80, T]`` (``lengths [B]`` mel frames) -> waveform ``[B, 480 T]``,
        zero past ``480 lengths[b]``, with the reference's trim-fade. ``generator``: one, or one per
        row (each row then draws its source noise as it would alone)."""
        mel = torch.atleast_3d(torch.as_tensor(mel)).to(self._device, torch.float32)
        B, _, M = mel.shape
        per_row = generator is not None and not isinstance(generator, torch.Generator)
        if lengths is not None:
            lengths = torch.as_tensor(lengths).long().cpu()
            if lengths.shape != (B,) or int(lengths.min()) < 1 or int(lengths.max()) > M:
                raise ValueError(f"lengths must be [{B}] mel frames in [1, {M}], got {lengths.tolist()}")
            if bool((lengths == M).all()):
                lengths = None  # as HiFTGenerator.forward: unpadded
        if per_row:
            draw_dev = list(generator)[0].device
        else:
            draw_dev = generator.device if generator is not None else self._device
        phase, noise = draw_source_noise(
            B, M, harmonics=self.source_harmonics, samples_per_frame=self.samples_per_frame, noise_free=noise_free,
            generator=generator, lengths=lengths.tolist() if per_row and lengths is not None else None,
            device=draw_dev)
        mel_lens = torch.full((B,), M, dtype=torch.long) if lengths is None else lengths
        wav = self._run("hift", {"mel": mel, "mel_lens": mel_lens, "source_phase": phase, "source_noise": noise})[0]
        return trim_fade(wav) if fade else wav

    # ------------------------------------------------------------------ streaming

    @property
    def can_stream(self) -> bool:
        """Whether this bundle has what ``S3GenStream`` needs: HiFT's F0 and filter as their own
        graphs (``s3gen_hift_f0``, ``s3gen_hift_decode``) and the NSF facts. Bundles exported before
        chatterbox-rt had them lack them: re-export to stream."""
        graphs = self.config.get("graphs", {})
        return self._nsf is not None and all(r in graphs for r in STREAM_GRAPHS)

    def stream_ops(self) -> "OrtStreamOps":
        """The operations ``engine.stream.S3GenStream`` runs, over this bundle's graphs."""
        if not self.can_stream:
            raise ValueError("this bundle cannot stream: it lacks HiFT's streaming graphs "
                             f"({', '.join(STREAM_GRAPHS.values())}) and its NSF settings (it was exported by an "
                             "older chatterbox-rt); re-export it (chatterbox-rt export ... --force) or "
                             "submit without stream=True")
        return OrtStreamOps(self)

    def __repr__(self) -> str:
        return (f"OrtS3Gen(meanflow={self.meanflow}, loop_steps={self.loop_steps}, device={self._device}, "
                f"graphs={sorted(self.config.get('graphs', {}).values())})")


class OrtStreamOps:
    """``engine.stream.StreamOps`` over an ``OrtS3Gen``: the flow encoder and CFM graphs, HiFT's F0
    and filter graphs, and the NSF excitation in torch (``hift.continue_excitation``, as the torch
    backend builds it, on a stand-in holding the bundle's NSF settings and 9 -> 1 merge)."""

    def __init__(self, s3gen: OrtS3Gen):
        self.s3gen = s3gen
        self.token_mel_ratio = s3gen.token_mel_ratio
        self.pre_lookahead_len = s3gen.pre_lookahead_len
        self.samples_per_frame = s3gen.samples_per_frame
        self.sampling_rate = int(s3gen.config["sample_rate"])
        self.device, self.dtype, self.hift_dtype = s3gen.device, torch.float32, torch.float32
        self.meanflow = s3gen.meanflow

    def embed_speaker(self, embedding: Tensor) -> Tensor:
        return self.s3gen.embed_speaker(embedding)

    def encode(self, tokens: Tensor, finalize: bool) -> Tensor:
        """Tokens ``[1, T]`` (prompt then new, unpadded) -> mu ``[1, 80, 2T]`` (less the look-ahead's
        frames unless ``finalize``: ``FlowFront.encode_tokens``'s trim)."""
        lens = torch.tensor([tokens.shape[1]], dtype=torch.long)
        mu, _ = self.s3gen._run("flow_encoder", {"tokens": tokens.long(), "token_lens": lens})
        if not finalize:
            mu = mu[..., : max(0, mu.shape[-1] - self.pre_lookahead_len * self.token_mel_ratio)]
        return mu

    def decode_mel(self, mu: Tensor, spks: Tensor, cond: Tensor, n_steps: int, noise: Tensor) -> Tensor:
        mask = torch.ones(mu.shape[0], 1, mu.shape[-1], dtype=torch.float32, device=mu.device)
        return self.s3gen.cfm(noise.float(), mask, mu, spks, cond, n_steps=n_steps)

    def f0(self, mel: Tensor) -> Tensor:
        lens = torch.full((mel.shape[0],), mel.shape[-1], dtype=torch.long)
        return self.s3gen._run("hift_f0", {"mel": mel.float(), "mel_lens": lens})[0]

    def excitation(self, f0: Tensor, cycles: Optional[Tensor], *, noise_free: bool,
                   generator: Optional[torch.Generator]) -> tuple[Tensor, Tensor]:
        from ..models.s3gen.hift import continue_excitation

        return continue_excitation(self.s3gen._nsf, f0, cycles, noise_free=noise_free, generator=generator)

    def vocode(self, mel: Tensor, source: Tensor) -> Tensor:
        """mel ``[1, 80, M]`` + source ``[1, 1, 480 M]`` -> waveform ``[480 M]`` (no trim-fade)."""
        B, M = mel.shape[0], mel.shape[-1]
        lens = torch.full((B,), M, dtype=torch.long)
        src = source.float().reshape(B, M, self.samples_per_frame)
        return self.s3gen._run("hift_decode", {"mel": mel.float(), "mel_lens": lens, "source": src})[0][0]


__all__ = ["OrtS3Gen", "OrtStreamOps", "TorchModuleUnavailable", "euler_cfm"]
