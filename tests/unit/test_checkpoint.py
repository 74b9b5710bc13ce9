"""Loading T3 by the official file names, and the errors a user sees when that fails."""
import pytest
import torch
from safetensors.torch import save_file

from chatterbox_rt import cli
from chatterbox_rt.checkpoint import CheckpointError, detect_variant, load_into, load_t3, read_state_dict, t3_file
from chatterbox_rt.models.t3 import T3

from test_t3 import make_cond, make_text, small_config, small_model


def contiguous(sd):
    return {k: v.contiguous() for k, v in sd.items()}


def save_small(tmp_path, variant, filename, seed=0):
    m = small_model(variant, seed=seed)
    save_file(contiguous(m.state_dict()), str(tmp_path / filename))
    return m


def load_small(tmp_path, variant, **kw):
    """load_t3 with the reduced config the files were written with."""
    path = t3_file(tmp_path, variant)
    model = T3(small_config(variant))
    load_into(model, read_state_dict(path), str(path))
    return model.eval()


@pytest.mark.parametrize("variant, filename", [
    ("chatterbox", "t3_cfg.safetensors"),
    ("multilingual", "t3_mtl23ls_v2.safetensors"),
    ("multilingual", "t3_mtl23ls_v3.safetensors"),
    ("turbo", "t3_turbo_v1.safetensors"),
    ("nano", "t3_nano_v1.safetensors"),
])
def test_variant_detected_from_file_names_and_weights_round_trip(tmp_path, variant, filename):
    m = save_small(tmp_path, variant, filename)
    assert detect_variant(tmp_path) == variant
    loaded = load_small(tmp_path, variant)
    cfg = m.config
    cond, text = make_cond(cfg), make_text(cfg)
    with torch.inference_mode():
        a = m.generate(cond, text, max_new_tokens=6, generator=torch.Generator().manual_seed(0))
        b = loaded.generate(cond, text, max_new_tokens=6, generator=torch.Generator().manual_seed(0))
    assert a.tolist() == b.tolist()


def test_wrapped_pt_state_dict_loads(tmp_path):
    m = small_model("nano")
    torch.save({"model": [m.state_dict()]}, tmp_path / "t3_nano_v1.pt")
    sd = read_state_dict(tmp_path / "t3_nano_v1.pt")
    assert set(sd) == set(m.state_dict())


def test_full_size_load_t3_from_directory(tmp_path):
    """The public loader at real shapes (Nano is the smallest variant)."""
    m = T3.from_dummy("nano", seed=3)
    save_file(contiguous(m.state_dict()), str(tmp_path / "t3_nano_v1.safetensors"))
    loaded = T3.from_local(tmp_path)
    assert loaded.config.variant == "nano"
    assert list(m.state_dict()) == list(loaded.state_dict())
    for (k, a), (_, b) in zip(m.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_missing_directory_and_file_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        detect_variant(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no T3 checkpoint.*t3_cfg.safetensors"):
        detect_variant(tmp_path)
    with pytest.raises(CheckpointError, match="t3_turbo_v1.safetensors"):
        load_t3(tmp_path, variant="turbo")


def test_several_variants_need_an_explicit_choice(tmp_path):
    save_small(tmp_path, "nano", "t3_nano_v1.safetensors")
    save_small(tmp_path, "turbo", "t3_turbo_v1.safetensors")
    with pytest.raises(CheckpointError, match="several variants"):
        detect_variant(tmp_path)


def test_key_and_shape_errors_list_what_is_wrong(tmp_path):
    m = small_model("nano")
    sd = contiguous(m.state_dict())
    sd.pop("tfmr.ln_f.weight")
    sd["tfmr.extra.weight"] = torch.zeros(3)
    sd["speech_emb.weight"] = torch.zeros(10, 768)
    target = T3(small_config("nano"))
    with pytest.raises(CheckpointError) as e:
        load_into(target, sd, "t3_nano_v1.safetensors")
    msg = str(e.value)
    assert "t3_nano_v1.safetensors" in msg
    assert "missing keys (1): tfmr.ln_f.weight" in msg
    assert "unexpected keys (1): tfmr.extra.weight" in msg
    assert "speech_emb.weight: checkpoint has [10, 768], model expects [6563, 768]" in msg


def test_corrupt_file_is_reported(tmp_path):
    (tmp_path / "t3_cfg.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*t3_cfg.safetensors"):
        read_state_dict(tmp_path / "t3_cfg.safetensors")


def test_unused_gpt2_table_is_accepted_but_not_stored():
    """Turbo/Nano checkpoints carry GPT-2's token table; it loads strictly, costs no memory, and
    state_dict() still lists it with its shape."""
    m = small_model("turbo")
    sd = m.state_dict()
    assert tuple(sd["tfmr.wte.weight"].shape) == (64, m.config.hidden_size)
    assert sd["tfmr.wte.weight"].stride() == (0, 0)
    assert not any(n.startswith("tfmr.wte") for n, _ in m.named_parameters())
    bad = dict(sd, **{"tfmr.wte.weight": torch.zeros(3, 3)})
    with pytest.raises(RuntimeError, match="tfmr.wte.weight"):
        m.load_state_dict(bad)


def test_cli_demo_runs_and_reports(capsys):
    assert cli.main(["demo", "--variant", "nano", "--tokens", "3", "--threads", "2"]) == 0
    out = capsys.readouterr().out
    assert "[nano]" in out and "tokens/s" in out and "random weights" in out


def test_cli_bad_checkpoint_is_a_clean_error(tmp_path, capsys):
    assert cli.main(["demo", "--ckpt", str(tmp_path)]) == 2
    assert "no T3 checkpoint" in capsys.readouterr().err
