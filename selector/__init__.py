"""The meta-learned selector: request/pool features, hard rules, a scikit-learn model of tokens/s per
(pool, method), exploration, retraining and evaluation against the per-request oracle.

>>> from metaspec.selector import RequestInput, PoolInfo, load_selector
>>> selector, error = load_selector(None)        # the shipped default model, or FixedSelector without one
>>> choice = selector.choose(RequestInput(prompt_ids=[5, 6, 7], prompt_text="hi", max_tokens=32),
...                          [PoolInfo("cpu", ("ar", "sps", "pld"), {"accelerator": "cpu", "cores": 2})])
>>> choice.method in ("ar", "sps", "pld")
True
"""

from .features import FEATURE_VERSION, RequestInput, pool_features, request_features
from .model import SelectorFileError, SelectorModel
from .selector import DEFAULT_MODEL, FixedSelector, Selector, SelectorConfig, load_selector
from .types import Choice, Outcome, PoolInfo

__all__ = ["FEATURE_VERSION", "RequestInput", "pool_features", "request_features", "SelectorFileError",
           "SelectorModel", "DEFAULT_MODEL", "FixedSelector", "Selector", "SelectorConfig", "load_selector",
           "Choice", "Outcome", "PoolInfo"]
