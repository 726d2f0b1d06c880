"""A scorer with known answers, for testing suites without a model."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from repair.suites.base import ChoiceRequest, OptionScores


class TableScorer:
    """Scores option `o` after prompt `p` as `fn(p, o) -> (summed logprob, n_tokens)`.

    `token_nll` returns `fn_nll(token_ids)` sliced to the tokens a sliding window would score.
    """

    def __init__(self, fn: Callable[[str, str], tuple[float, int]], tokenizer=None, fn_nll=None):
        self.fn, self.tokenizer, self.fn_nll = fn, tokenizer, fn_nll
        self.calls: list[ChoiceRequest] = []

    def score_choices(self, requests: Sequence[ChoiceRequest], desc: str = "") -> list[OptionScores]:
        out = []
        for r in requests:
            self.calls.append(r)
            pairs = [self.fn(r.prompt, o) for o in r.options]
            out.append(OptionScores(np.array([p[0] for p in pairs], float), np.array([p[1] for p in pairs], np.int64)))
        return out

    def token_nll(self, token_ids, window: int, stride: int, desc: str = "") -> np.ndarray:
        return np.asarray(self.fn_nll(np.asarray(token_ids)), dtype=np.float64)[1:]
