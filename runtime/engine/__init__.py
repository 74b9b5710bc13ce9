"""The serving runtime: requests, the scheduler, T3's KV slots and batched decode, S3Gen
batching and streaming (``chatterbox_rt.Engine``; see ``engine.py`` for the threads and
``t3_runner.py`` for batch invariance)."""
from .engine import DEFAULT_CHUNK_TOKENS, DEFAULT_FIRST_CHUNK_TOKENS, Engine, EngineClosed
from .request import Request, RequestCancelled, RequestFailed, RequestMetrics

__all__ = ["Engine", "EngineClosed", "Request", "RequestCancelled", "RequestFailed", "RequestMetrics",
           "DEFAULT_CHUNK_TOKENS", "DEFAULT_FIRST_CHUNK_TOKENS"]
