"""Which model a session's tokens belong to: a record written under another model is never rebuilt here.

Token ids only mean something under the vocabulary that produced them, and the sinks + tail layout only
under the cache shape that kept them; another configuration sharing the same Redis (another model, a
retrained tokenizer, a different sink count or window) must refuse such a session rather than prefill
foreign ids. The identity is readable, so the refusal can say what differs.
"""

from __future__ import annotations

import hashlib
from typing import Any

from streaming_core.config import CacheConfig


def vocab_fingerprint(tokenizer: Any) -> str:
    """12 hex digits of sha256 over the (token, id) pairs, added and special tokens included."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    digest = hashlib.sha256()
    for token, index in vocab:
        digest.update(f"{index}\t{token}\n".encode())
    return digest.hexdigest()[:12]


def model_identity(model_name: str, tokenizer: Any, cache: CacheConfig) -> str:
    """e.g. 'SmolLM2-135M-Instruct vocab=3f9c0a1b2c4d sinks=4 window=1020'."""
    fp = vocab_fingerprint(tokenizer)
    return f"{model_name} vocab={fp} sinks={cache.sink_tokens} window={cache.window}"
