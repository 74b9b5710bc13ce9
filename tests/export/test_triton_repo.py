"""The Triton model repository (``chatterbox_rt.export.triton_repo``, ``export --triton-repo``), checked
without tritonserver (not installable here):

* ``config.pbtxt`` parses with protobuf's text-format parser against a descriptor of the part of
  Triton's ``ModelConfig`` it uses (field names, numbers and enums as in
  triton-inference-server/common ``protobuf/model_config.proto``; an unknown field or enum value
  fails the parse), and says what the contract says;
* the generated ``model.py`` runs end to end in-process under a stand-in
  ``triton_python_backend_utils`` (``sys.modules``): two concurrent streams give the engine's exact
  audio, a cancelled request stops early with its final flag, bad input comes back as a TritonError
  flagged final, finalize closes the engine;
* the CLI writes the repository and refuses a directory that is not one.
"""
import ast
import importlib.util
import json
import math
import re
import sys
import threading
import time
import types

import numpy as np
import pytest
import torch

from chatterbox_rt import TTS
from chatterbox_rt.cli import main
from chatterbox_rt.export.triton_repo import (INPUTS, OUTPUTS, SPEC_FILE, TritonRepoError, read_spec, serving_device,
                                              write_triton_repo)
from chatterbox_rt.models.t3.config import smaller_backbone

text_format = pytest.importorskip("google.protobuf.text_format")
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory  # noqa: E402

# Short generations: 16 speech tokens, streamed after 4 and then every 6 (S3Gen stays full size).
GENERATE = {"max_new_tokens": 16, "n_steps": 2, "watermark": False, "stop_on_eos": False, "chunk_tokens": 6,
            "first_chunk_tokens": 4}
ENGINE = {"max_len": 640}
SPEC = {"dummy": True, "variant": "nano", "t3_layers": 2, "generate_defaults": GENERATE, "engine": ENGINE}
TEXTS = (("Hello there, Triton.", 11), ("A second stream at once.", 22))
WAIT_S = 300.0


# ------------------------------------------------------------------------------------ ModelConfig


