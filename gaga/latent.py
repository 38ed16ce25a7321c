"""GAGA in GeoLDM's latent space: the training molecules as the run's encoder maps them.

GeoLDM's diffusion never sees molecules: it is trained on latent points z_0 = [mu_x | mu_h] +
sigma_0 * eps, where (mu_x (n, 3), mu_h (n, k)) are the outputs of the run's encoder and
sigma_0 = sqrt(sigmoid(gamma_0)) = 0.0031623 is the diffusion's sigma at t = 0
(``EnLatentDiffusion.compute_latent_loss``). GAGA's questions (the variance v, when the noised
data become Gaussian, T*) are therefore asked of these latents. The released recipe never
trains the encoder, so the latent distribution of a run is fixed by the encoder weights stored
in its checkpoint.

Choices, and why:

* **The encoder mean, not a sample.** The sigma_0 noise adds exactly sigma_0^2 = 1.0e-5 to the
  variance of every channel (far below the precision any figure here is quoted at) and would
  make the analysis depend on a seed; the mean is deterministic.
* **Raw inputs.** GeoLDM's encoder reads positions in Angstrom (centred per molecule), the raw
  0/1 one-hot and raw atomic numbers (if the run has charges): ``normalize_factors`` are never
  applied on its path, so they are not applied here either, and the latents are not divided
  by anything.
* **Centring.** mu_x is centred by the encoder. The latent h is centred per molecule over its
  real atoms, as GAGA centres the one-hot (``gaga.data``); GeoLDM itself does not centre z_h
  (its noise on h is not centred), so the per-molecule mean of z_h is removed here by
  convention, exactly as the data tools treat atom types.

Channels of the resulting features: ``positions`` (0..2) and ``latent_h`` (3..3+k). The
scripts' evaluator tests every non-position channel as its second modality (its CSV columns
keep the name ``atom_types``).

The molecules are encoded in batches of one atom count (no padding inside a batch, at most
``MAX_BATCH_PAIRS`` atom pairs each), under the encoder's device policy (which splits a batch
into cache-sized calls on the CPU); only the molecules asked for are encoded.
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from configs.errors import UserInputError
from configs.run_args import load_run_args
from gaga.data import DataSpec, Features, centre_per_molecule, dataset_kind, load_features, random_subset_rows

SPACES = ("auto", "data", "latent")
LATENT_MODALITIES = ("positions", "latent_h")
# Atom pairs per encoder call (nf 256: ~270 MB per float32 pair tensor of the padded block;
# on the CPU the device policy splits a call further into cache-sized pieces).
MAX_BATCH_PAIRS = 2**18
WEIGHT_FILES = ("generative_model_ema.npy", "generative_model.npy")


@dataclass(frozen=True)
class GeoLDMRun:
    """A GeoLDM run folder: 'ldm' (EnLatentDiffusion, keys vae.*) or 'vae' (a first-stage-only run)."""

    path: str
    args: argparse.Namespace
    kind: str
    weights: str


def _weights_file(run_dir: Path, args: argparse.Namespace) -> Path | None:
    """The weights the eval scripts load: the EMA file if the run kept an EMA, else the raw one."""
    ema = float(getattr(args, "ema_decay", 0) or 0) > 0
    names = WEIGHT_FILES if ema else WEIGHT_FILES[::-1]
    for name in names:
        if (run_dir / name).is_file():
            return run_dir / name
    return None


def _peek_keys(path: Path) -> list[str]:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - unreadable weights: not recognisable as GeoLDM's
        return []
    return list(state) if isinstance(state, dict) else []


def geoldm_run(run_dir: str | os.PathLike) -> GeoLDMRun | None:
    """The run folder as a GeoLDM run, or None if it is not one (an EDM/GAGA run).

    GeoLDM's scripts record ``train_diffusion`` (True for the latent diffusion); a first-stage
    run (``train_diffusion`` False) is told apart from an EDM run by its weights, whose keys
    start with ``encoder.``. EDM runs (no ``latent_nf`` in their args) are never opened.
    """
    path = Path(run_dir)
    args = load_run_args(path)
    train_diffusion = bool(getattr(args, "train_diffusion", False))
    if not train_diffusion and not hasattr(args, "latent_nf"):
        return None
    weights = _weights_file(path, args)
    if weights is None:
        if train_diffusion:
            raise UserInputError(
                f"{path} is a GeoLDM run without weights: neither {' nor '.join(WEIGHT_FILES)} is there; "
                "the latents need the run's encoder")
        return None
    if train_diffusion:
        return GeoLDMRun(str(path), args, "ldm", str(weights))
    keys = _peek_keys(weights)
    if any(k.startswith("vae.encoder.") for k in keys):
        return GeoLDMRun(str(path), args, "ldm", str(weights))
    if any(k.startswith("encoder.egnn.") for k in keys):
        return GeoLDMRun(str(path), args, "vae", str(weights))
    return None


def resolve_space(args: argparse.Namespace) -> GeoLDMRun | None:
    """The GeoLDM run whose latents are analysed, or None for the data (``--space``)."""
    space = getattr(args, "space", "auto") or "auto"
    if space not in SPACES:
        raise UserInputError(f"--space must be one of {', '.join(SPACES)}, got {space!r}")
    if not getattr(args, "model_path", None):
        if space == "latent":
            raise UserInputError("--space latent needs --model_path <GeoLDM run folder> (the latents come from its encoder)")
        return None
    if space == "data":
        return None
    run = geoldm_run(args.model_path)
    if run is None and space == "latent":
        raise UserInputError(
            f"--space latent: {args.model_path} is not a GeoLDM run (its args.pickle has no train_diffusion and its "
            "weights no encoder); pass a GeoLDM run folder, or drop --space latent to analyse the data")
    return run


def load_encoder(run: GeoLDMRun, device: str = "cpu"):
    """The run's ``EnHierarchicalVAE`` with its stored weights (loaded strictly), in eval mode."""
    from configs.datasets_config import get_dataset_info
    from qm9.models import get_autoencoder, get_latent_diffusion, load_generative_model

    args = argparse.Namespace(**vars(run.args))
    info = get_dataset_info(str(getattr(args, "dataset", "qm9")), bool(getattr(args, "remove_h", False)))
    try:
        if run.kind == "ldm":
            model, _, _ = get_latent_diffusion(args, device, info, None)
            load_generative_model(model, run.weights, args)
            vae = model.vae
        else:
            vae, _, _ = get_autoencoder(args, device, info, None)
            load_generative_model(vae, run.weights, args)
    except ValueError as e:  # configs.errors' one-line errors are ValueErrors too; keep their text
        raise UserInputError(f"{run.path}: {e}") from None
    return vae.eval()


