"""General ability: a general text's perplexity beside the test lines, and an optional training term on that text.

The text is cut as ``evaluate`` cuts it for perplexity (``merger.evaluation.metrics``): its first
``MEASURED_WINDOWS`` windows of ``WINDOW`` tokens are measured after the search, as test lines are; the search
may train only on the text after them, cut the same way into chunks of ``tokens`` tokens.
"""

from dataclasses import dataclass

import torch
from torch import nn

from merger.evaluation.metrics import bos_prefix, perplexity, perplexity_windows
from merger.evaluation.runtimes import LoadedModel

WINDOW, MEASURED_WINDOWS = 512, 8


@dataclass(frozen=True)
class GeneralText:
    label: str
    text: str

    def perplexity(self, lm: LoadedModel) -> float:
        """Perplexity on the measured windows (the search never trains on them)."""
        measured = perplexity(lm, self.text, window=WINDOW, limit=MEASURED_WINDOWS, batch_size=1, step=lambda *_: None)
        return measured.values["perplexity"]

    def training_chunks(self, lm: LoadedModel, tokens: int) -> list[list[int]]:
        """Chunks of ``tokens`` tokens (BOS first where the tokenizer adds one) from the text after the measured windows."""
        prefix = len(bos_prefix(lm))
        measured = MEASURED_WINDOWS * (min(WINDOW, lm.context_length) - prefix)
        body = min(tokens, lm.context_length) - prefix
        return [chunk for i, chunk in enumerate(perplexity_windows(lm, self.text, tokens)) if i * body >= measured]


def text_nll(model: nn.Module, chunks: list[list[int]]) -> torch.Tensor:
    """Mean next-token negative log-likelihood over equally long ``chunks`` (every token after the first)."""
    ids = torch.tensor(chunks)
    logits = model(input_ids=ids).logits[:, :-1].float()
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