def _model_config_class():
    """The fields of Triton's ``inference.ModelConfig`` that a Python-backend config uses, with the
    real field numbers, types and enums (``model_config.proto``), as a protobuf message class."""
    FD = descriptor_pb2.FieldDescriptorProto
    f = descriptor_pb2.FileDescriptorProto(name="triton_model_config_subset.proto", package="inference",
                                           syntax="proto3")
    dtype = f.enum_type.add(name="DataType")
    for i, n in enumerate(("INVALID", "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32",
                           "INT64", "FP16", "FP32", "FP64", "STRING", "BF16")):
        dtype.value.add(name=f"TYPE_{n}", number=i)

    def field(msg, name, number, ftype, repeated=False, type_name=None):
        fd = msg.field.add(name=name, number=number, type=ftype,
                           label=FD.LABEL_REPEATED if repeated else FD.LABEL_OPTIONAL)
        if type_name:
            fd.type_name = type_name
        return fd

    reshape = f.message_type.add(name="ModelTensorReshape")
    field(reshape, "shape", 1, FD.TYPE_INT64, repeated=True)
    group = f.message_type.add(name="ModelInstanceGroup")
    kind = group.enum_type.add(name="Kind")
    for i, n in enumerate(("KIND_AUTO", "KIND_GPU", "KIND_CPU", "KIND_MODEL")):
        kind.value.add(name=n, number=i)
    field(group, "name", 1, FD.TYPE_STRING)
    field(group, "kind", 4, FD.TYPE_ENUM, type_name=".inference.ModelInstanceGroup.Kind")
    field(group, "count", 2, FD.TYPE_INT32)
    field(group, "gpus", 3, FD.TYPE_INT32, repeated=True)
    field(group, "passive", 7, FD.TYPE_BOOL)
    field(group, "host_policy", 9, FD.TYPE_STRING)
    inp = f.message_type.add(name="ModelInput")
    fmt = inp.enum_type.add(name="Format")
    for i, n in enumerate(("FORMAT_NONE", "FORMAT_NHWC", "FORMAT_NCHW")):
        fmt.value.add(name=n, number=i)
    field(inp, "name", 1, FD.TYPE_STRING)
    field(inp, "data_type", 2, FD.TYPE_ENUM, type_name=".inference.DataType")
    field(inp, "format", 3, FD.TYPE_ENUM, type_name=".inference.ModelInput.Format")
    field(inp, "dims", 4, FD.TYPE_INT64, repeated=True)
    field(inp, "reshape", 5, FD.TYPE_MESSAGE, type_name=".inference.ModelTensorReshape")
    field(inp, "is_shape_tensor", 6, FD.TYPE_BOOL)
    field(inp, "allow_ragged_batch", 7, FD.TYPE_BOOL)
    field(inp, "optional", 8, FD.TYPE_BOOL)
    out = f.message_type.add(name="ModelOutput")
    field(out, "name", 1, FD.TYPE_STRING)
    field(out, "data_type", 2, FD.TYPE_ENUM, type_name=".inference.DataType")
    field(out, "dims", 3, FD.TYPE_INT64, repeated=True)
    field(out, "label_filename", 4, FD.TYPE_STRING)
    field(out, "reshape", 5, FD.TYPE_MESSAGE, type_name=".inference.ModelTensorReshape")
    field(out, "is_shape_tensor", 6, FD.TYPE_BOOL)
    param = f.message_type.add(name="ModelParameter")
    field(param, "string_value", 1, FD.TYPE_STRING)
    policy = f.message_type.add(name="ModelTransactionPolicy")
    field(policy, "decoupled", 1, FD.TYPE_BOOL)
    cfg = f.message_type.add(name="ModelConfig")
    entry = cfg.nested_type.add(name="ParametersEntry")
    entry.options.map_entry = True
    field(entry, "key", 1, FD.TYPE_STRING)
    field(entry, "value", 2, FD.TYPE_MESSAGE, type_name=".inference.ModelParameter")
    field(cfg, "name", 1, FD.TYPE_STRING)
    field(cfg, "platform", 2, FD.TYPE_STRING)
    field(cfg, "backend", 17, FD.TYPE_STRING)
    field(cfg, "max_batch_size", 4, FD.TYPE_INT32)
    field(cfg, "input", 5, FD.TYPE_MESSAGE, repeated=True, type_name=".inference.ModelInput")
    field(cfg, "output", 6, FD.TYPE_MESSAGE, repeated=True, type_name=".inference.ModelOutput")
    field(cfg, "instance_group", 7, FD.TYPE_MESSAGE, repeated=True, type_name=".inference.ModelInstanceGroup")
    field(cfg, "parameters", 14, FD.TYPE_MESSAGE, repeated=True, type_name=".inference.ModelConfig.ParametersEntry")
    field(cfg, "model_transaction_policy", 19, FD.TYPE_MESSAGE, type_name=".inference.ModelTransactionPolicy")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))


ModelConfig = _model_config_class()


def parse_config(path):
    msg = ModelConfig()
    text_format.Parse(path.read_text(), msg)  # strict: an unknown field or enum value raises ParseError
    return msg


def test_the_descriptor_rejects_what_triton_would():
    for bad in ('backend: "python"\nbogus_field: 1\n', 'input [ { name: "x" data_type: TYPE_STRNG } ]\n',
                'instance_group [ { kind: KIND_TPU } ]\n', 'max_batch_size: "zero"\n'):
        with pytest.raises(text_format.ParseError):
            text_format.Parse(bad, ModelConfig())


