import os

import pytest

# Keep CPU tests deterministic and within the CI machine's two cores.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _triton_interpreter_without_gpu():
    """Triton kernels run on CPU tensors under its interpreter. The switch is read when a
    ``@triton.jit`` function is defined, so it must be set before any kernel module is imported."""
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")
    except ImportError:
        return  # no torch: nothing to interpret


_triton_interpreter_without_gpu()

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
