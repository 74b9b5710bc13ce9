"""CUDA graphs of the whole CFM loop (every Euler step, estimator and fused update), one per
(batch, length bucket, steps) — the engine's S3Gen side on a GPU.

A call's inputs are copied into the graph's static buffers, padded to the bucket's length
(``LENGTH_QUANTUM`` frames) with a zero mask past each row's length, and the graph replays all
``n_steps`` estimator calls at once: no launch overhead per kernel, no host work per step. The
estimator is causal and masks padded keys, so padding changes only rounding (the masked path is
the one batched requests take anyway). The noise is an input: each request keeps its own draw.

Capture happens on first use of a key; a capture that fails disables graphs with one warning and
every call runs eagerly. At most ``max_graphs`` graphs are kept (least recently used dropped).
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Optional

import torch
from torch import Tensor

log = logging.getLogger(__name__)

# Estimator lengths are padded up to a multiple of this (mel frames at 50 Hz: 1.28 s).
LENGTH_QUANTUM = 64
MAX_GRAPHS = 24


class CFMGraphs:
    """Drop-in for ``CausalCFM.__call__`` (``S3Gen.flow_mel(..., cfm=pool)``) that replays CUDA
    graphs on CUDA and calls the module eagerly elsewhere."""

    def __init__(self, cfm, *, enabled: Optional[bool] = None, max_graphs: int = MAX_GRAPHS,
                 quantum: int = LENGTH_QUANTUM):
        self.cfm = cfm
        dev = next(cfm.parameters()).device
        self.enabled = (dev.type == "cuda") if enabled is None else (bool(enabled) and dev.type == "cuda")
        self.max_graphs, self.quantum = max_graphs, quantum
        self.graphs: OrderedDict = OrderedDict()
        self.failed = False
        self.replays = 0

    def __call__(self, mu: Tensor, mask: Optional[Tensor], spks: Tensor, cond: Tensor, n_steps: Optional[int] = None,
                 noise: Optional[Tensor] = None, meanflow: bool = False) -> Tensor:
        if not self.enabled or self.failed or mu.device.type != "cuda" or noise is None:
            return self.cfm(mu, mask, spks, cond, n_steps=n_steps, noise=noise, meanflow=meanflow)
        B, C, L = mu.shape
        Lb = -(-L // self.quantum) * self.quantum
        steps = n_steps or (self.cfm.config.meanflow_n_steps if meanflow else self.cfm.config.n_steps)
        key = (B, Lb, int(steps), bool(meanflow), mu.dtype)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(key, C, spks.shape[1:], mu.device)
            if entry is None:
                return self.cfm(mu, mask, spks, cond, n_steps=n_steps, noise=noise, meanflow=meanflow)
        else:
            self.graphs.move_to_end(key)
        graph, (s_mu, s_mask, s_spks, s_cond, s_noise), out = entry
        s_mu.zero_()
        s_cond.zero_()
        s_noise.zero_()
        s_mask.zero_()
        s_mu[..., :L] = mu
        s_cond[..., :L] = cond
        s_noise[..., :L] = noise
        if mask is None:
            s_mask[..., :L] = 1
        else:
            s_mask[..., :L] = mask
        s_spks.copy_(spks)
        graph.replay()
        self.replays += 1
        return out[..., :L]

    def _capture(self, key, C: int, spk_shape, device):
        B, Lb, steps, meanflow, dtype = key
        try:
            s_mu = torch.zeros(B, C, Lb, device=device, dtype=dtype)
            s_mask = torch.ones(B, 1, Lb, device=device, dtype=dtype)
            s_spks = torch.zeros(B, *spk_shape, device=device, dtype=dtype)
            s_cond = torch.zeros_like(s_mu)
            s_noise = torch.randn(B, C, Lb, device=device, dtype=dtype)
            args = (s_mu, s_mask, s_spks, s_cond)
            side = torch.cuda.Stream(device=device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up: kernels chosen, workspaces allocated
                    self.cfm(*args, n_steps=steps, noise=s_noise, meanflow=meanflow)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.cfm(*args, n_steps=steps, noise=s_noise, meanflow=meanflow)
        except Exception as e:  # noqa: BLE001 - any capture failure falls back to eager
            self.failed = True
            log.warning("CUDA graph capture of the CFM loop failed (%s: %s); running it eagerly",
                        type(e).__name__, e)
            return None
        self.graphs[key] = (graph, (s_mu, s_mask, s_spks, s_cond, s_noise), out)
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        return self.graphs[key]
