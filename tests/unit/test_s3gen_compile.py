"""S3Gen.compile: the estimator's and HiFT's forwards through torch.compile (the eager backend here,
which traces with dynamo but generates no code, so the test stays fast): same outputs, same
state-dict keys, bad part names refused."""
import pytest
import torch

from chatterbox_rt.models.s3gen.s3gen import S3Gen


@pytest.mark.slow
def test_compiled_parts_give_the_same_audio():
    ref = S3Gen.from_dummy(meanflow=True, seed=1)
    comp = S3Gen.from_dummy(meanflow=True, seed=1).compile(backend="eager")
    assert list(comp.state_dict()) == list(ref.state_dict())
    g = torch.Generator().manual_seed(0)
    mu, cond, noise = (torch.randn(1, 80, 60, generator=g) for _ in range(3))
    spks = torch.randn(1, 80, generator=g)
    a = ref.flow.decoder(mu, None, spks, cond, n_steps=2, noise=noise, meanflow=True)
    b = comp.flow.decoder(mu, None, spks, cond, n_steps=2, noise=noise, meanflow=True)
    assert float((a - b).abs().max() / a.abs().max()) < 1e-5
    mel = torch.randn(1, 80, 30, generator=g) - 5
    wa = ref.hift(mel, generator=torch.Generator().manual_seed(1))
    wb = comp.hift(mel, generator=torch.Generator().manual_seed(1))
    assert float((wa - wb).abs().max() / wa.abs().max()) < 1e-5


def test_unknown_part_is_refused():
    with pytest.raises(ValueError, match="unknown compile part"):
        S3Gen.from_dummy(seed=1).compile(parts=("vocoder",))
