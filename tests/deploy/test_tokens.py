"""The router's one tokenisation per request (deploy/tokens.py), with the tiny pair's real tokenizer."""

from __future__ import annotations

import asyncio
import threading

from metaspec.deploy.tokens import PromptTokens
from metaspec.workers.request import Request


def test_the_router_tokenises_off_its_event_loop_like_the_engine(tiny_pair):
    from transformers import AutoTokenizer

    tokens = PromptTokens(tiny_pair.target)
    tokens.warm()
    seen: list[str] = []
    encode = tokens.encode

    def recorded(text: str) -> tuple[int, ...]:
        seen.append(threading.current_thread().name)
        return encode(text)

    tokens.encode = recorded

    async def run() -> tuple[Request, Request, str]:
        text = await tokens.tokenised(Request(prompt="def add(a, b):"))
        ids = await tokens.tokenised(Request(prompt_ids=(5, 6)))
        assert (await tokens.off_loop(lambda: threading.current_thread().name)).startswith("router-tokenize")
        return text, ids, threading.current_thread().name

    got, untouched, loop_thread = asyncio.run(run())
    want = AutoTokenizer.from_pretrained(tiny_pair.target).encode("def add(a, b):", add_special_tokens=False)
    assert got.prompt == "def add(a, b):" and got.prompt_ids == tuple(want)       # the text stays (features)
    assert untouched == Request(prompt_ids=(5, 6)) and len(seen) == 1             # ids are never re-made
    assert seen[0].startswith("router-tokenize") and seen[0] != loop_thread
    assert tokens.for_pool(got, tiny_pair.target) is got                           # same tokenizer: ids go too
    assert tokens.for_pool(got, "/another/tokenizer") == Request(prompt="def add(a, b):")   # else the text alone
    tokens.close()
