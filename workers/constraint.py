"""Constrained decoding as a request property, under any arm: an llguidance matcher walks every draft.

Per step the decode loop asks the request's `Constraint` to
  1. `forced(k)`: the tokens the grammar forces next (fixed keys, punctuation): they are the draft
     (fast-forward) and the arm is not asked;
  2. `restrict(draft)`: cut a chain at the first token that leaves the grammar, drop tree nodes whose path leaves;
  3. `mask(logits, draft)`: mask the target's logits [k'+1, V] at every scored position (the matcher is walked
     forward through the draft and rolled back), so verification is exact w.r.t. the masked target;
  4. `commit(verdict)`: feed the emitted tokens to the matcher; when only EOS is left it is emitted at once.

Sampled drafts keep their first disallowed token: the p/q rule rejects it (the masked p is 0) and resamples the
residual (p - q)+, which is what makes the cut lossless. Dropping it and sampling from p would bias the output,
and masking Draft.probs after the drafter sampled from the unmasked q would too, so q is left as drawn.
Under greedy decoding a row is masked only when its raw argmax is disallowed (masking cannot change an allowed
argmax), which saves most bitmask computations.

Grammars compile once per engine (`GrammarCompiler`, an LRU cache keyed by the grammar's hash, failures
included); each request deep-copies the compiled matcher. Errors are request errors, never hangs: a size limit
on the source, llguidance's fuel limits, and a wall-clock limit on the compile (run in its own thread).
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass

import torch

try:  # constraints need it; a replica (or a GPU check) serving free text runs without it
    import llguidance
except ImportError:  # pragma: no cover - llguidance is a declared dependency
    llguidance = None

from .asap import PrefixTrie
from .request import KINDS, ConstraintSpec   # torch-free (the router builds them); re-exported here
from .types import Draft, RequestError, SamplingParams, Verdict

_SHIFTS = torch.arange(8, dtype=torch.uint8)


@dataclass(frozen=True)
class ConstraintConfig:
    max_source_chars: int = 256_000        # longer schemas/grammars are refused
    compile_timeout_s: float = 10.0        # a compile running longer is refused (the thread is abandoned)
    cache_size: int = 512                  # compiled grammars kept (LRU, failures included)
    json_whitespace_flexible: bool = False  # False: JSON with the separators below and no free whitespace
    json_item_separator: str = ", "        # between array items / object members
    json_key_separator: str = ": "         # between a key and its value
    max_grammar_size: int = 500_000        # llguidance's limit on grammar symbols
    fast_forward: bool = True              # draft the tokens the grammar forces
    lazy_greedy_masks: bool = True         # greedy: compute a row's mask only when its argmax is disallowed
    asap_tries: int = 64                   # ASAp prefix tries kept (LRU over prompt x grammar x temperature)


@dataclass(frozen=True)
class Compiled:
    matcher: llguidance.LLMatcher | None   # never advanced; requests deep-copy it
    error: str | None                      # why the grammar was refused (cached like a success)
    compile_s: float                       # wall time of the compile


class GrammarCompiler:
    """One per engine: the llguidance tokenizer (built once, lazily), the compile cache and the ASAp tries."""

    def __init__(self, hf_tokenizer, vocab_size: int, eos_ids: frozenset[int],
                 cfg: ConstraintConfig = ConstraintConfig()) -> None:
        self.hf_tokenizer, self.vocab_size, self.eos_ids, self.cfg = hf_tokenizer, vocab_size, eos_ids, cfg
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[str, Compiled] = OrderedDict()
        self._tries: OrderedDict[tuple, PrefixTrie] = OrderedDict()
        self._compiling: dict[str, Future] = {}   # key -> the result of the compile under way
        self._lock = threading.Lock()

    def with_config(self, cfg: ConstraintConfig) -> GrammarCompiler:
        """A compiler with other settings (its own cache) sharing this one's tokenizer bridge."""
        other = GrammarCompiler(self.hf_tokenizer, self.vocab_size, self.eos_ids, cfg)
        other._tokenizer = self.tokenizer
        return other

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        if self._tokenizer is None:
            import llguidance.hf

            n_vocab = max(self.vocab_size, len(self.hf_tokenizer))
            self._tokenizer = llguidance.hf.from_tokenizer(self.hf_tokenizer, n_vocab=n_vocab,
                                                           eos_token=sorted(self.eos_ids))
        return self._tokenizer

    def compile(self, spec: ConstraintSpec) -> Compiled:
        """The compiled grammar (cached); raises RequestError when it cannot be served.

        The lock guards the cache only: a slow compile holds up the requests that wait for the same grammar (they
        share its result), never those asking for another one or for a cached one.
        """
        with self._lock:
            hit = self._cache.get(spec.key)
            if hit is not None:
                self._cache.move_to_end(spec.key)
            else:
                pending = self._compiling.get(spec.key)
                owner = pending is None
                if owner:
                    pending = self._compiling[spec.key] = Future()
        if hit is None and not owner:
            hit = pending.result()
        elif hit is None:
            try:
                hit = self._compile(spec)
            except BaseException as exc:
                pending.set_exception(exc)
                raise
            finally:
                with self._lock:
                    self._compiling.pop(spec.key, None)
                    if hit is not None:
                        self._cache[spec.key] = hit
                        while len(self._cache) > self.cfg.cache_size:
                            self._cache.popitem(last=False)
            pending.set_result(hit)
        if hit.error is not None:
            raise RequestError(hit.error)
        return hit

    def _compile(self, spec: ConstraintSpec) -> Compiled:
        t0 = time.perf_counter()
        if llguidance is None:
            return Compiled(None, "constrained decoding is not available on this worker (llguidance missing)", 0.0)
        if len(spec.source) > self.cfg.max_source_chars:
            return Compiled(None, f"{spec.kind} is {len(spec.source)} characters; the limit is "
                                  f"{self.cfg.max_source_chars}", 0.0)
        try:
            grammar = grammar_text(spec, self.cfg)
        except ValueError as exc:
            return Compiled(None, f"invalid {spec.kind}: {exc}", time.perf_counter() - t0)
        limits = llguidance.LLParserLimits(max_grammar_size=self.cfg.max_grammar_size, verbose_errors=False)
        matcher, error = _build_matcher(self.tokenizer, grammar, limits, self.cfg.compile_timeout_s)
        return Compiled(matcher, error and f"{spec.kind} not supported: {error}", time.perf_counter() - t0)

    def start(self, spec: ConstraintSpec, params: SamplingParams, prompt_ids: tuple[int, ...]) -> Constraint:
        """A fresh matcher for one request (and its ASAp trie when `spec.aligned`)."""
        if not self.eos_ids:
            raise RequestError("constrained decoding needs an EOS token, and this model's tokenizer has none")
        matcher = self.compile(spec).matcher.deep_copy()
        trie = None
        if spec.aligned:
            if params.greedy or params.top_k or params.top_p < 1:
                raise RequestError("grammar-aligned sampling (aligned=true) needs temperature > 0, top_k = 0 "
                                   "and top_p = 1")
            trie = self.asap_trie(spec, params, prompt_ids, create=True)
        return Constraint(matcher, self.eos_ids, self.cfg, trie)

    def asap_trie(self, spec: ConstraintSpec, params: SamplingParams, prompt_ids: tuple[int, ...],
                  create: bool = False) -> PrefixTrie | None:
        """What ASAp has learned for this prompt, grammar and temperature (None if nothing yet)."""
        key = (spec.key, tuple(prompt_ids), params.temperature)
        with self._lock:
            if key not in self._tries and not create:
                return None
            trie = self._tries.setdefault(key, PrefixTrie())
            self._tries.move_to_end(key)
            while len(self._tries) > self.cfg.asap_tries:
                self._tries.popitem(last=False)
        return trie


def grammar_text(spec: ConstraintSpec, cfg: ConstraintConfig) -> str:
    """llguidance's grammar for a spec; ValueError when the source is malformed."""
    if spec.kind == "json_schema":
        schema = json.loads(spec.source)
        if not isinstance(schema, (dict, bool)):
            raise ValueError("a JSON Schema must be an object or a boolean")
        options = {"whitespace_flexible": cfg.json_whitespace_flexible}
        if not cfg.json_whitespace_flexible:
            options |= {"item_separator": cfg.json_item_separator, "key_separator": cfg.json_key_separator}
        return llguidance.LLMatcher.grammar_from_json_schema(spec.source, defaults=options)
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.source)
    return llguidance.grammar_from("grammar", spec.source)


def _build_matcher(tokenizer, grammar: str, limits, timeout_s: float) -> tuple[llguidance.LLMatcher | None, str | None]:
    """Compile in a daemon thread (llguidance drops the GIL) so a pathological grammar cannot hang the request."""
    box: dict = {}

    def work() -> None:
        try:
            m = llguidance.LLMatcher(tokenizer, grammar, log_level=0, limits=limits)
            if not m.is_error():
                m.compute_ff_tokens()   # builds the first lexer states now: their errors surface at compile time
                m.compute_bitmask()
            box["result"] = (None, m.get_error()) if m.is_error() else (m, None)
        except Exception as exc:  # API misuse inside llguidance: still a refusal, not a crash
            box["result"] = (None, f"{type(exc).__name__}: {exc}")

    thread = threading.Thread(target=work, daemon=True, name="grammar-compile")
    thread.start()
    thread.join(timeout_s)
    return box.get("result", (None, f"compile took longer than {timeout_s:g} s"))


class Constraint:
    """One request's grammar state. The decode loop calls forced → restrict → mask → commit once per step."""

    def __init__(self, matcher: llguidance.LLMatcher, eos_ids: frozenset[int], cfg: ConstraintConfig,
                 trie: PrefixTrie | None = None) -> None:
        self.m, self.eos_ids, self.cfg, self.trie = matcher, eos_ids, cfg, trie
        self.eos = min(eos_ids)
        self.pruned = 0                      # draft tokens dropped because they left the grammar
        self._rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # ASAp: row -> (allowed [V], raw logits [V])
        self._path: list[int] = []           # ASAp: emitted tokens, with what the trie learns from each
        self._bases: list[float] = []
        self._probs: list[float] = []
        self._temperature = 1.0

    def forced(self, k: int) -> Draft | None:
        """The grammar's own draft: up to k tokens it forces next, or None."""
        if not self.cfg.fast_forward or k <= 0:
            return None
        tokens = self.m.compute_ff_tokens()[:k]
        return Draft(tokens) if tokens else None

    def restrict(self, draft: Draft, params: SamplingParams) -> Draft:
        """Drop what leaves the grammar (a sampled chain keeps its first bad token for the p/q rule to reject)."""
        if not draft.tokens:
            return draft
        if draft.parents is not None:
            return self._restrict_tree(draft)
        valid = self.m.validate_tokens(draft.tokens)         # counts an EOS when the grammar may end there
        if valid and draft.tokens[valid - 1] in self.eos_ids:
            keep = valid                                      # nothing after EOS is ever emitted
        else:
            keep = min(len(draft.tokens), valid + (draft.probs is not None and not params.greedy))
        self.pruned += len(draft.tokens) - keep
        return draft.head(keep)

    def _restrict_tree(self, draft: Draft) -> Draft:
        keep = [False] * len(draft.tokens)
        for node in self._states(draft):
            if node >= 0:
                keep[node] = True
        for i, p in enumerate(draft.parents):  # children of a kept EOS are never visited by `_states`
            keep[i] = keep[i] and (p < 0 or keep[p])
        index = {old: new for new, old in enumerate(i for i, k in enumerate(keep) if k)}
        self.pruned += len(draft.tokens) - len(index)
        if len(index) == len(draft.tokens):
            return draft
        return Draft([draft.tokens[i] for i in index], None,
                     [index[draft.parents[i]] if draft.parents[i] >= 0 else -1 for i in index], draft.evidence)

    def mask(self, logits: torch.Tensor, draft: Draft, params: SamplingParams) -> torch.Tensor:
        """[k'+1, V] logits scored over [last, *draft] → the same with disallowed tokens at -inf per row."""
        lazy = params.greedy and self.trie is None and self.cfg.lazy_greedy_masks
        out = None
        self._rows.clear()
        self._temperature = params.temperature or 1.0
        for node in self._states(draft):
            row = node + 1
            if node >= 0 and draft.tokens[node] in self.eos_ids:
                continue                                  # the row after EOS is never used
            if lazy and self.m.validate_tokens([int(logits[row].argmax())]) == 1 and not self.m.compute_ff_tokens():
                continue                                  # masking cannot change an allowed argmax
            # (where the grammar forces text, llguidance's bitmask keeps its canonical token only, " the" and not
            # " th", which validate_tokens accepts: such rows always get the full mask)
            allowed = self._allowed(logits.shape[-1])     # [V] bool
            if not bool(allowed.any()):
                raise RequestError(f"the grammar matcher failed: {self.m.get_error() or 'no token allowed'}")
            out = logits.clone() if out is None else out
            out[row] = logits[row].masked_fill(~allowed.to(logits.device), float("-inf"))
            if self.trie is not None:
                self._rows[row] = (allowed, logits[row])
                for t, bias in self.trie.log_bias(self._trie_node(draft, node), allowed).items():
                    out[row, t] += self._temperature * bias  # verification divides by the temperature
        return logits if out is None else out

    def commit(self, verdict: Verdict, budget: int) -> list[int]:
        """Advance the matcher over the emitted tokens; append EOS when the grammar allows nothing else."""
        rows = [0] + [p + 1 for p in verdict.path] if verdict.path is not None else range(len(verdict.emitted))
        for row, t in zip(rows, verdict.emitted):
            if self.trie is not None:
                self._learn(row, t)
            if t in self.eos_ids:
                return verdict.emitted
            if not self.m.consume_token(t):
                raise RequestError(f"the grammar matcher failed: {self.m.get_error()}")
        if self.m.is_stopped() and self.trie is None and budget > len(verdict.emitted):
            return verdict.emitted + [self.eos]           # only EOS is allowed: no forward needed for it
        return verdict.emitted

    def close(self) -> None:
        """End of request: ASAp learns from the sample."""
        if self.trie is not None and self._path:
            self.trie.record(self._path, self._bases, self._probs, terminal=self._path[-1] in self.eos_ids)
            self._path = []

    def _learn(self, row: int, token: int) -> None:
        allowed, raw = self._rows[row]
        p = (raw.float() / self._temperature).softmax(-1)
        self._path.append(token)
        self._bases.append(float(p[allowed].sum()))
        self._probs.append(float(p[token]))

    def _trie_node(self, draft: Draft, node: int):
        path = []
        while node >= 0:
            path.append(draft.tokens[node])
            node = node - 1 if draft.parents is None else draft.parents[node]
        return self.trie.node(self._path + path[::-1])

    def _allowed(self, vocab: int) -> torch.Tensor:
        bits = torch.frombuffer(bytearray(self.m.compute_bitmask()), dtype=torch.uint8)
        allowed = ((bits[:, None] >> _SHIFTS) & 1).flatten().bool()                  # [32 * ceil(n/32)]
        if allowed.numel() < vocab:
            allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.numel()))
        return allowed[:vocab]

    def _states(self, draft: Draft) -> Iterator[int]:
        """Put the matcher at each draft node's state in turn (-1 = the committed state), then restore it.

        Walks a chain in order and a tree depth-first; goes below neither a token the grammar rejects nor EOS
        (an allowed EOS node is yielded, but the matcher stays at its parent's state).
        """
        children: dict[int, list[int]] = {}
        for i, p in enumerate(draft.parents if draft.parents is not None else range(-1, len(draft.tokens) - 1)):
            children.setdefault(p, []).append(i)
        stack, depth = [(-1, 0)], 0                    # (node, its depth); the matcher is `depth` tokens ahead
        try:
            while stack:
                node, d = stack.pop()
                if node >= 0:
                    self.m.rollback(depth - (d - 1))   # back to the node's parent (a no-op going down)
                    depth, t = d - 1, draft.tokens[node]
                    if t in self.eos_ids:
                        if self.m.validate_tokens([t]) == 1:
                            yield node
                        continue
                    if self.m.try_consume_tokens([t]) != 1:
                        continue
                    depth = d
                yield node
                stack.extend((c, d + 1) for c in reversed(children.get(node, [])))
        finally:
            self.m.rollback(depth)


def grammar_stats(spec: ConstraintSpec) -> dict[str, float]:
    """Cheap features of a constraint for the selector (no compile): size, and for JSON Schemas their shape.

    >>> grammar_stats(ConstraintSpec("json_schema", '{"type": "object", "properties": {"a": {"enum": [1, 2]}}}'))
    {'source_chars': 57.0, 'json_properties': 1.0, 'json_enums': 1.0, 'json_depth': 3.0, 'json_free_strings': 0.0}
    """
    out = {"source_chars": float(len(spec.source))}
    if spec.kind != "json_schema":
        return out
    try:
        schema = json.loads(spec.source)
    except ValueError:
        return out
    counts = {"json_properties": 0, "json_enums": 0, "json_depth": 0, "json_free_strings": 0}

    def walk(node, depth: int) -> None:
        counts["json_depth"] = max(counts["json_depth"], depth)
        if isinstance(node, dict):
            props = node.get("properties")
            counts["json_properties"] += len(props) if isinstance(props, dict) else 0
            counts["json_enums"] += "enum" in node or "const" in node
            counts["json_free_strings"] += node.get("type") == "string" and not {"enum", "const", "pattern"} & set(node)
            for value in node.values():
                walk(value, depth + 1)
        elif isinstance(node, list):
            for value in node:
                walk(value, depth)

    walk(schema, 0)
    return out | {k: float(v) for k, v in counts.items()}
