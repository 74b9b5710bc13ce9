"""The CFM loop as CUDA graphs (engine/cfm_graphs.py): equal to the eager loop within rounding
for every (batch, length bucket, steps) key, reused across lengths of a bucket, eager on a CPU."""
import pytest
import torch

from chatterbox_rt.engine.cfm_graphs import CFMGraphs
from chatterbox_rt.models.s3gen.s3gen import S3Gen

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


def _inputs(B, L, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(B, 80, L, generator=g)
    spks = torch.randn(B, 80, generator=g)
    cond = torch.randn(B, 80, L, generator=g)
    noise = torch.randn(B, 80, L, generator=g)
    return [t.to(device) for t in (mu, spks, cond, noise)]


def test_cpu_is_the_eager_loop():
    s3 = S3Gen.from_dummy(seed=1)
    pool = CFMGraphs(s3.flow.decoder)
    assert not pool.enabled
    mu, spks, cond, noise = _inputs(1, 37, "cpu")
    want = s3.flow.decoder(mu, None, spks, cond, n_steps=2, noise=noise)
    got = pool(mu, None, spks, cond, n_steps=2, noise=noise)
    assert torch.equal(got, want) and pool.replays == 0


@cuda
@pytest.mark.parametrize("meanflow", [False, True])
def test_graph_replay_matches_eager(meanflow):
    s3 = S3Gen.from_dummy(meanflow=meanflow, seed=1, device="cuda")
    cfm = s3.flow.decoder
    pool = CFMGraphs(cfm)
    steps = 2 if meanflow else 10
    for B, L in ((1, 37), (2, 100), (1, 50)):  # (1, 37) and (1, 50) share a bucket
        mu, spks, cond, noise = _inputs(B, L, "cuda", seed=L)
        want = cfm(mu, None, spks, cond, n_steps=steps, noise=noise, meanflow=meanflow)
        got = pool(mu, None, spks, cond, n_steps=steps, noise=noise, meanflow=meanflow)
        torch.cuda.synchronize()
        err = (got - want).abs().max() / want.abs().max()
        assert got.shape == want.shape and err < 1e-3, (B, L, float(err))
    assert not pool.failed and pool.replays == 3 and len(pool.graphs) == 2


@cuda
def test_failed_capture_falls_back_with_one_warning(monkeypatch, caplog):
    s3 = S3Gen.from_dummy(seed=1, device="cuda")
    pool = CFMGraphs(s3.flow.decoder)

    def broken(*a, **k):
        raise RuntimeError("capture not supported")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", broken)
    mu, spks, cond, noise = _inputs(1, 40, "cuda")
    want = s3.flow.decoder(mu, None, spks, cond, n_steps=2, noise=noise)
    with caplog.at_level("WARNING"):
        a = pool(mu, None, spks, cond, n_steps=2, noise=noise)
        b = pool(mu, None, spks, cond, n_steps=2, noise=noise)
    assert pool.failed and torch.equal(a, want) and torch.equal(b, want)
    assert sum("CFM loop failed" in r.message for r in caplog.records) == 1
