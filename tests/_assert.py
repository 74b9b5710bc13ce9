"""Shared test assertions: on failure, say where and by how much (Liger's assert_verbose_allclose)."""
import numpy as np


def assert_close(name, actual, expected, rtol, atol):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    err = np.abs(actual - expected)
    bad = err > atol + rtol * np.abs(expected)
    idx = np.unravel_index(np.argmax(err), err.shape)
    print(f"{name}: max abs err {err.max():.3e} at {idx}")
    assert not bad.any(), (f"{name}: {bad.sum()} / {bad.size} mismatches; max abs err {err.max():.3e} at {idx} "
                           f"(got {actual[idx]:.6g}, want {expected[idx]:.6g})")
