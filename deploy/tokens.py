"""The router tokenises each text prompt once, off its event loop, and forwards the ids with the text.

The selector's features read those ids (no second tokenisation in the selector), and a worker given ids never
tokenises the text again (`Engine.encode`). Ids go only to pools whose tokenizer is the router's; a pool with
another tokenizer gets the text alone and tokenises it itself. The learnt selector runs on the same thread
(`off_loop`): its features read the whole prompt, and decode an ids-only one for its text.

>>> tokens = PromptTokens("metaspec/checkpoints/target")
>>> request = await tokens.tokenised(Request(prompt="def f(x):"))      # prompt and prompt_ids both set
>>> tokens.for_pool(request, "metaspec/checkpoints/target").prompt_ids
(734, 284, 11, 91, 409)
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from metaspec.workers.request import Request

T = TypeVar("T")


class PromptTokens:
    """The pools' shared tokenizer in the router: loaded once (on first use), run on one thread of its own."""

    def __init__(self, path: str, tokenizer: Any = None) -> None:
        self.path = path                                  # the tokenizer directory or hub id (first pool's)
        self._tokenizer = tokenizer
        self._lock = threading.Lock()
        # One thread: tokenising stays off the event loop, and one HF tokenizer is never entered concurrently.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="router-tokenize")

    def tokenizer(self) -> Any:
        """The tokenizer, loaded on first call (blocking: call it off the event loop)."""
        with self._lock:
            if self._tokenizer is None:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(self.path)
            return self._tokenizer

    def warm(self) -> None:
        """Start loading the tokenizer on its thread now, so the first request does not wait for it."""
        self._thread.submit(self.tokenizer)

    def encode(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer().encode(text, add_special_tokens=False))

    async def tokenised(self, request: Request) -> Request:
        """`request` with `prompt_ids` set from its text (as is when it already has ids)."""
        if request.prompt_ids is not None or request.prompt is None:
            return request
        return dataclasses.replace(request, prompt_ids=await self.off_loop(self.encode, request.prompt))

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the tokenizer's thread (the learnt selector's features decode ids-only prompts there)."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def for_pool(self, request: Request, pool_tokenizer: str) -> Request:
        """What a pool is sent: the ids too when it tokenises like the router, else the text alone."""
        if request.prompt is None or request.prompt_ids is None or pool_tokenizer == self.path:
            return request
        return dataclasses.replace(request, prompt_ids=None)

    def close(self) -> None:
        self._thread.shutdown(wait=False)