def test_config_pbtxt_is_triton_model_config(tmp_path):
    model_dir = write_triton_repo(tmp_path / "repo", model={"dummy": True, "variant": "nano"}, max_batch=8)
    assert model_dir == tmp_path / "repo" / "chatterbox"
    assert sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*")) == \
        ["1", f"1/{SPEC_FILE}", "1/model.py", "config.pbtxt"]
    cfg = parse_config(model_dir / "config.pbtxt")
    assert cfg.name == "chatterbox" and cfg.backend == "python" and cfg.platform == ""
    assert cfg.max_batch_size == 0 and cfg.model_transaction_policy.decoupled is True
    dtype = ModelConfig.DESCRIPTOR.fields_by_name["input"].message_type.fields_by_name["data_type"].enum_type
    got_in = [(i.name, dtype.values_by_number[i.data_type].name, list(i.dims), i.optional) for i in cfg.input]
    assert got_in == [(n, t, [1], opt) for n, t, opt in INPUTS]
    assert got_in[0] == ("text", "TYPE_STRING", [1], False)
    assert {n for n, _, _, opt in got_in if opt} == {"voice", "language", "seed", "temperature", "exaggeration",
                                                      "cfg_weight", "max_new_tokens"}
    got_out = [(o.name, dtype.values_by_number[o.data_type].name, list(o.dims)) for o in cfg.output]
    assert got_out == [(n, t, list(d)) for n, t, d in OUTPUTS] == [("audio", "TYPE_FP32", [-1]),
                                                                  ("sample_rate", "TYPE_INT32", [1])]
    kind = ModelConfig.DESCRIPTOR.fields_by_name["instance_group"].message_type.enum_types_by_name["Kind"]
    assert [(kind.values_by_number[g.kind].name, g.count) for g in cfg.instance_group] == [("KIND_GPU", 1)]
    assert len(cfg.parameters) == 0
    spec = read_spec(model_dir / "1")
    assert spec["max_batch"] == 8 and spec["model"] == {"dummy": True, "variant": "nano", "device": "auto",
                                                        "backend": "torch"}
    # model.py imports only the backend's module, numpy and chatterbox_rt, and defines TritonPythonModel.
    tree = ast.parse((model_dir / "1" / "model.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | \
        {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= {"triton_python_backend_utils", "numpy", "chatterbox_rt"} and "chatterbox_rt" in imported
    assert [n.name for n in tree.body if isinstance(n, ast.ClassDef)] == ["TritonPythonModel"]

    cpu = write_triton_repo(tmp_path / "cpu", model={"dummy": True, "device": "cpu"}, instance_kind="KIND_CPU",
                            instance_count=2, execution_env="$$TRITON_MODEL_DIRECTORY/env.tar.gz", model_name="tts")
    cfg = parse_config(cpu / "config.pbtxt")
    assert cfg.name == "tts" and [(g.kind, g.count) for g in cfg.instance_group] == [(2, 2)]  # KIND_CPU
    assert cfg.parameters["EXECUTION_ENV_PATH"].string_value == "$$TRITON_MODEL_DIRECTORY/env.tar.gz"


def test_repo_directory_rules_and_spec_errors(tmp_path):
    repo = tmp_path / "repo"
    write_triton_repo(repo, model={"dummy": True})
    write_triton_repo(repo, model={"dummy": True, "variant": "turbo"})  # ours: replaced
    assert read_spec(repo / "chatterbox" / "1")["model"]["variant"] == "turbo"
    write_triton_repo(repo, model={"dummy": True}, model_name="second")  # ours: another model beside it
    foreign = tmp_path / "foreign"
    (foreign / "resnet" / "1").mkdir(parents=True)
    (foreign / "resnet" / "config.pbtxt").write_text('backend: "onnxruntime"\n')
    with pytest.raises(TritonRepoError, match="not a Chatterbox model repository.*resnet.*force"):
        write_triton_repo(foreign, model={"dummy": True})
    write_triton_repo(foreign, model={"dummy": True}, force=True)  # added; the other model left alone
    assert (foreign / "resnet" / "config.pbtxt").read_text() == 'backend: "onnxruntime"\n'
    assert sorted(p.name for p in foreign.iterdir()) == ["chatterbox", "resnet"]
    with pytest.raises(TritonRepoError, match="never replaced"):
        write_triton_repo(foreign, model={"dummy": True}, model_name="resnet", force=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(TritonRepoError, match="is a file"):
        write_triton_repo(tmp_path / "file", model={"dummy": True})
    for model, match in (({"dummy": True, "ckpt": str(tmp_path)}, "exactly one"), ({}, "exactly one"),
                         ({"dummy": True, "colour": 1}, "unknown key"), ({"ckpt": "no/such/dir"}, "no such directory"),
                         ({"dummy": True, "variant": "bogus"}, "variant"), ({"dummy": True, "device": "tpu"}, "device"),
                         ({"dummy": True, "generate_defaults": {"speed": 2}}, "unknown key"),
                         ({"dummy": True, "engine": {"max_batch": 2}}, "unknown key"),
                         ({"ckpt": str(tmp_path), "t3_layers": 2}, "applies to dummy"),
                         ({"ckpt": str(tmp_path), "variant": "nano"}, "lacks files")):
        with pytest.raises(ValueError, match=match):
            write_triton_repo(tmp_path / "new", model=model)
    with pytest.raises(TritonRepoError, match="KIND_CPU"):
        write_triton_repo(tmp_path / "new", model={"dummy": True, "device": "cpu"})
    with pytest.raises(TritonRepoError, match="model_name"):
        write_triton_repo(tmp_path / "new", model={"dummy": True}, model_name="../up")
    assert not (tmp_path / "new").exists()
    assert serving_device({"device": "auto"}, "GPU", "1") == "cuda:1"
    assert serving_device({"device": "cuda"}, "GPU", "2") == "cuda:2"
    assert serving_device({}, "CPU", "0") == "cpu" and serving_device({"device": "cuda:3"}, "GPU", "0") == "cuda:3"


# ------------------------------------------------------------------- a stand-in Python backend


class _TritonError:
    UNKNOWN, INTERNAL, NOT_FOUND, INVALID_ARG, UNAVAILABLE, UNSUPPORTED, ALREADY_EXISTS, CANCELLED = range(8)

    def __init__(self, message, code=1):
        self._message, self._code = message, code

    def message(self):
        return self._message

    def code(self):
        return self._code


class _Tensor:
    def __init__(self, name, array):
        assert isinstance(name, str) and isinstance(array, np.ndarray)
        self._name, self._array = name, array

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array


class _Response:
    def __init__(self, output_tensors=None, error=None):
        self._tensors = list(output_tensors or [])
        self._error = error

    def output_tensors(self):
        return self._tensors

    def has_error(self):
        return self._error is not None

    def error(self):
        return self._error


FINAL = 1


class _Sender:
    """Records (response, flags); a send after the final flag is a contract violation, as in Triton."""

    def __init__(self, request, cancel_after=None):
        self.request, self.cancel_after = request, cancel_after
        self.records, self.violations = [], []
        self.final = threading.Event()
        self.lock = threading.Lock()

    def send(self, response=None, flags=0):
        with self.lock:
            if self.final.is_set():
                self.violations.append((response, flags))
                raise RuntimeError("send after the final flag")
            assert response is not None or flags == FINAL
            self.records.append((response, flags))
            n_audio = sum(1 for r, _ in self.records if r is not None and not r.has_error())
            if self.cancel_after is not None and n_audio >= self.cancel_after:
                self.request.cancelled = True
            if flags & FINAL:
                self.final.set()

    def is_cancelled(self):
        return self.request.cancelled

    # What the test reads.
    def wait(self):
        assert self.final.wait(WAIT_S), "no final flag"
        return self

    def audio(self):
        chunks = []
        for r, _ in self.records:
            if r is not None and not r.has_error():
                out = {t.name(): t.as_numpy() for t in r.output_tensors()}
                assert set(out) == {"audio", "sample_rate"}
                assert out["sample_rate"].dtype == np.int32 and out["sample_rate"].tolist() == [24000]
                assert out["audio"].dtype == np.float32 and out["audio"].ndim == 1 and out["audio"].size > 0
                chunks.append(out["audio"])
        return chunks

    def errors(self):
        return [r.error() for r, _ in self.records if r is not None and r.has_error()]


class _OldSender(_Sender):
    """A response sender without is_cancelled (Triton before 23.10): only the request says."""

    is_cancelled = property()  # getattr(sender, "is_cancelled", None) -> None


class _Request:
    def __init__(self, cancel_after=None, cancelled=False, old_sender=False, **inputs):
        self.cancelled = cancelled
        self.inputs = {}
        for name, value in inputs.items():
            if isinstance(value, np.ndarray):
                arr = value
            elif isinstance(value, (str, bytes)):
                arr = np.array([value.encode() if isinstance(value, str) else value], dtype=np.object_)
            elif isinstance(value, float):
                arr = np.array([value], np.float32)
            else:
                arr = np.array([value], np.int32 if name == "max_new_tokens" else np.int64)
            self.inputs[name] = _Tensor(name, arr)
        self.sender = (_OldSender if old_sender else _Sender)(self, cancel_after)
        self.senders_given = 0

    def get_response_sender(self):
        self.senders_given += 1
        return self.sender

    def is_cancelled(self):
        return self.cancelled


def _stub_pb_utils():
    m = types.ModuleType("triton_python_backend_utils")
    m.Tensor, m.InferenceResponse, m.TritonError = _Tensor, _Response, _TritonError
    m.TRITONSERVER_RESPONSE_COMPLETE_FINAL = FINAL
    m.get_input_tensor_by_name = lambda request, name: request.inputs.get(name)
    m.using_decoupled_model_transaction_policy = \
        lambda config: bool(config.get("model_transaction_policy", {}).get("decoupled"))

    class TritonModelException(Exception):
        pass

    class Logger:
        lines = []

        @classmethod
        def log_info(cls, msg):
            cls.lines.append(("info", msg))

        @classmethod
        def log_warn(cls, msg):
            cls.lines.append(("warn", msg))

    m.TritonModelException, m.Logger = TritonModelException, Logger
    return m


def _load_model_py(model_dir, pb):
    spec = importlib.util.spec_from_file_location(f"triton_model_{id(pb)}", model_dir / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TritonPythonModel


def _args(model_dir, kind="CPU"):
    cfg = json_format.MessageToDict(parse_config(model_dir / "config.pbtxt"), preserving_proto_field_name=True)
    return {"model_config": json.dumps(cfg), "model_instance_kind": kind, "model_instance_device_id": "0",
            "model_repository": str(model_dir), "model_version": "1", "model_name": model_dir.name}


@pytest.fixture(scope="module")
def served(tmp_path_factory, one_thread):
    """model.py initialised under the stand-in backend (dummy Nano, 2-layer T3, on the CPU)."""
    root = tmp_path_factory.mktemp("triton")
    (root / "voices").mkdir()
    model_dir = write_triton_repo(root / "repo", model={**SPEC, "library": str(root / "voices")}, max_batch=4,
                                  instance_kind="KIND_CPU")
    pb = _stub_pb_utils()
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "triton_python_backend_utils", pb)
        cls = _load_model_py(model_dir, pb)
        model = cls()
        model.initialize(_args(model_dir))
        yield model
        model.finalize()


@pytest.fixture(scope="module")
def reference(one_thread):
    """An identical model built separately, with its own engine."""
    tts = TTS.from_dummy("nano", seed=0, device="cpu", **smaller_backbone("nano", num_layers=2))
    with tts.engine(max_batch=4, **ENGINE) as eng:
        yield eng


def _wait_for(cond, timeout=WAIT_S):
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.02)


def test_initialize_reads_the_spec(served):
    assert served.tts.variant == "nano" and served.tts.device.type == "cpu" and served.streaming
    assert served.engine.max_batch == 4 and served.engine.max_len >= 640  # rounded up by the runner
    assert served.generate_defaults == GENERATE
    assert any("chatterbox" in msg for _, msg in type(served).pb_utils.Logger.lines)


def test_two_concurrent_streams_give_the_engines_audio(served, reference):
    reqs = [_Request(text=t, seed=s) for t, s in TEXTS]
    t0 = time.perf_counter()
    assert served.execute(reqs) is None
    returned_s = time.perf_counter() - t0
    assert not any(r.sender.final.is_set() for r in reqs)  # execute returned while both still run
    refs = [reference.submit(t, seed=s, stream=True, **GENERATE) for t, s in TEXTS]
    for req, ref in zip(reqs, refs, strict=True):
        s = req.sender.wait()
        assert req.senders_given == 1 and not s.violations and not s.errors()
        chunks = s.audio()
        assert len(chunks) >= 1 and len(s.records) == len(chunks) + 1
        assert s.records[-1] == (None, FINAL) and all(f == 0 for _, f in s.records[:-1])
        audio = torch.from_numpy(np.concatenate(chunks))[None]
        want = ref.result(WAIT_S)
        assert torch.isfinite(audio).all() and audio.shape == want.shape
        assert torch.equal(audio, want)  # bit for bit the engine's streamed audio for that seed
    assert returned_s < 2.0
    assert max(len(r.sender.audio()) for r in reqs) >= 2  # streamed as produced, not in one piece


def test_cancelled_requests_stop_early_with_a_final_flag(served):
    long = _Request(text="A long one that the client gives up on.", seed=3, max_new_tokens=200, cancel_after=1)
    old = _Request(text="Another, seen through request.is_cancelled.", max_new_tokens=200, cancel_after=1,
                   old_sender=True)
    early = _Request(text="Cancelled before it starts.", cancelled=True)
    served.execute([long, old, early])
    for req in (long, old, early):
        s = req.sender.wait()
        assert not s.violations and s.records[-1][1] == FINAL
        (err,) = s.errors()
        assert err.code() == _TritonError.CANCELLED and "cancelled" in err.message()
    for req in (long, old):
        n = sum(c.size for c in req.sender.audio())
        assert 0 < n < 200 * 960  # stopped long before its 200 tokens
    assert early.sender.audio() == []
    _wait_for(lambda: served.engine.stats()["running"] == 0)
    assert served.engine.stats()["cancelled"] >= 2 and served.engine.stats()["slots_in_use"] == 0


@pytest.mark.parametrize("inputs, code, match", [
    (dict(text=""), "INVALID_ARG", "text is empty"),
    (dict(text="   "), "INVALID_ARG", "text is empty"),
    (dict(text="Hi.", voice="nobody"), "INVALID_ARG", "no voice named 'nobody'"),
    (dict(text="Hi.", voice="../../etc/passwd"), "INVALID_ARG", "invalid voice name"),
    (dict(voice="default"), "INVALID_ARG", "'text' is required"),
    (dict(text=np.array([b"a", b"b"], dtype=np.object_)), "INVALID_ARG", r"one element"),
    (dict(text=b"\xff\xfe"), "INVALID_ARG", "not UTF-8"),
    (dict(text="Hi.", temperature=math.nan), "INVALID_ARG", "finite"),
    (dict(text="Hi.", temperature=0.0), "INVALID_ARG", "temperature"),
    (dict(text="Hi.", exaggeration=50.0), "INVALID_ARG", "exaggeration"),
    (dict(text="Hi.", max_new_tokens=0), "INVALID_ARG", "max_new_tokens"),
    (dict(text="Hi.", seed=np.array([1.5], np.float32)), "INVALID_ARG", "integer"),
])
def test_bad_input_is_a_triton_error_flagged_final(served, inputs, code, match):
    req = _Request(**inputs)
    assert served.execute([req]) is None
    s = req.sender.wait()
    assert len(s.records) == 1 and not s.violations and s.audio() == []
    assert s.records[0][1] == FINAL
    (err,) = s.errors()
    assert err.code() == getattr(_TritonError, code)
    assert re.search(match, err.message()), err.message()
    assert "Traceback" not in err.message() and "\n" not in err.message()


def test_finalize_cancels_running_requests_and_closes_the_engine(served):
    running = _Request(text="Still going when the model unloads.", max_new_tokens=200, cancel_after=None)
    served.execute([running])
    _wait_for(lambda: served.engine.stats()["running"] >= 1)
    served.finalize()
    assert running.sender.final.is_set()  # finalize waited for its final response
    (err,) = running.sender.errors()
    assert err.code() == _TritonError.UNAVAILABLE and "unload" in err.message()
    assert served.engine._closed and not served._streams
    after = _Request(text="Too late.")
    served.execute([after])
    (err,) = after.sender.wait().errors()
    assert err.code() == _TritonError.UNAVAILABLE


def test_initialize_refuses_a_config_that_is_not_decoupled(tmp_path, monkeypatch):
    model_dir = write_triton_repo(tmp_path / "repo", model={"dummy": True, "device": "cpu"}, instance_kind="KIND_CPU")
    pb = _stub_pb_utils()
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    args = _args(model_dir)
    cfg = json.loads(args["model_config"])
    cfg.pop("model_transaction_policy")
    with pytest.raises(pb.TritonModelException, match="decoupled"):
        _load_model_py(model_dir, pb)().initialize({**args, "model_config": json.dumps(cfg)})


# ------------------------------------------------------------------------------------------- CLI


def test_cli_writes_the_repository(tmp_path, capsys):
    repo = tmp_path / "repo"
    assert main(["export", "--dummy-weights", "--variant", "nano", "--triton-repo", str(repo)]) == 0
    assert "tritonserver --model-repository" in capsys.readouterr().out
    cfg = parse_config(repo / "chatterbox" / "config.pbtxt")
    assert cfg.backend == "python" and cfg.model_transaction_policy.decoupled
    assert [g.kind for g in cfg.instance_group] == [1]  # KIND_GPU (--device auto)
    spec = read_spec(repo / "chatterbox" / "1")
    assert spec["model"]["dummy"] is True and spec["model"]["variant"] == "nano"
    assert spec["model"]["generate_defaults"] == {"max_new_tokens": 50}
    assert not (repo / "manifest.json").exists()  # no ONNX export without --out
    # Again into our own repository, now for a CPU instance with a 2-layer T3.
    assert main(["export", "--dummy-weights", "--variant", "nano", "--t3-layers", "2", "--device", "cpu",
                 "--triton-repo", str(repo)]) == 0
    assert [g.kind for g in parse_config(repo / "chatterbox" / "config.pbtxt").instance_group] == [2]
    assert read_spec(repo / "chatterbox" / "1")["model"]["t3_layers"] == 2

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for name in ("t3_turbo_v1.safetensors", "s3gen_meanflow.safetensors", "ve.safetensors"):
        (ckpt / name).write_bytes(b"")
    assert main(["export", "--ckpt", str(ckpt), "--triton-repo", str(tmp_path / "r2")]) == 2
    assert "lacks files" in capsys.readouterr().err and not (tmp_path / "r2").exists()
    (ckpt / "tokenizer.json").write_text("{}")
    assert main(["export", "--ckpt", str(ckpt), "--triton-repo", str(tmp_path / "r2")]) == 0
    assert read_spec(tmp_path / "r2" / "chatterbox" / "1")["model"] == {"ckpt": str(ckpt.resolve()), "device": "auto",
                                                                        "backend": "torch"}


def test_cli_refuses_a_foreign_directory_and_onnx_options(tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["export", "--dummy-weights", "--triton-repo", str(foreign)]) == 2
    err = capsys.readouterr().err
    assert "not empty and is not a Chatterbox model repository" in err and "--force" in err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    assert main(["export", "--dummy-weights", "--triton-repo", str(foreign), "--force"]) == 0
    assert (foreign / "notes.txt").read_text() == "mine" and (foreign / "chatterbox" / "config.pbtxt").is_file()
    assert main(["export", "--dummy-weights", "--precision", "int8", "--triton-repo", str(tmp_path / "x")]) == 2
    assert "give --out DIR too" in capsys.readouterr().err
    assert main(["export", "--dummy-weights", "--device", "tpu", "--triton-repo", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit) as e:
        main(["export", "--dummy-weights"])
    assert e.value.code == 2 and "--out" in capsys.readouterr().err


def test_cli_with_out_serves_the_fresh_bundle(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    args = ["export", "--dummy-weights", "--variant", "nano", "--t3-layers", "1", "--components", "t3"]
    assert main([*args, "--out", str(tmp_path / "b0"), "--triton-repo", str(foreign)]) == 2
    assert "not a Chatterbox model repository" in capsys.readouterr().err
    assert not (tmp_path / "b0").exists()  # refused before anything was exported
    bundle, repo = tmp_path / "bundle", tmp_path / "repo"
    assert main([*args, "--out", str(bundle), "--triton-repo", str(repo), "--device", "cpu"]) == 0
    assert (bundle / "manifest.json").is_file()
    spec = read_spec(repo / "chatterbox" / "1")
    assert spec["model"] == {"bundle": str(bundle.resolve()), "device": "cpu", "backend": "onnxruntime"}
    assert spec["instance_kind"] == "KIND_CPU"
    assert [g.kind for g in parse_config(repo / "chatterbox" / "config.pbtxt").instance_group] == [2]
