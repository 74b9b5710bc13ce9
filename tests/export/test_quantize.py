"""--precision int8 / int4: T3's weight matrices as MatMulNBits, the error measured and recorded,
and the quantised bundle runs through the same onnxruntime T3."""
import json

import pytest
import torch

from chatterbox_rt import TTS
from chatterbox_rt.export import export
from chatterbox_rt.models.t3.config import smaller_backbone

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def model():
    return TTS.from_dummy("chatterbox", seed=0, device="cpu", **smaller_backbone("chatterbox", num_layers=2))


@pytest.mark.parametrize("bits,bound", [(8, 0.05), (4, 0.5)])
def test_quantised_t3(model, tmp_path, bits, bound):
    out = tmp_path / f"int{bits}"
    m = export(model, out, components=["t3"], precision=f"int{bits}")
    data = json.loads((out / "manifest.json").read_text())
    assert data["precision"] == f"int{bits}"
    for name in ("t3_prefill", "t3_decode"):
        g = data["graphs"][name]
        assert g["precision"] == f"int{bits}" and g["check"]["bits"] == bits
        assert 0 < g["check"]["max_rel_error"] < bound, g["check"]
    import onnx

    ops = {n.op_type for n in onnx.load(str(out / "t3_decode.onnx"), load_external_data=False).graph.node}
    assert "MatMulNBits" in ops
    # the quantised graphs run in the onnxruntime T3, close to torch
    from chatterbox_rt.export.ort_backend import _extras, _prefixed
    from chatterbox_rt.export.ort_t3 import OrtT3

    ort_t3 = OrtT3.load(out, m.component("t3")["config"], _prefixed(_extras(out, m), "t3."))
    # a quantised prefill keeps onnxruntime's packing (unpacked MatMulNBits is ~2.5x slower; the
    # fp32 prefill runs unpacked from the mapped file: test_bundle.py)
    with pytest.raises(RuntimeError, match="does not have configuration"):
        ort_t3._prefill_sess.get_session_options().get_session_config_entry("session.disable_prepacking")
    v = model.builtin_voice
    ids = model.text_tokens("Hello there, quantised world.")
    from chatterbox_rt.models.t3.request import T3Request

    logits = []
    for t3 in (model.t3, ort_t3):
        r = T3Request(t3, v.t3, ids, max_new_tokens=4, temperature=0.05, top_k=1, stop_on_eos=False)
        logits.append(t3.prefill(r.embeds(), None, max_len=r.cache_len).detach())
    err = float((logits[1] - logits[0]).abs().max() / logits[0].abs().max())
    assert err < bound
    tokens = ort_t3.generate(v.t3, ids, max_new_tokens=4, stop_on_eos=False, temperature=0.05, top_k=1)
    assert tokens.numel() == 4


def test_export_refuses_a_quantised_t3(tmp_path):
    q = TTS.from_dummy("chatterbox", seed=0, device="cpu", precision="int8",
                       **smaller_backbone("chatterbox", num_layers=2))
    with pytest.raises(ValueError, match="export needs T3's fp32 weights.*precision='fp32'"):
        export(q, tmp_path / "x", components=["t3"])
    assert not (tmp_path / "x").exists()
