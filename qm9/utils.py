"""Property conditioning as EDM does it (``qm9/utils.py`` and ``DistributionProperty`` of ``qm9/models.py``).

* ``compute_mean_mad``: the normaliser of each property (mean and mean absolute deviation,
  float32 torch reductions over a split in stored order);
* ``prepare_context``: the (B, N, P) context tensor, (value - mean) / MAD repeated over the
  node slots and masked;
* ``DistributionProperty``: p(c | N), a 1000-bin histogram of each property per atom count,
  sampled as a bin then a uniform value inside it.

Facts: ../shared/reference/edm_conditional.md §1.3, §1.4, §1.6.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

from qm9.data.qm9 import PROPERTIES

Norms = Mapping[str, Mapping[str, torch.Tensor]]


def _loader_arrays(loader: Any) -> Mapping[str, np.ndarray]:
    """The per-molecule arrays behind one of our QM9 dataloaders (or the arrays themselves)."""
    if isinstance(loader, Mapping):
        return loader
    dataset = getattr(loader, "dataset", loader)
    if isinstance(dataset, torch.utils.data.Subset):  # --data_subset: the first molecules of a split
        rows = np.asarray(dataset.indices)
        parent = _loader_arrays(dataset.dataset)
        return {key: np.asarray(value)[rows] for key, value in parent.items()}
    arrays = getattr(dataset, "arrays", None)
    if arrays is None:
        raise ValueError("property statistics need a QM9 dataloader (its dataset holds the property arrays)")
    return arrays


def _check_properties(properties: Sequence[str], arrays: Mapping[str, Any]) -> None:
    missing = [p for p in properties if p not in arrays]
    if missing:
        raise ValueError(
            f"unknown conditioning propert{'y' if len(missing) == 1 else 'ies'} {', '.join(map(repr, missing))}; "
            f"choose from: {', '.join(PROPERTIES)}"
        )


def compute_mean_mad_from_dataloader(loader: Any, properties: Sequence[str]) -> dict[str, dict[str, torch.Tensor]]:
    """{property: {'mean', 'mad'}} (0-d float32) over every molecule of the loader's split."""
    arrays = _loader_arrays(loader)
    _check_properties(properties, arrays)
    norms = {}
    for key in properties:
        values = torch.as_tensor(np.asarray(arrays[key], dtype=np.float32))
        mean = torch.mean(values)
        norms[key] = {"mean": mean, "mad": torch.mean(torch.abs(values - mean))}
    return norms


def compute_mean_mad(dataloaders: Mapping[str, Any], properties: Sequence[str], dataset_name: str) -> dict:
    """EDM's normaliser: train statistics for 'qm9', *validation* statistics for 'qm9_second_half'.

    The property classifier uses the validation statistics too, so generator and classifier
    share them. 'qm9_first_half' is refused as in EDM (it trains classifiers, not generators).
    """
    if dataset_name == "qm9":
        return compute_mean_mad_from_dataloader(dataloaders["train"], properties)
    if dataset_name == "qm9_second_half":
        return compute_mean_mad_from_dataloader(dataloaders["valid"], properties)
    raise ValueError(f"property normalisation is defined for datasets 'qm9' and 'qm9_second_half', not {dataset_name!r}")


def prepare_context(conditioning: Sequence[str], minibatch: Mapping[str, torch.Tensor], property_norms: Norms) -> torch.Tensor:
    """(B, N, P) context: per property in ``conditioning`` order, (value - mean) / MAD on every
    real atom of the molecule, 0 on padding slots. ``minibatch`` needs ``atom_mask`` (B, N)
    and the property values (B,)."""
    if not conditioning:
        raise ValueError("prepare_context needs at least one conditioning property")
    if property_norms is None:
        raise ValueError("prepare_context needs the property normaliser (compute_mean_mad)")
    _check_properties(conditioning, minibatch)
    node_mask = minibatch["atom_mask"].unsqueeze(2)
    bs, n_nodes, _ = node_mask.shape
    channels = []
    for key in conditioning:
        values = minibatch[key]
        if values.dim() != 1 or values.shape[0] != bs:
            raise ValueError(f"property {key!r} must be one value per molecule, shape ({bs},), got {tuple(values.shape)}")
        normed = (values - property_norms[key]["mean"]) / property_norms[key]["mad"]
        channels.append(normed.reshape(bs, 1, 1).expand(bs, n_nodes, 1))
    context = torch.cat(channels, dim=2) * node_mask.to(channels[0].dtype)
    return context


