"""Distribution of the number of atoms per molecule (EDM's ``DistributionNodes``)."""
from __future__ import annotations

import numpy as np
import torch
from torch.distributions.categorical import Categorical


class DistributionNodes:
    """p(N) from a histogram {atom count: number of molecules}.

    ``log_prob`` is log(count / total + 1e-30) with the probabilities computed in float64
    and stored in float32, exactly as EDM's training objective uses it.
    """

    def __init__(self, histogram: dict[int, int]):
        if not histogram:
            raise ValueError("empty atom-count histogram")
        self.n_nodes = torch.tensor([int(n) for n in histogram])
        counts = np.array([histogram[n] for n in histogram], dtype=np.float64)
        prob = counts / np.sum(counts)
        self.prob = torch.from_numpy(prob).float()
        # Sampling draws from the float64 probabilities (EDM's Categorical), so seeds reproduce.
        self.m = Categorical(torch.tensor(prob))
        self.keys = {int(n): i for i, n in enumerate(histogram)}
        # Lookup table by atom count; NaN marks counts absent from the histogram.
        table = torch.full((int(self.n_nodes.max()) + 1,), float("nan"))
        table[self.n_nodes] = torch.log(self.prob + 1e-30)
        self._log_prob_table = table

    def sample(self, n_samples: int = 1) -> torch.Tensor:
        """n_samples atom counts (int64)."""
        idx = self.m.sample((n_samples,))
        return self.n_nodes[idx]

    def log_prob(self, batch_n_nodes: torch.Tensor) -> torch.Tensor:
        """log p(N) for a 1-d tensor of atom counts; float32 on the counts' device."""
        if batch_n_nodes.dim() != 1:
            raise ValueError(f"log_prob expects a 1-d tensor of atom counts, got shape {tuple(batch_n_nodes.shape)}")
        counts = batch_n_nodes.long().cpu()
        bad = (counts < 0) | (counts >= len(self._log_prob_table))
        log_p = torch.full(counts.shape, float("nan"))
        log_p[~bad] = self._log_prob_table[counts[~bad]]
        if torch.isnan(log_p).any():
            missing = sorted(set(counts[torch.isnan(log_p)].tolist()))
            raise ValueError(f"atom counts {missing} do not occur in the dataset's size histogram")
        return log_p.to(batch_n_nodes.device)
