"""``POST /v1/audio/voice-conversion``'s form: multipart fields -> ``VC.generate`` keywords.

OpenAI's API has no voice conversion, so this route is our own, shaped like its audio routes: a
multipart form (as ``/v1/audio/transcriptions`` and our ``POST /v1/audio/voices``), the answer the
audio bytes in ``response_format``, errors in the API's error shape naming the field.

Fields: ``file`` (the source speech, required); the target as ``voice`` (a voice id, as
``/v1/audio/speech`` takes it; default the checkpoint's built-in voice) or as one or more
``target`` file fields (clips of the target speaker: embeddings averaged, the prompt from the
longest), not both; the controls of ``VC.generate`` (``prune_tokens``, ``speaker_strength``,
``flow_cfg_rate``, ``guidance_ramp`` and ``speaker_ramp`` as ``START:END``, ``pitch_match``,
``pitch_tolerance``, ``max_pitch_shift``, ``post``); ``seed``, ``n_steps``, ``watermark``;
``response_format`` (as the speech route, default ``wav``). An unknown field is a 400 naming it.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from .encode import check_serve_format

ROUTE = "/v1/audio/voice-conversion"
DEFAULT_FORMAT = "wav"  # a conversion is usually a file kept for later, so lossless by default
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class FormError(ValueError):
    """A bad form field: ``param`` names it."""

    def __init__(self, message: str, param: Optional[str]):
        super().__init__(message)
        self.param = param


def _int(name: str, v: str) -> int:
    try:
        return int(v)
    except ValueError:
        raise FormError(f"{name} must be an integer, got {v!r}", name) from None


def _float(name: str, v: str) -> float:
    try:
        return float(v)
    except ValueError:
        raise FormError(f"{name} must be a number, got {v!r}", name) from None


def _bool(name: str, v: str) -> bool:
    s = v.strip().lower()
    if s in TRUE:
        return True
    if s in FALSE:
        return False
    raise FormError(f"{name} must be true or false, got {v!r}", name)


def _ramp(name: str, v: str) -> tuple[float, float]:
    parts = v.split(":")
    if len(parts) != 2:
        raise FormError(f"{name} must be START:END (e.g. 1.0:0.5), got {v!r}", name)
    return _float(name, parts[0]), _float(name, parts[1])


def _post(name: str, v: str) -> Optional[str]:
    return None if v.strip().lower() in ("", "none") else v


# field -> (VC.generate keyword, parser); every other text field is refused
CONTROL_FIELDS: dict[str, Callable[[str, str], Any]] = {
    "prune_tokens": _int, "speaker_strength": _float, "flow_cfg_rate": _float,
    "guidance_ramp": _ramp, "speaker_ramp": _ramp, "pitch_match": _bool,
    "pitch_tolerance": _float, "max_pitch_shift": _float, "post": _post,
    "seed": _int, "n_steps": _int, "watermark": _bool,
}
OTHER_FIELDS = ("file", "target", "voice", "response_format", "model")


def parse_form(form) -> tuple[Any, list, Optional[str], dict, str]:
    """A starlette ``FormData`` -> ``(source upload, target uploads, voice id or None, keywords,
    response_format)``. Raises :class:`FormError` on a missing, unknown or malformed field."""
    for key in form.keys():
        if key not in CONTROL_FIELDS and key not in OTHER_FIELDS:
            raise FormError(f"unknown field {key!r}", key)
    sources = form.getlist("file")
    if len(sources) != 1 or isinstance(sources[0], str):
        raise FormError("give the source speech as exactly one multipart file field 'file'", "file")
    targets = form.getlist("target")
    if any(isinstance(t, str) for t in targets):
        raise FormError("'target' must be an uploaded clip (a multipart file field); give a voice id as 'voice'",
                        "target")
    voice = form.get("voice")
    if voice is not None and not isinstance(voice, str):
        raise FormError("'voice' is a voice id; upload target clips as 'target'", "voice")
    if voice and targets:
        raise FormError("give the target either as 'voice' (an id) or as 'target' clips, not both", "voice")
    kw = {}
    for key, parse in CONTROL_FIELDS.items():
        values = form.getlist(key)
        if len(values) > 1:
            raise FormError(f"field {key!r} is given {len(values)} times", key)
        if values:
            if not isinstance(values[0], str):
                raise FormError(f"field {key!r} must be a text field, not a file", key)
            kw[key] = parse(key, values[0])
    fmt = form.get("response_format") or DEFAULT_FORMAT
    try:
        fmt = check_serve_format(fmt)
    except ValueError as e:
        raise FormError(str(e), "response_format") from None
    return sources[0], targets, voice or None, kw, fmt


def param_of(message: str, given=()) -> Optional[str]:
    """The field a ``VC.generate`` error is about, for the error's ``param``: of the fields the
    request set, the one the message names first (then any control it names, then the clips)."""
    for pool in (list(given), list(CONTROL_FIELDS)):
        hits = [(message.find(name), name) for name in pool if name in message]
        if hits:
            return min(hits)[1]
    low = message.lower()
    if "target" in low:
        return "target"
    if "source" in low:
        return "file"
    return None