class DistributionProperty:
    """p(c | N): per atom count, a 1000-bin histogram of each property over a training split.

    ``sample(n)`` draws, for each property in order, a bin (one ``torch.multinomial``) and a
    uniform value inside it (one ``torch.rand``), normalised with the attached mean/MAD; the
    RNG order matches EDM's so seeded draws reproduce. The edges of the bins are those of
    EDM: the histogram divides by (max - min) + 1e-12 in float32, sampling by max - min.
    """

    def __init__(self, arrays: Any, properties: Sequence[str], num_bins: int = 1000, normalizer: Norms | None = None):
        arrays = _loader_arrays(arrays)
        _check_properties(properties, arrays)
        self.properties = list(properties)
        self.num_bins = int(num_bins)
        self.normalizer = normalizer
        # EDM raises for a size without training molecules. A --data_subset run holds only some
        # sizes while N is drawn from the full histogram: it sets this to draw from the nearest size.
        self.nearest_size_fallback = False
        num_atoms = torch.as_tensor(np.asarray(arrays["num_atoms"])).long()
        self.distributions: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
        for prop in self.properties:
            values = torch.as_tensor(np.asarray(arrays[prop], dtype=np.float32))
            self.distributions[prop] = self._histograms(num_atoms, values)

    def _histograms(self, num_atoms: torch.Tensor, values: torch.Tensor) -> dict[int, dict[str, torch.Tensor]]:
        out = {}
        for n in torch.unique(num_atoms).tolist():  # a few dozen sizes; the binning itself is vectorised
            v = values[num_atoms == n]
            pmin, pmax = torch.min(v), torch.max(v)
            prange = (pmax - pmin) + 1e-12
            bins = ((v - pmin) / prange * self.num_bins).long().clamp(max=self.num_bins - 1)
            counts = torch.bincount(bins, minlength=self.num_bins).to(torch.float32)
            probs = counts / torch.sum(counts)
            # EDM wraps probs in a Categorical, which normalises once more; keep those bits.
            probs = probs / probs.sum(-1, keepdim=True)
            out[int(n)] = {"probs": probs, "params": torch.stack([pmin, pmax])}
        return out

    def set_normalizer(self, normalizer: Norms) -> None:
        self.normalizer = normalizer

    def _draw(self, prop: str, n_nodes: int) -> torch.Tensor:
        by_size = self.distributions[prop]
        if n_nodes not in by_size and self.nearest_size_fallback and by_size:
            n_nodes = min(by_size, key=lambda n: (abs(n - n_nodes), n))
        if n_nodes not in by_size:
            raise ValueError(f"no training molecule has {n_nodes} atoms: cannot draw {prop!r} for that size")
        entry = by_size[n_nodes]
        idx = torch.multinomial(entry["probs"].view(1, -1), 1, replacement=True).item()
        pmin, pmax = entry["params"][0], entry["params"][1]
        prange = pmax - pmin
        left = float(idx) / self.num_bins * prange + pmin
        right = float(idx + 1) / self.num_bins * prange + pmin
        return torch.rand(1) * (right - left) + left

    def sample(self, n_nodes: int = 19) -> torch.Tensor:
        """(P,) normalised property values for one molecule of ``n_nodes`` atoms."""
        if self.normalizer is None:
            raise ValueError("DistributionProperty has no normaliser: call set_normalizer(compute_mean_mad(...)) first")
        values = []
        for prop in self.properties:
            value = self._draw(prop, int(n_nodes))
            values.append((value - self.normalizer[prop]["mean"]) / self.normalizer[prop]["mad"])
        return torch.cat(values)

    def sample_batch(self, nodesxsample: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """(B, P) normalised values, one row per molecule size (EDM's RNG order: molecule-major)."""
        sizes = nodesxsample.tolist() if isinstance(nodesxsample, torch.Tensor) else list(nodesxsample)
        return torch.stack([self.sample(int(n)) for n in sizes])

    def normalize_tensor(self, tensor: torch.Tensor, prop: str) -> torch.Tensor:
        return (tensor - self.normalizer[prop]["mean"]) / self.normalizer[prop]["mad"]

    def unnormalize(self, tensor: torch.Tensor, prop: str) -> torch.Tensor:
        """Physical values (EDM units) from normalised ones."""
        return tensor * self.normalizer[prop]["mad"] + self.normalizer[prop]["mean"]


def sweep_context(prop_dist: DistributionProperty, n_nodes: int = 19, n_frames: int = 100) -> torch.Tensor:
    """(n_frames, P) normalised contexts from the smallest to the largest training value of each
    property among ``n_nodes``-atom molecules (EDM's qualitative sweep). Computed with numpy's
    linspace on float32 end points, as EDM does (float32 arithmetic with numpy >= 2)."""
    if prop_dist.normalizer is None:
        raise ValueError("DistributionProperty has no normaliser: call set_normalizer(compute_mean_mad(...)) first")
    columns = []
    for prop in prop_dist.properties:
        by_size = prop_dist.distributions[prop]
        if int(n_nodes) not in by_size:
            raise ValueError(f"no training molecule has {n_nodes} atoms: cannot sweep {prop!r} for that size")
        pmin, pmax = by_size[int(n_nodes)]["params"]
        low = prop_dist.normalize_tensor(pmin, prop).numpy()
        high = prop_dist.normalize_tensor(pmax, prop).numpy()
        columns.append(torch.from_numpy(np.linspace(low, high, int(n_frames))))
    return torch.stack(columns, dim=1)
