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


@pytest.fixture(scope="module", autouse=True)
def _free_module_tmp_dirs(tmp_path_factory):
    """Delete the temporary directories a test module made once the module is done.

    Exported bundles are 0.1-3.5 GB each, and pytest otherwise keeps every module fixture's
    directory until the session ends (tests' own ``tmp_path`` go right after a pass, by
    ``tmp_path_retention_policy = "failed"`` in pyproject.toml). Kept, they summed to ~16 GB and
    filled the CI machine's disk. No fixture wider than a module writes there."""
    import shutil

    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    yield
    for p in set(base.iterdir()) - before:
        shutil.rmtree(p, ignore_errors=True)
    _release_memory()


def _release_memory():
    """Free what the module's models left (reference cycles), and hand glibc's freed heap back to
    the OS (a full run without this reached 18 GB resident, of the CI machine's 24)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc
