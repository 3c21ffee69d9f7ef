"""Per-request choice of (pool, method): hard rules first, then the learnt model's predicted tokens/s.

>>> selector = Selector.load("selector/default_model.skops")          # doctest: +SKIP
>>> pools = [PoolInfo("cpu", ("ar", "sps", "pld"), {"accelerator": "cpu", "cores": 2})]
>>> choice = selector.choose(RequestInput(prompt_ids=ids, prompt_text=text, max_tokens=64), pools)  # doctest: +SKIP
>>> choice.pool, choice.method, choice.reason                           # doctest: +SKIP
('cpu', 'pld', 'model')
>>> choice.scores                          # predicted tokens/s per "pool/method"   # doctest: +SKIP
{'cpu/ar': 151.2, 'cpu/pld': 233.9, 'cpu/sps': 198.4}

When no model file is present the router uses `FixedSelector` (always one configured arm where the rules allow
it, AR elsewhere); both record the features they chose from, so the outcome log can train the first model.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .features import FEATURE_VERSION, RequestInput, pool_features, request_features, request_input
from .hedge import choose as hedge_choose
from .model import SelectorFileError, SelectorModel
from .rules import ALWAYS_ALLOWED, DEFAULT_ARMS, ArmSpec, candidates
from .train import load_level
from .types import Choice, PoolInfo

DEFAULT_MODEL = Path(__file__).resolve().parent / "default_model.skops"


@dataclass(frozen=True)
class SelectorConfig:
    epsilon: float = 0.05        # share of requests routed to a random allowed non-greedy (pool, method)
    seed: int | None = None      # seeds exploration (None = OS entropy)
    fixed_method: str = "sps"    # FixedSelector's arm

    def __post_init__(self) -> None:
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {self.epsilon}")


def _least_loaded(pairs: list[tuple[PoolInfo, str]]) -> tuple[PoolInfo, str]:
    return min(pairs, key=lambda pm: pm[0].load)


def _features(request: Mapping[str, float], pool: PoolInfo) -> dict[str, float]:
    pool_feats = pool_features(pool.hardware, pool.load, pool.batch)
    return {**request, **pool_feats, "feature_version": float(FEATURE_VERSION)}


class _Base:
    version = "fixed"

    def __init__(self, cfg: SelectorConfig, arms: Mapping[str, ArmSpec] = DEFAULT_ARMS,
                 ngram_hit_rate: Callable[[Sequence[int]], float] | None = None, tokenizer=None) -> None:
        self.cfg, self.arms, self.ngram_hit_rate, self.tokenizer = cfg, dict(arms), ngram_hit_rate, tokenizer
        self._rng = random.Random(cfg.seed)

    def _explore(self, request: Mapping[str, float], pairs: list[tuple[PoolInfo, str]], greedy: tuple[PoolInfo, str],
                 scores: dict[str, float]) -> Choice | None:
        others = [pm for pm in pairs if pm != greedy]
        if not others or self.cfg.epsilon <= 0 or self._rng.random() >= self.cfg.epsilon:
            return None
        pool, method = self._rng.choice(others)
        return Choice(pool.name, method, "explore", scores, True, _features(request, pool), self.version)

    def _request(self, request) -> tuple[RequestInput, dict[str, float]]:
        """The request as the selector's input (converted by `request_input` unless it is one) and its features."""
        if not isinstance(request, RequestInput):
            request = request_input(request, self.tokenizer)
        return request, request_features(request, self.ngram_hit_rate)

    def features_for(self, request, pool: PoolInfo) -> dict[str, float]:
        """The features `choose` records, for a request whose client named the arm: a run under a named arm is
        training data like a chosen one (a benchmark naming every arm on every prompt is the best there is)."""
        return _features(self._request(request)[1], pool)

    def choose(self, request, pools: Sequence[PoolInfo]) -> Choice:
        """`request` is a RequestInput, or a `workers.request.Request` (converted by `request_input`, with
        `self.tokenizer` only where the router sent no ids)."""
        if not pools:
            raise ValueError("no pool to choose from")
        request, feats = self._request(request)
        pairs, refused = candidates(list(pools), request.has_constraint, self.arms, request.temperature > 0)
        pick, scores, reason = self._pick(feats, pairs)
        if len(pairs) == 1:
            reason = f"rule: only {pick[1]} allowed ({'; '.join(refused.values()) or 'no other arm'})"
        elif explored := self._explore(feats, pairs, pick, scores):
            return explored
        return Choice(pick[0].name, pick[1], reason, scores, False, _features(feats, pick[0]), self.version)

    def _pick(self, feats: dict[str, float], pairs: list[tuple[PoolInfo, str]]
              ) -> tuple[tuple[PoolInfo, str], dict[str, float], str]:
        raise NotImplementedError


