"""PNG figures of the Gaussianity tests (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
import pandas as pd  # noqa: E402

_MODALITY_STYLE = {"positions": "tab:blue", "atom_types": "tab:orange"}


def _mark_t_star(ax, t_star_mean: float | None, t_star_quantile: float | None, quantile: float | None) -> None:
    if t_star_mean is not None:
        ax.axvline(t_star_mean, color="k", linestyle="--", linewidth=1, label=f"T* mean = {t_star_mean:.0f}")
    if t_star_quantile is not None:
        ax.axvline(t_star_quantile, color="k", linestyle=":", linewidth=1, label=f"T* q{quantile:g} = {t_star_quantile:.0f}")


def plot_gaussianity(
    summary: pd.DataFrame,
    path: str | Path,
    t_star_mean: float | None = None,
    t_star_quantile: float | None = None,
    quantile: float | None = None,
    alpha: float | None = None,
    mi_threshold: float | None = None,
    title: str = "",
) -> Path:
    """Three panels against t: pass rates, mean KS statistic per modality, mean MI; T* marked.

    ``summary`` is step_estimation.per_timestep_summary(results) (index t, mean columns).
    """
    t = summary.index.to_numpy()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for column, label, style in (
        ("pass", "all tests", dict(color="k", linewidth=2)),
        ("pass_positions", "positions", dict(color=_MODALITY_STYLE["positions"])),
        ("pass_atom_types", "atom types", dict(color=_MODALITY_STYLE["atom_types"])),
        ("pass_mi_atoms", "MI between atoms", dict(color="tab:green")),
    ):
        if column in summary:
            ax.plot(t, summary[column], marker="o", markersize=3, label=label, **style)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("fraction of molecules passing")
    ax.set_title("pass rate")
    _mark_t_star(ax, t_star_mean, t_star_quantile, quantile)

    ax = axes[1]
    for modality, color in _MODALITY_STYLE.items():
        if f"ks_stat_{modality}" in summary:
            ax.plot(t, summary[f"ks_stat_{modality}"], marker="o", markersize=3, color=color, label=f"KS D {modality}")
        if f"pass_ks_{modality}" in summary:
            ax.plot(t, summary[f"pass_ks_{modality}"], linestyle="--", color=color, alpha=0.6, label=f"pass rate (p > {alpha or 0.05:g})")
    ax.set_title("Kolmogorov-Smirnov vs N(0, v_t)")
    ax.set_ylabel("mean KS statistic / pass rate")
    _mark_t_star(ax, t_star_mean, t_star_quantile, quantile)

    ax = axes[2]
    for column, label, color in (
        ("mi_features_positions", "features, positions", _MODALITY_STYLE["positions"]),
        ("mi_features_atom_types", "features, atom types", _MODALITY_STYLE["atom_types"]),
        ("mi_atoms", "between atoms", "tab:green"),
    ):
        if column in summary:
            ax.plot(t, summary[column], marker="o", markersize=3, color=color, label=label)
    if mi_threshold is not None:
        ax.axhline(mi_threshold, color="tab:red", linewidth=1, label=f"threshold {mi_threshold:g}")
    ax.set_title("k-NN mutual information (mean)")
    ax.set_ylabel("nats")
    _mark_t_star(ax, t_star_mean, t_star_quantile, quantile)

    for ax in axes:
        ax.set_xlabel("diffusion step t")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path, title)


def plot_first_pass_histogram(counts: dict[str, int], path: str | Path, t_star_mean: float | None = None, title: str = "") -> Path:
    """Bar chart: number of molecules whose first consistent pass is at each grid point."""
    labels = list(counts)
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.bar(range(len(labels)), [counts[k] for k in labels], color="tab:blue")
    ax.set_xticks(range(len(labels)), labels, rotation=45)
    ax.set_xlabel("first t passing at two consecutive grid points")
    ax.set_ylabel("molecules")
    if t_star_mean is not None:
        ax.set_title(f"{title} (mean T* = {t_star_mean:.1f})".strip())
    return save_figure(fig, path)


def save_figure(fig, path: str | Path, title: str = "") -> Path:
    """Title (if any), tight layout, PNG at 120 dpi, close; returns the path."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
