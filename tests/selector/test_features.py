"""Request and pool features: deterministic, of fixed keys and order, and telling prompts apart as intended."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from metaspec.selector.features import (POOL_FEATURES, REQUEST_FEATURES, RequestInput, ngram_repetition,
                                        pool_features, request_features, tail_repetition)

CODE = "def add(a, b):\n    return a + b\n\nclass Foo:\n    def bar(self):\n        return {'x': [1, 2]}\n"
PROSE = "The committee met on Tuesday. Everyone agreed that the proposal deserved another careful reading."


def _inp(text: str, ids=None, **kw) -> RequestInput:
    return RequestInput(prompt_ids=ids if ids is not None else [ord(c) for c in text], prompt_text=text, **kw)


def test_same_input_same_features_in_another_process():
    inp = _inp(CODE, max_tokens=77, temperature=0.7, top_p=0.9)
    here = request_features(inp)
    code = ("import json; from metaspec.selector.features import RequestInput, request_features; "
            f"print(json.dumps(request_features(RequestInput({list(inp.prompt_ids)!r}, {CODE!r}, 77, 0.7, 0.9))))")
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    import json
    assert json.loads(there) == here
    assert request_features(inp) == here


def test_keys_are_fixed_and_finite():
    for inp in (_inp(CODE), _inp(PROSE), _inp("x", ids=[7]), _inp("", ids=[1, 2])):
        feats = request_features(inp)
        assert tuple(feats) == REQUEST_FEATURES
        assert all(np.isfinite(v) for v in feats.values())


def test_repetition_counts_earlier_ngrams():
    assert ngram_repetition(np.array([1, 2, 3, 4]), 1) == 0.0
    assert ngram_repetition(np.array([1, 2, 1, 2, 1]), 2) == 0.5          # windows 12 21 12 21: two repeats of four
    assert ngram_repetition(np.array([5, 5, 5, 5]), 3) == 0.5
    assert ngram_repetition(np.array([9]), 1) == 0.0
    assert tail_repetition(np.array([1, 2, 3, 1, 2, 3]), 3) == 0.25       # 123 231 312 123: the last repeats
    motif = request_features(_inp("ab" * 50, ids=[3, 4, 5, 6] * 25))
    noise = request_features(_inp("ab" * 50, ids=list(range(100))))
    assert motif["rep3"] > 0.9 and noise["rep3"] == 0.0


def test_text_statistics_separate_code_from_prose():
    code, prose = request_features(_inp(CODE)), request_features(_inp(PROSE))
    assert code["code_punct"] > prose["code_punct"]
    assert code["indent_lines"] > 0.3 and prose["indent_lines"] == 0.0
    assert code["code_words"] > prose["code_words"]
    math = request_features(_inp("How many apples? 12 + 30 = 42, so calculate 42 * 3 / 7 percent."))
    assert math["digits"] > prose["digits"] and math["operators"] > prose["operators"]
    assert request_features(_inp("Übersetze: Grüße aus Köln"))["non_ascii"] > 0


def test_sampling_fields_and_hook():
    feats = request_features(_inp(PROSE, max_tokens=128, temperature=0.8, top_p=0.5, has_constraint=True),
                             ngram_hit_rate=lambda ids: 0.25)
    assert feats["temperature"] == 0.8 and feats["greedy"] == 0.0 and feats["top_p"] == 0.5
    assert feats["has_constraint"] == 1.0 and feats["ngram_table_hit"] == 0.25
    assert feats["max_tokens_log"] == np.log1p(128)
    assert request_features(_inp(PROSE))["ngram_table_hit"] == 0.0


def test_pool_features():
    a100 = pool_features({"accelerator": "A100", "mem_gb": 80, "rel_speed": 8.0, "cores": 12, "devices": 2}, 0.5)
    assert tuple(a100) == POOL_FEATURES
    assert a100["pool_accel=A100"] == 1.0 and sum(v for k, v in a100.items() if k.startswith("pool_accel=")) == 1
    assert a100["pool_load"] == 0.5 and a100["pool_rel_speed"] == 8.0 and a100["pool_devices"] == 2
    assert pool_features({"accelerator": "TPU-v9"}, 0.0)["pool_accel=other"] == 1.0
    assert pool_features({}, 0.0)["pool_accel=cpu"] == 1.0


def test_ngram_tail_hit_rate_reads_the_shared_table():
    from metaspec.selector.features import ngram_tail_hit_rate
    from metaspec.workers.store import NgramConfig, NgramTable

    table = NgramTable(NgramConfig(), vocab_size=100)
    hook = ngram_tail_hit_rate(table, order=3, tail=4)
    assert hook([1, 2, 3, 4, 5, 6]) == 0.0                          # cold table
    table.learn([], [1, 2, 3, 4, 5, 6, 7])
    assert hook([1, 2, 3, 4, 5, 6]) == 1.0                          # every tail context was learned
    assert hook([9, 9, 9, 1, 2, 3]) == 0.25                         # only (1, 2, 3) is known
    assert hook([1, 2]) == 0.0
    assert request_features(_inp("x", ids=[9, 9, 9, 1, 2, 3]), ngram_hit_rate=hook)["ngram_table_hit"] == 0.25