class FixedSelector(_Base):
    """Always `cfg.fixed_method` on the least-loaded pool that allows it; AR where none does."""

    def _pick(self, feats, pairs):
        wanted = [pm for pm in pairs if pm[1] == self.cfg.fixed_method]
        if wanted:
            return _least_loaded(wanted), {}, "fixed"
        return _least_loaded([pm for pm in pairs if pm[1] == ALWAYS_ALLOWED]), {}, \
            f"rule: {self.cfg.fixed_method} not allowed on any pool"


class Selector(_Base):
    """The learnt selector: the allowed (pool, method) with the highest predicted tokens/s, or, where the model
    file has a hedge (selector/hedge.py), the level's best fixed arm unless another is predicted more than the
    hedge's margin faster (reason "model: the level's arm (hedge)")."""

    def __init__(self, model: SelectorModel, cfg: SelectorConfig = SelectorConfig(),
                 arms: Mapping[str, ArmSpec] = DEFAULT_ARMS,
                 ngram_hit_rate: Callable[[Sequence[int]], float] | None = None, tokenizer=None) -> None:
        super().__init__(cfg, arms, ngram_hit_rate, tokenizer)
        self.model = model
        self.version = model.version

    @classmethod
    def load(cls, path: str | Path = DEFAULT_MODEL, cfg: SelectorConfig = SelectorConfig(),
             arms: Mapping[str, ArmSpec] = DEFAULT_ARMS,
             ngram_hit_rate: Callable[[Sequence[int]], float] | None = None, tokenizer=None) -> "Selector":
        """Load a model file; raises SelectorFileError (the caller keeps its current selector)."""
        return cls(SelectorModel.load(path), cfg, arms, ngram_hit_rate, tokenizer)

    def _pick(self, feats, pairs):
        known = [pm for pm in pairs if pm[1] in self.model.methods]
        if not known:   # a model that knows none of the allowed arms: AR, which every pool allows
            return _least_loaded([pm for pm in pairs if pm[1] == ALWAYS_ALLOWED]), {}, "rule: no arm the model knows"
        pool_feats = {pm[0].name: pool_features(pm[0].hardware, pm[0].load, pm[0].batch) for pm in known}
        pred = self.model.predict(self.model.rows(feats, [(pool_feats[p.name], m) for p, m in known]))
        scores = {f"{p.name}/{m}": round(math.exp(v), 3) for (p, m), v in zip(known, pred)}
        levels = [load_level(pool_feats[p.name]["load_running"] + pool_feats[p.name]["load_waiting"])
                  for p, _ in known]
        greedy = feats.get("greedy", 1.0) > 0
        pick = hedge_choose(pred.tolist(), [m for _, m in known], levels, self.model.hedge, greedy)
        return known[pick], scores, "model" if pick == int(np.argmax(pred)) else "model: the level's arm (hedge)"


def load_selector(path: str | Path | None, cfg: SelectorConfig = SelectorConfig(),
                  current: _Base | None = None, arms: Mapping[str, ArmSpec] = DEFAULT_ARMS,
                  ngram_hit_rate: Callable[[Sequence[int]], float] | None = None,
                  tokenizer=None) -> tuple[_Base, str | None]:
    """The selector for a service (re)configuration and the error that kept the current one, if any.

    No path and no default model file → FixedSelector. A file that fails to load → `current` is kept (or a
    FixedSelector when there is none) and the SelectorFileError's message is returned for the log.
    """
    path = Path(path) if path else (DEFAULT_MODEL if DEFAULT_MODEL.is_file() else None)
    if path is None:
        return FixedSelector(cfg, arms, ngram_hit_rate, tokenizer), None
    try:
        return Selector.load(path, cfg, arms, ngram_hit_rate, tokenizer), None
    except SelectorFileError as e:
        return current or FixedSelector(cfg, arms, ngram_hit_rate, tokenizer), str(e)
