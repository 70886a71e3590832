"""One greedy decode loop for every model (dense or sparse), so that tokens/s compare what the weights cost:
a prompt forward that keeps only the last position's logits, then one token at a time with the KV cache."""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Decoded:
    tokens: list[int]  # the new tokens
    prefill_seconds: float
    step_seconds: list[float]  # per new token after the first

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: new tokens after the first over their time (the prompt's forward excluded)."""
        return len(self.step_seconds) / sum(self.step_seconds) if self.step_seconds else 0.0


@torch.inference_mode()
def greedy(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int) -> Decoded:
    """Greedy continuation of ``input_ids`` (1 x T) by ``max_new_tokens`` tokens."""
    from transformers import DynamicCache

    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"greedy decodes one sequence (1 x T ids), got shape {tuple(input_ids.shape)}")
    cache = DynamicCache(config=model.config)
    # transformers renamed the argument to ``cache`` (5.2x; the old name goes in 5.40): pass the one it takes
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    t0 = time.perf_counter()
    out = model(input_ids=input_ids, **{name: cache}, use_cache=True, logits_to_keep=1)
    nxt = out.logits[:, -1].argmax(-1)
    tokens = [int(nxt)]
    prefill = time.perf_counter() - t0
    steps = []
    for _ in range(max_new_tokens - 1):
        t = time.perf_counter()
        out = model(input_ids=nxt[:, None], **{name: cache}, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1)
        tokens.append(int(nxt))
        steps.append(time.perf_counter() - t)
    return Decoded(tokens, prefill, steps)
