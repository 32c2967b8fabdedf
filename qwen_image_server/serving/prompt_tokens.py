"""Prompt length in the model's own tokens, and the limit every generate-style route checks.

QwenImagePipeline tokenizes the prompt (inside its chat template) truncated to
`tokenizer_max_length` tokens (1024) and silently drops the rest, so a longer prompt would get
an image of part of it. Routes call `ServerContext.check_prompt_length(spec)` before submitting,
which raises 400 `invalid_request_error` naming the field, the count and the limit.
"""

from __future__ import annotations

import copy
import functools
import threading
from typing import Any

from qwen_image_server import errors
from qwen_image_server.engine.types import GenerationSpec


class TokenCounter:
    """A private copy of the pipeline's tokenizer that any number of threads may use at once.

    The engine thread calls the pipeline's own (Rust-backed) tokenizer with padding and
    truncation, which reconfigures it on every call: counting with that same object from another
    thread meanwhile gives wrong counts (truncated at 1058, padded) and can break the running
    batch. The copy is configured once (no truncation, no padding) and after that only encodes,
    which the tokenizers library allows concurrently.
    """

    def __init__(self, tokenizer: Any) -> None:
        from tokenizers import Tokenizer

        self._fast: Tokenizer | None
        if isinstance(tokenizer, Tokenizer):
            # The Rust backend an engine process sent: already the front's own copy.
            self._fast = tokenizer
        elif (backend := getattr(tokenizer, "backend_tokenizer", None)) is not None:
            self._fast = Tokenizer.from_str(backend.to_str())
        else:  # a pure-Python tokenizer: a copy, used by one thread at a time
            self._fast = None
            self._slow = copy.deepcopy(tokenizer)
            self._lock = threading.Lock()
        if self._fast is not None:
            self._fast.no_truncation()
            self._fast.no_padding()

    def count(self, text: str) -> int:
        """Tokens of `text` alone (the template around it adds the same tokens to every prompt)."""
        if self._fast is not None:
            return len(self._fast.encode(text, add_special_tokens=False).ids)
        with self._lock:
            return len(self._slow.encode(text, add_special_tokens=False))


@functools.lru_cache(maxsize=4)
def token_counter(tokenizer: Any) -> TokenCounter:
    """The counter for a pipeline's tokenizer, built once (copying the vocabulary takes ~1 s)."""
    return TokenCounter(tokenizer)


def might_exceed(text: str, limit: int) -> bool:
    """False when `text` surely fits: a byte-level BPE token covers at least one UTF-8 byte."""
    return len(text.encode("utf-8")) > limit


def check_prompt_tokens(counter: TokenCounter, limit: int, spec: GenerationSpec) -> None:
    """Raise InvalidRequest for the first of prompt / negative_prompt longer than `limit` tokens.

    `spec.prompt` is the prompt as the model reads it, language suffix included. CPU work (up to
    a second for a megabyte of text): run it on the THREADS pool.
    """
    for param, text in (("prompt", spec.prompt), ("negative_prompt", spec.negative_prompt)):
        if not might_exceed(text, limit):
            continue
        tokens = counter.count(text)
        if tokens > limit:
            suffix = " (language suffix included)" if param == "prompt" else ""
            raise errors.InvalidRequest(
                f"The {param} is {tokens} tokens long{suffix}; the model reads at most {limit} "
                f"tokens. Shorten it.",
                param=param, code="too_many_tokens")
