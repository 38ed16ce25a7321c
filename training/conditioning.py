"""Property-conditional training (EDM's ``--conditioning``): flag checks and the run's normaliser.

EDM's main_qm9.py, when ``--conditioning`` names properties: the normaliser (mean / MAD) comes
from ``qm9.utils.compute_mean_mad`` (train split for 'qm9', *validation* split for
'qm9_second_half'), the network gets one context channel per property, ``get_model`` builds
p(c | N) (``DistributionProperty``) from the training split and the normaliser is attached to it.
Training and the validation NLL use each molecule's true values as context; the in-training
stability check and pictures draw contexts from p(c | N). Facts: edm_conditional.md §1.3-§1.8.
"""
from __future__ import annotations

import argparse
from typing import Any, Mapping

from configs.datasets import find_dataset
from configs.errors import UserInputError
from qm9.data.qm9 import PROPERTIES

# compute_mean_mad is defined for these (EDM refuses qm9_first_half: it trains classifiers).
CONDITIONING_DATASETS = ("qm9", "qm9_second_half")


def check_conditioning_flags(args: argparse.Namespace) -> None:
    """One-line UserInputError for a bad ``--conditioning`` (before any data is read)."""
    props = list(getattr(args, "conditioning", None) or [])
    if not props:
        return
    unknown = [p for p in props if p not in PROPERTIES]
    if unknown:
        hint = {p.lower(): p for p in PROPERTIES}
        close = [hint[p.lower()] for p in unknown if p.lower() in hint]
        raise UserInputError(
            f"--conditioning: unknown propert{'y' if len(unknown) == 1 else 'ies'} {', '.join(map(repr, unknown))}; "
            f"choose from {', '.join(PROPERTIES)}" + (f" (did you mean {', '.join(close)}?)" if close else "")
        )
    repeated = sorted({p for p in props if props.count(p) > 1})
    if repeated:
        raise UserInputError(f"--conditioning names {', '.join(repeated)} more than once; give each property once")
    entry = find_dataset(getattr(args, "dataset", "qm9"))
    name = entry.name if entry is not None else getattr(args, "dataset", None)
    if name not in CONDITIONING_DATASETS:
        raise UserInputError(
            f"--conditioning needs --dataset qm9_second_half (EDM's conditional setting; the classifiers train on "
            f"qm9_first_half) or qm9, got {name!r}"
        )
    if getattr(args, "model", "egnn_dynamics") == "gnn_dynamics":
        raise UserInputError("--conditioning is not supported by --model gnn_dynamics (as in EDM); use egnn_dynamics")


def setup_conditioning(args: argparse.Namespace, loaders: Mapping[str, Any], prop_dist) -> dict | None:
    """The run's property normaliser ({prop: {'mean', 'mad'}}), attached to ``prop_dist``; None
    without ``--conditioning``. Sets ``args.context_node_nf`` (stored in args.pickle, as EDM does)."""
    from qm9.utils import compute_mean_mad

    props = list(getattr(args, "conditioning", None) or [])
    args.context_node_nf = len(props)
    if not props:
        return None
    entry = find_dataset(args.dataset)
    norms = compute_mean_mad(loaders, props, entry.name if entry is not None else args.dataset)
    if prop_dist is not None:
        prop_dist.set_normalizer(norms)
        # A subset lacks some sizes that N is drawn with: draw c from the nearest size it has.
        prop_dist.nearest_size_fallback = getattr(args, "data_subset", None) is not None
    return norms


def run_conditioning(args: argparse.Namespace, progress: bool = False) -> tuple[Any, dict | None]:
    """(prop_dist, property_norms) of a finished conditional run, rebuilt from its data as EDM's
    evaluation scripts do: p(c | N) from the run's training split (the second half for EDM's
    runs), mean/MAD by ``compute_mean_mad`` (its validation split for qm9_second_half).
    (None, None) for an unconditional run."""
    from configs.datasets import dataset_entry, resolve_hook
    from configs.errors import DataError
    from qm9.utils import DistributionProperty, compute_mean_mad

    props = list(getattr(args, "conditioning", None) or [])
    if not props:
        return None, None
    entry = dataset_entry(args.dataset)
    if entry.name not in CONDITIONING_DATASETS or entry.split_arrays is None:
        raise DataError(f"a conditional run needs dataset qm9_second_half or qm9 (its property values); it has {args.dataset!r}")
    load = resolve_hook(entry.split_arrays)
    splits = {split: load(args.datadir, split, remove_h=bool(getattr(args, "remove_h", False)), progress=progress)
              for split in ("train", "valid")}
    try:
        norms = compute_mean_mad(splits, props, entry.name)
        prop_dist = DistributionProperty(splits["train"], props, normalizer=norms)
    except ValueError as e:
        raise DataError(" ".join(str(e).split())) from None
    return prop_dist, norms
