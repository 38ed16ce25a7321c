"""Molecules as files and pictures (EDM's ``qm9/visualizer.py``, re-done).

* ``save_xyz_file`` / ``load_molecule_xyz`` / ``load_xyz_files``: XYZ files of padded batches.
* ``save_sdf_file``: an SDF of a batch, bonds from EDM's distance rule (``qm9.bond_analyze``).
* ``plot_molecule`` / ``save_molecule_png``: a 3D scatter of the atoms, coloured and sized by
  type (the dataset's ``colors_dic``/``radius_dic``), with bonds drawn as lines whose width
  grows with the bond order. Matplotlib's Agg backend: no display needed.
* ``visualize(path, dataset_info)``: a PNG beside every XYZ file of a folder, plus a grid.
* ``visualize_chain(path, dataset_info)``: PNG frames of a denoising chain and one strip.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from qm9.bond_analyze import batch_bonds, tables_for  # noqa: E402

_BACKGROUND = "black"  # EDM's pictures: white hydrogens need a dark background


def _np(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def _atom_types(one_hot: np.ndarray) -> np.ndarray:
    """Type indices from a one-hot (…, K) array, or pass type indices through."""
    return one_hot.argmax(-1) if one_hot.ndim >= 2 and one_hot.shape[-1] > 1 else one_hot.astype(np.int64)


# ------------------------------------------------------------------------- files


def save_xyz_file(
    path: str | os.PathLike,
    one_hot: Any,
    charges: Any,
    positions: Any,
    dataset_info: dict,
    id_from: int = 0,
    name: str = "molecule",
    node_mask: Any = None,
) -> list[Path]:
    """One XYZ file per molecule: ``{path}/{name}_{id:03d}.xyz`` (EDM's arguments).

    one_hot (B, N, K), positions (B, N, 3), node_mask (B, N[, 1]) (default: all atoms real).
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    one_hot, positions = _np(one_hot), _np(positions)
    if positions.ndim == 2:
        one_hot, positions = one_hot[None], positions[None]
    mask = np.ones(positions.shape[:2], bool) if node_mask is None else _np(node_mask).reshape(positions.shape[:2]) > 0.5
    types = _atom_types(one_hot)
    decoder = dataset_info["atom_decoder"]
    written = []
    for b in range(positions.shape[0]):
        real = np.flatnonzero(mask[b])
        lines = [f"{len(real)}", ""]
        lines += [f"{decoder[types[b, i]]} {positions[b, i, 0]:.9f} {positions[b, i, 1]:.9f} {positions[b, i, 2]:.9f}"
                  for i in real]
        file = folder / f"{name}_{b + id_from:03d}.xyz"
        file.write_text("\n".join(lines) + "\n")
        written.append(file)
    return written


def load_molecule_xyz(file: str | os.PathLike, dataset_info: dict) -> tuple[np.ndarray, np.ndarray]:
    """(positions (n, 3) float, one_hot (n, K) float) of an XYZ file."""
    lines = Path(file).read_text().splitlines()
    n = int(lines[0].split()[0])
    encoder = dataset_info["atom_encoder"]
    positions = np.zeros((n, 3))
    one_hot = np.zeros((n, len(dataset_info["atom_decoder"])))
    for i, line in enumerate(lines[2 : 2 + n]):
        symbol, *xyz = line.split()
        if symbol not in encoder:
            raise ValueError(f"{file}: atom type {symbol!r} is not in the dataset's atom types {list(encoder)}")
        one_hot[i, encoder[symbol]] = 1
        positions[i] = [float(v) for v in xyz[:3]]
    return positions, one_hot


def load_xyz_files(path: str | os.PathLike, shuffle: bool = False) -> list[str]:
    files = sorted(glob.glob(os.path.join(path, "*.xyz")) + glob.glob(os.path.join(path, "*.txt")))
    if shuffle:
        np.random.shuffle(files)
    return files


def save_sdf_file(path: str | os.PathLike, positions: Any, one_hot: Any, dataset_info: dict, node_mask: Any = None) -> Path:
    """All molecules of a batch in one SDF file, with bonds from EDM's distance rule.

    Molecules RDKit cannot sanitise are still written (unsanitised), so the file always
    holds one record per molecule, in order.
    """
    from rdkit import Chem
    from rdkit.Geometry import Point3D

    positions = _np(positions).astype(np.float64)
    types = _atom_types(_np(one_hot))
    mask = np.ones(positions.shape[:2], bool) if node_mask is None else _np(node_mask).reshape(positions.shape[:2]) > 0.5
    tables = tables_for(dataset_info)
    orders = batch_bonds(positions, types, mask, tables).orders
    bond_type = {1: Chem.BondType.SINGLE, 2: Chem.BondType.DOUBLE, 3: Chem.BondType.TRIPLE}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with Chem.SDWriter(str(path)) as writer:
        writer.SetKekulize(False)
        for b in range(positions.shape[0]):
            real = np.flatnonzero(mask[b])
            mol = Chem.RWMol()
            for i in real:
                mol.AddAtom(Chem.Atom(dataset_info["atom_decoder"][types[b, i]]))
            sub = orders[b][np.ix_(real, real)]
            for i, j in zip(*np.nonzero(np.triu(sub))):
                mol.AddBond(int(i), int(j), Chem.BondType.SINGLE if tables.geom else bond_type[int(sub[i, j])])
            conf = Chem.Conformer(len(real))
            for k, i in enumerate(real):
                conf.SetAtomPosition(k, Point3D(*positions[b, i]))
            mol.AddConformer(conf, assignId=True)
            mol.UpdatePropertyCache(strict=False)
            mol.SetProp("_Name", f"molecule_{b:05d}")
            writer.write(mol)
    return path


# ------------------------------------------------------------------------- pictures


def plot_molecule(ax, positions: Any, atom_types: Any, dataset_info: dict, alpha: float = 1.0) -> None:
    """Draw one molecule (n real atoms) on a 3D axis: atoms by type, bonds by order."""
    positions = _np(positions).astype(np.float64).reshape(-1, 3)
    types = _np(atom_types).astype(np.int64).reshape(-1)
    colors = np.asarray(dataset_info.get("colors_dic", ["C0"] * len(dataset_info["atom_decoder"])), dtype=object)
    radii = np.asarray(dataset_info.get("radius_dic", [0.5] * len(dataset_info["atom_decoder"])), dtype=float)
    if len(types):
        orders = batch_bonds(positions[None], types[None], np.ones((1, len(types)), bool), tables_for(dataset_info)).orders[0]
        for i, j in zip(*np.nonzero(np.triu(orders))):
            segment = positions[[i, j]]
            ax.plot(segment[:, 0], segment[:, 1], segment[:, 2], color="#BBBBBB", alpha=alpha,
                    linewidth=1.0 + 1.2 * (orders[i, j] - 1))
        finite = np.isfinite(positions).all(1)
        ax.scatter(positions[finite, 0], positions[finite, 1], positions[finite, 2], c=list(colors[types[finite]]),
                   s=900 * radii[types[finite]] ** 2, alpha=alpha, edgecolors="none", depthshade=True)
        if finite.any():
            centre = positions[finite].mean(0)
            half = float(np.abs(positions[finite] - centre).max()) + 0.6
        else:
            centre, half = np.zeros(3), 1.0
        for setter, c in zip((ax.set_xlim, ax.set_ylim, ax.set_zlim), centre):
            setter(c - half, c + half)
    ax.set_facecolor(_BACKGROUND)
    ax.set_axis_off()
    ax.set_box_aspect((1, 1, 1), zoom=1.5)


def _new_figure(n_panels: int = 1, cols: int | None = None):
    cols = cols or min(n_panels, 5)
    rows = -(-n_panels // cols)
    fig = plt.figure(figsize=(3 * cols, 3 * rows), facecolor=_BACKGROUND)
    axes = [fig.add_subplot(rows, cols, k + 1, projection="3d") for k in range(n_panels)]
    return fig, axes


def save_molecule_png(path: str | os.PathLike, positions: Any, atom_types: Any, dataset_info: dict, title: str | None = None) -> Path:
    fig, (ax,) = _new_figure(1)
    plot_molecule(ax, positions, atom_types, dataset_info)
    if title:
        ax.set_title(title, color="white", fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, facecolor=_BACKGROUND)
    plt.close(fig)
    return path


def save_grid_png(path: str | os.PathLike, molecules: Sequence[tuple[Any, Any]], dataset_info: dict,
                  titles: Sequence[str] | None = None, cols: int | None = None) -> Path:
    """Several molecules [(positions, atom_types), ...] in one picture."""
    fig, axes = _new_figure(max(len(molecules), 1), cols)
    for k, (ax, (pos, types)) in enumerate(zip(axes, molecules)):
        plot_molecule(ax, pos, types, dataset_info)
        if titles:
            ax.set_title(titles[k], color="white", fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, facecolor=_BACKGROUND)
    plt.close(fig)
    return path


def visualize(path: str | os.PathLike, dataset_info: dict, max_num: int = 25, wandb=None, spheres_3d: bool = False) -> list[Path]:
    """A PNG beside each of the first ``max_num`` XYZ files in ``path`` and a grid of them (``grid.png``)."""
    files = load_xyz_files(path)[:max_num]
    pictures, molecules = [], []
    for file in files:
        positions, one_hot = load_molecule_xyz(file, dataset_info)
        types = one_hot.argmax(-1)
        molecules.append((positions, types))
        pictures.append(save_molecule_png(Path(file).with_suffix(".png"), positions, types, dataset_info))
    if molecules:
        grid = save_grid_png(Path(path) / "grid.png", molecules, dataset_info)
        if wandb is not None:
            wandb.log({"molecules": [wandb.Image(str(p)) for p in pictures[:max_num]]})
        pictures.append(grid)
    return pictures


def visualize_chain(path: str | os.PathLike, dataset_info: dict, wandb=None, spheres_3d: bool = False,
                    n_strip: int = 10, all_frames: bool = False) -> list[Path]:
    """``chain.png``, a strip of ``n_strip`` evenly spaced frames of a chain of XYZ files
    (noise -> molecule, in file order); with ``all_frames`` also a PNG per frame."""
    files = load_xyz_files(path)
    frames = []
    for file in files:
        positions, one_hot = load_molecule_xyz(file, dataset_info)
        frames.append((positions, one_hot.argmax(-1)))
    pictures = []
    if all_frames:
        pictures = [save_molecule_png(Path(f).with_suffix(".png"), pos, types, dataset_info)
                    for f, (pos, types) in zip(files, frames)]
    if frames:
        picks = np.unique(np.linspace(0, len(frames) - 1, min(n_strip, len(frames))).round().astype(int))
        strip = save_grid_png(Path(path) / "chain.png", [frames[k] for k in picks], dataset_info,
                              titles=[f"frame {k}" for k in picks], cols=len(picks))
        if wandb is not None:
            wandb.log({"chain": wandb.Image(str(strip))})
        pictures.append(strip)
    return pictures
