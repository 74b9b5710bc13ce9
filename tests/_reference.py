"""Test-only access to the reference implementation (PyPI chatterbox-tts==0.1.7): see
``chatterbox_rt.profiling.upstream``, which holds the import work-arounds and is shared with
``chatterbox-rt bench --compare-upstream``."""
from chatterbox_rt.profiling.upstream import (  # noqa: F401
    GPT2_SMALL_CONFIG_OVERRIDES,
    import_torchaudio_without_native_libs,
    load_reference,
    reference_available,
)

_import_torchaudio_without_native_libs = import_torchaudio_without_native_libs
