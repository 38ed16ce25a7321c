"""EDM's adaptive gradient clipping.

The largest allowed gradient norm is ``1.5 * mean + 2 * std`` (population std) of a queue
holding the last <= 50 *accepted* norms: the norm itself, or the limit when it was clipped.
The queue starts as [3000]; the seed value leaves after 50 accepted steps.
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch
from tqdm import tqdm


class Queue:
    """EDM's fixed-length queue of recent gradient norms (newest first)."""

    def __init__(self, max_len: int = 50):
        self.items: list[float] = []
        self.max_len = max_len

    def __len__(self) -> int:
        return len(self.items)

    def add(self, item: float) -> None:
        self.items.insert(0, float(item))
        if len(self.items) > self.max_len:
            self.items.pop()

    def mean(self) -> float:
        return float(np.mean(self.items))

    def std(self) -> float:
        return float(np.std(self.items))

    def state_dict(self) -> dict:
        return {"items": list(self.items), "max_len": self.max_len}

    def load_state_dict(self, state: dict) -> None:
        self.items = [float(v) for v in state["items"]]
        self.max_len = int(state["max_len"])


def new_gradnorm_queue() -> Queue:
    """The queue a run starts with: [3000]."""
    queue = Queue()
    queue.add(3000)
    return queue


def max_grad_norm(gradnorm_queue: Queue) -> float:
    return 1.5 * gradnorm_queue.mean() + 2 * gradnorm_queue.std()


def gradient_clipping(
    flow: torch.nn.Module | Iterable[torch.nn.Parameter], gradnorm_queue: Queue, verbose: bool = True
) -> float:
    """Clip the gradients to the adaptive limit; return the norm before clipping.

    A non-finite norm is returned as is and not queued (the caller skips that step).
    """
    params = flow.parameters() if isinstance(flow, torch.nn.Module) else flow
    limit = max_grad_norm(gradnorm_queue)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm=limit, norm_type=2.0))
    if not math.isfinite(grad_norm):
        return grad_norm
    if grad_norm > limit:
        gradnorm_queue.add(limit)
        if verbose:
            tqdm.write(f"Clipped gradient with value {grad_norm:.1f} while allowed {limit:.1f}")
    else:
        gradnorm_queue.add(grad_norm)
    return grad_norm
