"""A reference T3 and ours with identical random weights (parity tests): the builders live in
``chatterbox_rt.profiling.upstream`` (shared with ``chatterbox-rt bench --compare-upstream``)."""
from chatterbox_rt.profiling.upstream import (  # noqa: F401
    REDUCED,
    REF_BACKBONE,
    build_t3_pair,
    cond_tensors,
    our_cond,
    ref_cond,
    ref_hp,
    text_tokens,
)
from chatterbox_rt.profiling.upstream import our_t3_config as our_config  # noqa: F401

build_pair = build_t3_pair


def ref_prefill_logits(ref_model, cond, text):
    """The reference's own first-step logits [B, V], computed the way its inference methods do."""
    import torch

    if ref_model.is_gpt:
        start = ref_model.hp.start_speech_token * torch.ones_like(text[:1])[None]
        embeds, _ = ref_model.prepare_input_embeds(t3_cond=cond, text_tokens=text[None], speech_tokens=start,
                                                   cfg_weight=0.0)
        hidden = ref_model.tfmr(inputs_embeds=embeds, use_cache=True)[0]
        return ref_model.speech_head(hidden[:, -1:])[:, -1]
    from chatterbox.models.t3.inference.t3_hf_backend import T3HuggingfaceBackend

    tt = torch.stack([text, text])
    start = ref_model.hp.start_speech_token * torch.ones_like(tt[:, :1])
    embeds, _ = ref_model.prepare_input_embeds(t3_cond=cond, text_tokens=tt, speech_tokens=start, cfg_weight=0.5)
    bos = ref_model.speech_emb(start[:1]) + ref_model.speech_pos_emb.get_fixed_embedding(0)
    embeds = torch.cat([embeds, torch.cat([bos, bos])], dim=1)
    backend = T3HuggingfaceBackend(config=ref_model.cfg, llama=ref_model.tfmr, speech_enc=ref_model.speech_emb,
                                   speech_head=ref_model.speech_head)
    out = backend(inputs_embeds=embeds, past_key_values=None, use_cache=True, output_hidden_states=True,
                  return_dict=True)
    return out.logits[:, -1]


def our_prefill_logits(model, tensors: dict, text):
    """Our T3's first-step logits [B, V] for the same conditioning and text (CFG as configured)."""
    embeds, _ = model.prompt_embeds(our_cond(tensors), text, cfg=model.config.uses_cfg)
    return model.prefill(embeds)
