"""Sample quality: generative perplexity under an autoregressive model, and unigram entropy.

Generative perplexity, as in the MD4, SEDD and MDLM papers (with GPT-2 large), is low for fluent
text but also for repetitive text: the unigram entropy of each sample's tokens (the mode-collapse
check; Zheng et al. 2024 found ~5.6 nats for 1024 GPT-2 tokens of real OpenWebText and much lower
for collapsed samplers) says whether a low perplexity is real.
"""

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from md4_eqx.data.hub import hub_call
from md4_eqx.errors import ScoringError
from md4_eqx.evaluate import standard_error


def unigram_entropy(tokens: Sequence[int]) -> float:
    """Entropy in nats of the empirical distribution of one sample's tokens."""
    counts = np.unique(np.asarray(tokens), return_counts=True)[1]
    p = counts / counts.sum()
    return float(-np.sum(p * np.log(p)))


@dataclasses.dataclass(frozen=True)
class Perplexity:
    """exp(pooled NLL per token) of a set of samples, with the NLL of each sample."""

    nll: tuple[float, ...]  # summed NLL (nats) of each sample
    scored: tuple[int, ...]  # tokens scored in each sample

    @property
    def value(self) -> float:
        return math.exp(sum(self.nll) / sum(self.scored))

    @property
    def stderr(self) -> float:
        """Delta-method standard error over samples of the pooled ratio (NaN for one sample)."""
        nll, scored = np.asarray(self.nll), np.asarray(self.scored, np.float64)
        residual = (
            nll - nll.sum() / scored.sum() * scored
        ) / scored.mean()  # linearised ratio estimator
        return self.value * standard_error(tuple(residual.tolist()))


class CausalLM:
    """A `transformers` causal LM (and its tokenizer, where the directory or hub name has one)."""

    def __init__(self, name_or_path: str, device: str | None = None):
        try:
            import torch
        except ImportError:
            raise ScoringError(
                "generative perplexity needs PyTorch: pip install md4-eqx[eval]"
            ) from None
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        with hub_call(ScoringError, f"load the causal LM {name_or_path!r}"):
            self.model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch.float32)
        self.model.to(self.device).eval()
        try:
            with hub_call(ScoringError, f"load the tokenizer of {name_or_path!r}"):
                self.tokenizer: Any = AutoTokenizer.from_pretrained(name_or_path)
        except ScoringError:  # --tokens scores token ids without one
            self.tokenizer = None
        self.name = name_or_path
        cfg = self.model.config
        self.context = getattr(cfg, "n_positions", None) or getattr(
            cfg, "max_position_embeddings", 1024
        )
        self.vocab_size: int = cfg.vocab_size
        self.bos: int | None = cfg.bos_token_id

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """The texts in this model's tokens (no special tokens added)."""
        if self.tokenizer is None:
            raise ScoringError(
                f"{self.name} has no tokenizer: score the samples' token ids (--tokens)"
            )
        return [self.tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]

    def windows(self, ids: Sequence[int]) -> list[list[int]]:
        """A sample cut into windows the model can read. With a BOS token every window is
        [BOS] + up to context - 1 tokens, so every token is scored once; without one, windows of
        `context` tokens whose first token is context only."""
        if self.bos is None:
            return [list(ids[i : i + self.context]) for i in range(0, len(ids), self.context)]
        step = self.context - 1
        return [[self.bos, *ids[i : i + step]] for i in range(0, len(ids), step)]

    def perplexity(self, samples: Sequence[Sequence[int]], batch_size: int = 8) -> Perplexity:
        """Generative perplexity of token-id samples under this model."""
        torch = self.torch
        for i, ids in enumerate(samples):
            if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
                raise ScoringError(
                    f"sample {i} has token ids outside {self.name}'s vocabulary "
                    f"of {self.vocab_size}"
                )
        windows = [(i, w) for i, ids in enumerate(samples) for w in self.windows(ids) if len(w) > 1]
        nll, scored = np.zeros(len(samples)), np.zeros(len(samples), np.int64)
        with torch.no_grad():
            for start in range(0, len(windows), batch_size):
                owners, batch = zip(*windows[start : start + batch_size], strict=True)
                width = max(map(len, batch))
                ids = torch.tensor([w + [0] * (width - len(w)) for w in batch], device=self.device)
                present = torch.tensor(
                    [[1] * len(w) + [0] * (width - len(w)) for w in batch], device=self.device
                )
                logits = self.model(
                    input_ids=ids, attention_mask=present
                ).logits.float()  # (b, w, V)
                logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[
                    ..., 0
                ]
                target = present[:, 1:].bool()  # (b, w - 1): predicted tokens that exist
                per_window = -(logp * target).sum(dim=1)
                # a sample may own several windows
                np.add.at(nll, list(owners), per_window.tolist())
                np.add.at(scored, list(owners), target.sum(dim=1).tolist())
        if scored.sum() == 0:
            raise ScoringError("no token to score: the samples are empty")
        return Perplexity(tuple(nll.tolist()), tuple(scored.tolist()))