def encode_arrays(vae, positions: np.ndarray, one_hot: np.ndarray, charges: np.ndarray, index: np.ndarray,
                  include_charges: bool, max_pairs: int = MAX_BATCH_PAIRS, progress: bool = False) -> Features:
    """Latent features of padded molecules: positions (M, N, 3) in Angstrom, one_hot (M, N, K) 0/1,
    charges (M, N) atomic numbers (0 = padding). Returns ``Features`` with values (M, N, 3 + k)
    float64 = [mu_x | mu_h - its per-molecule mean], padding 0, channels positions / latent_h."""
    import torch

    from equivariant_diffusion.utils import remove_mean_with_mask

    mask = np.asarray(charges) > 0
    num_atoms = mask.sum(axis=1).astype(np.int64)
    m_total = mask.shape[0]
    k = int(vae.latent_node_nf)
    dtype = next(vae.parameters()).dtype
    device = next(vae.parameters()).device
    latents = np.zeros((m_total, mask.shape[1], 3 + k), dtype=np.float64)
    # Slots up to the last real atom of each molecule (QM9 stores atoms first; this also allows holes).
    last_slot = np.where(mask.any(axis=1), mask.shape[1] - np.argmax(mask[:, ::-1], axis=1), 0)
    # Batches of molecules of one padded size (no padding inside a batch), at most max_pairs pairs each.
    order = np.argsort(last_slot, kind="stable")
    sizes, starts = np.unique(last_slot[order], return_index=True)
    batches = []
    for n, rows in zip(sizes.tolist(), np.split(order, starts[1:])):
        n = max(int(n), 1)
        per_batch = max(1, max_pairs // (n * n))
        batches += [(chunk, n) for chunk in np.split(rows, np.arange(per_batch, rows.size, per_batch))]
    iterator = batches
    if progress:
        from tqdm import tqdm

        iterator = tqdm(batches, desc="encoding", unit="batch", leave=False)
    with torch.no_grad():
        for rows, n in iterator:
            node_mask = torch.from_numpy(mask[rows, :n]).to(device, dtype).unsqueeze(2)
            edge_mask = node_mask * node_mask.transpose(1, 2) * (1 - torch.eye(n, device=device, dtype=dtype))
            edge_mask = edge_mask.reshape(-1, 1)
            x = torch.from_numpy(np.ascontiguousarray(positions[rows, :n])).to(device, dtype) * node_mask
            x = remove_mean_with_mask(x, node_mask)
            h_cat = torch.from_numpy(np.ascontiguousarray(one_hot[rows, :n])).to(device, dtype) * node_mask
            if include_charges:
                h_int = torch.from_numpy(np.ascontiguousarray(charges[rows, :n])).to(device, dtype).unsqueeze(2) * node_mask
            else:
                h_int = torch.zeros(0, device=device, dtype=dtype)
            mu_x, _, mu_h, _ = vae.encode(x, {"categorical": h_cat, "integer": h_int}, node_mask, edge_mask)
            latents[rows, :n] = torch.cat([mu_x, mu_h], dim=2).double().cpu().numpy()
    return Features(
        values=centre_per_molecule(latents, mask),
        mask=mask,
        num_atoms=num_atoms,
        index=np.asarray(index, dtype=np.int64),
        channels={"positions": slice(0, 3), "latent_h": slice(3, 3 + k)},
    )


def _split_arrays(spec: DataSpec, split: str, progress: bool) -> dict[str, np.ndarray]:
    from configs.datasets import dataset_entry, resolve_hook

    if dataset_kind(spec.dataset) == "geom":
        raise UserInputError(
            "the latent analysis reads padded arrays of the split, which GEOM-Drugs does not have here (QM9 only); "
            "analyse the data with --space data")
    entry = dataset_entry(spec.dataset)
    if entry.split_arrays is None:
        raise UserInputError(f"dataset {entry.name!r} has no padded-array loader (split_arrays), which the latent analysis needs")
    load_split = resolve_hook(entry.split_arrays)
    return load_split(spec.datadir, split, remove_h=spec.remove_h, filter_n_atoms=spec.filter_n_atoms, progress=progress)


def encode_split(run: GeoLDMRun, spec: DataSpec, split: str = "train", n_molecules: int | None = None, seed: int = 0,
                 progress: bool = True, device: str = "cpu") -> tuple[Features, dict[str, Any]]:
    """The split's molecules (or a seeded random subset of ``n_molecules``, the rows
    ``random_subset_rows`` picks) encoded by the run's encoder; and a record of how."""
    start = time.perf_counter()
    arrays = _split_arrays(spec, split, progress)
    num_atoms = (arrays["charges"] > 0).sum(axis=1)
    rows = random_subset_rows(num_atoms, n_molecules, seed) if n_molecules is not None else np.arange(num_atoms.size)
    vae = load_encoder(run, device)
    features = encode_arrays(
        vae, arrays["positions"][rows], arrays["one_hot"][rows], arrays["charges"][rows], arrays["index"][rows],
        include_charges=bool(vae.include_charges), progress=progress,
    )
    record = {
        "space": "latent", "run_kind": run.kind, "weights": run.weights, "latent_nf": int(vae.latent_node_nf),
        "latent": "encoder mean [mu_x | mu_h], mu_h centred per molecule (no sigma_0 sample, no normalisation)",
        "encoded_molecules": int(len(features)), "encode_seconds": round(time.perf_counter() - start, 2),
    }
    if n_molecules is not None:
        record.update(subset_n_molecules=int(n_molecules), subset_seed=int(seed))
    return features, record


_RESOLVE = object()


def analysis_features(args: argparse.Namespace, spec: DataSpec, n_molecules: int | None = None, seed: int = 0,
                      load_data: Callable[..., Any] | None = None, run: Any = _RESOLVE) -> tuple[Any, dict[str, Any] | None]:
    """What the GAGA tools analyse: the latents of a GeoLDM run (``--space auto|latent``), encoded
    for ``n_molecules`` (a seeded subset) or the whole split; else the data features as before,
    read by ``load_data`` (default ``gaga.data.load_features``; ``n_molecules`` is then left to
    the caller). ``run``: the caller's ``resolve_space(args)`` if it already has it.
    Returns (features, latent record or None)."""
    if run is _RESOLVE:
        run = resolve_space(args)
    progress = not getattr(args, "no_progress", False)
    if run is None:
        return (load_data or load_features)(spec, split=args.split, progress=progress), None
    features, record = encode_split(run, spec, split=args.split, n_molecules=n_molecules, seed=seed, progress=progress)
    print(f"latent space of GeoLDM run {run.path}: {record['encoded_molecules']} {args.split} molecules encoded "
          f"(latent_nf {record['latent_nf']}, encoder mean) in {record['encode_seconds']:.1f} s")
    return features, record


def add_space_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--space", default="auto", choices=SPACES,
        help="auto: the latents of a GeoLDM run (--model_path), the data otherwise; latent: require a GeoLDM run; "
             "data: the molecules themselves")
