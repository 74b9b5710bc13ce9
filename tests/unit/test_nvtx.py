"""NVTX ranges: off -> the shared no-op and no call into ``nvtx``; on -> push/pop in domain
``chatterbox_rt`` with the stage colour, nested, popped on exceptions; on without the package -> no-op."""
import logging
import sys
import types

import pytest

from chatterbox_rt.profiling import nvtx


class FakeNvtx(types.ModuleType):
    """Stands in for the ``nvtx`` package and records what the runtime asks of it."""

    def __init__(self):
        super().__init__("nvtx")
        self.calls = []

    def get_domain(self, name):
        self.calls.append(("get_domain", name))
        return FakeDomain(self.calls, name)


class FakeDomain:
    def __init__(self, calls, name):
        self.calls, self.name = calls, name

    def get_event_attributes(self, message=None, color=None):
        self.calls.append(("attrs", message, color))
        return (message, color)

    def push_range(self, attrs):
        self.calls.append(("push", self.name, *attrs))

    def pop_range(self):
        self.calls.append(("pop", self.name))


@pytest.fixture
def fake(monkeypatch):
    mod = FakeNvtx()
    monkeypatch.setitem(sys.modules, "nvtx", mod)
    monkeypatch.setattr(nvtx, "_domain", None)
    monkeypatch.setattr(nvtx, "_ranges", {})
    monkeypatch.setattr(nvtx, "_enabled", False)
    return mod


def pushes_and_pops(calls):
    return [c for c in calls if c[0] in ("push", "pop")]


def test_disabled_returns_the_shared_noop_and_calls_nothing(fake):
    with nvtx.range("t3_step") as r:
        assert r is nvtx.NO_RANGE
    assert nvtx.range("flow", "flow") is nvtx.range("anything") is nvtx.NO_RANGE
    with pytest.raises(KeyError):
        with nvtx.range("hift"):
            raise KeyError("passes through")
    assert fake.calls == []


def test_enabled_pushes_and_pops_in_order_with_domain_and_stage_colour(fake):
    nvtx.enable()
    with nvtx.range("flow"):
        with nvtx.range("cfm_step"):
            with nvtx.range("estimator"):
                pass
        with nvtx.range("embed_ref", "voice"):
            pass
    C = nvtx.STAGE_COLORS
    assert pushes_and_pops(fake.calls) == [
        ("push", "chatterbox_rt", "flow", C["flow"]),
        ("push", "chatterbox_rt", "cfm_step", C["cfm_step"]),
        ("push", "chatterbox_rt", "estimator", C["estimator"]),
        ("pop", "chatterbox_rt"),
        ("pop", "chatterbox_rt"),
        ("push", "chatterbox_rt", "embed_ref", C["voice"]),
        ("pop", "chatterbox_rt"),
        ("pop", "chatterbox_rt"),
    ]
    assert fake.calls.count(("get_domain", "chatterbox_rt")) == 1


def test_enabled_range_objects_are_cached_per_name_and_stage(fake):
    nvtx.enable()
    assert nvtx.range("t3_step") is nvtx.range("t3_step")
    assert nvtx.range("t3_step") is not nvtx.range("t3_step", "sampling")
    assert nvtx.range("not_a_stage").color == nvtx.DEFAULT_COLOR
    assert sum(c[0] == "attrs" for c in fake.calls) == 3  # strings registered once each


def test_exception_inside_still_pops(fake):
    nvtx.enable()
    with pytest.raises(RuntimeError):
        with nvtx.range("t3_decode"):
            with nvtx.range("t3_step"):
                raise RuntimeError("boom")
    assert [c[0] for c in pushes_and_pops(fake.calls)] == ["push", "push", "pop", "pop"]


def test_enable_disable_at_run_time(fake):
    nvtx.enable()
    assert nvtx.is_enabled()
    nvtx.disable()
    assert not nvtx.is_enabled()
    assert nvtx.range("hift") is nvtx.NO_RANGE
    assert fake.calls == []


def test_enabled_without_the_package_is_a_noop_and_logs_once(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "nvtx", None)  # makes `import nvtx` raise ImportError
    monkeypatch.setattr(nvtx, "_domain", None)
    monkeypatch.setattr(nvtx, "_ranges", {})
    monkeypatch.setattr(nvtx, "_missing_logged", False)
    monkeypatch.setattr(nvtx, "_enabled", False)
    nvtx.enable()
    with caplog.at_level(logging.DEBUG, logger=nvtx.__name__):
        with nvtx.range("flow") as r:
            assert r is nvtx.NO_RANGE
        nvtx.enable()  # asking again stays quiet
        with nvtx.range("hift"):
            pass
    assert len([rec for rec in caplog.records if "nvtx" in rec.getMessage()]) == 1
    assert nvtx.range("t3") is nvtx.NO_RANGE


def test_decorator(fake):
    @nvtx.annotate("hift")
    def vocode(x):
        return x + 1

    @nvtx.annotate(stage="flow")
    def encode():
        raise ValueError("bad")

    assert vocode(1) == 2 and vocode.__name__ == "vocode"
    assert fake.calls == []  # off: a plain call
    nvtx.enable()  # decorated while off, enabled later: ranges appear
    assert vocode(2) == 3
    with pytest.raises(ValueError):
        encode()
    C = nvtx.STAGE_COLORS
    assert pushes_and_pops(fake.calls) == [
        ("push", "chatterbox_rt", "hift", C["hift"]), ("pop", "chatterbox_rt"),
        ("push", "chatterbox_rt", "test_decorator.<locals>.encode", C["flow"]), ("pop", "chatterbox_rt"),
    ]


@pytest.mark.parametrize("value, on", [("1", True), ("true", True), ("TRUE", True), (" yes ", True), ("on", True),
                                       ("0", False), ("", False), ("false", False), ("no", False), (None, False)])
def test_env_var(value, on):
    env = {} if value is None else {nvtx.ENV_VAR: value}
    assert nvtx.env_enabled(env) is on


def test_every_stage_has_a_distinct_colour():
    stages = {"text", "voice", "t3_prefill", "t3_decode", "t3_step", "sampling", "flow", "cfm_step", "estimator",
              "hift", "watermark", "io"}
    assert stages <= set(nvtx.STAGE_COLORS)
    assert len(set(nvtx.STAGE_COLORS.values())) == len(nvtx.STAGE_COLORS)
    assert all(c >> 24 == 0xFF for c in nvtx.STAGE_COLORS.values())  # opaque ARGB


def test_profiler_start_stop_without_cuda_are_noops(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    nvtx.profiler_start()
    nvtx.profiler_stop()
