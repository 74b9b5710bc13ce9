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
