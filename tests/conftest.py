import os

import pytest

# Keep CPU tests deterministic and within the CI machine's two cores.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _reference import load_reference, reference_available  # noqa: E402


@pytest.fixture(scope="session")
def ref():
    """The reference package; parity tests skip with a reason when it is not installed."""
    if not reference_available():
        pytest.skip("reference package chatterbox-tts==0.1.7 not installed (make test installs it)")
    return load_reference()


@pytest.fixture(scope="module")
def one_thread():
    """Single-threaded torch for a module: its small convolutions run faster and steadier that way
    on the shared 2-core CI machine. Restores the thread count afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
