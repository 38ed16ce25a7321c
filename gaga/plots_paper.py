"""PNG figures of the paper's dataset-level evaluator (gaga/evaluator_paper.py); Agg backend."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from gaga.plots import save_figure  # noqa: E402

_CONVENTION_COLOURS = {"rms": "tab:red", "variance": "tab:purple", "unbiased": "tab:blue", "per_modality": "tab:green", "given": "k"}


def plot_paper_evaluator(result: dict, path: str | Path, title: str = "") -> Path:
    """D_t per convention, Dep_t (with 95% bootstrap bands) and H^(2), H^(4) against t; thresholds and T's marked."""
    c = result["curves"]
    t = np.asarray(c["t"])
    primary = result["convention"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    ax = axes[0]
    for name, rec in result["per_convention"].items():
        style = dict(linewidth=2 if name == primary else 1)
        ax.plot(t, c[f"D_{name}"], marker="o", markersize=3, color=_CONVENTION_COLOURS.get(name), label=f"v^ {name} (T_DS {rec['T_DS']})", **style)
    if f"D_{primary}_lo" in c:
        ax.fill_between(t, c[f"D_{primary}_lo"], c[f"D_{primary}_hi"], color=_CONVENTION_COLOURS.get(primary, "k"), alpha=0.25, label="95% bootstrap (molecules)")
    ax.axhline(result["eps_ds"], color="k", linestyle="--", linewidth=1, label=f"eps_DS = {result['eps_ds']:.3g} ({result['eps_source']['ds']})")
    ax.set_yscale("log")
    ax.set_title("D_t: mean KS distance to N(0, v~_t)")
    ax = axes[1]
    ax.plot(t, c["Dep"], marker="o", markersize=3, color="k", linewidth=2, label=f"Dep (all pairs), T_ID {result['T_ID']}")
    ax.plot(t, c["Dep_features"], color="tab:orange", label="within an atom (channel pairs)")
    ax.plot(t, c["Dep_atoms"], color="tab:green", label="between atoms (same channel)")
    if "Dep_lo" in c:
        ax.fill_between(t, np.maximum(c["Dep_lo"], 1e-5), c["Dep_hi"], color="k", alpha=0.2, label="95% bootstrap")
    ax.axhline(result["eps_dep"], color="k", linestyle="--", linewidth=1, label=f"eps_dep = {result['eps_dep']:.3g} ({result['eps_source']['dep']})")
    ax.set_yscale("log")
    ax.set_title("Dep(x_t): mean k-NN MI (nats)")
    ax = axes[2]
    ax.plot(t, c["H2"], marker="o", markersize=3, color="tab:blue", label="H^(2) (beta = 1)")
    ax.plot(t, c["H4"], marker="o", markersize=3, color="tab:red", label="H^(4) (w3 = 1/6, w4 = 1/24)")
    ax.plot(t, c["H4_null"], color="gray", linestyle=":", label="H^(4) of Gaussian data, same shape")
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_title("Gaussianity functional of (atom a, atom b)")
    for ax in axes:
        ts = result["T_star"]
        if ts is not None:
            ax.axvline(ts, color="k", linestyle=":", linewidth=1)
        ax.set_xlabel("diffusion step t")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path, title or f"paper evaluator: T* = {result['T_star']} (v^ {primary})")


def plot_t_star_vs_eps(table: pd.DataFrame, result: dict, path: str | Path, title: str = "") -> Path:
    """T_DS against eps_DS (each convention) and T_ID against eps_dep; the chosen eps marked."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ds = table[table["kind"] == "ds"]
    for name in result["per_convention"]:
        y = pd.to_numeric(ds[f"T_DS_{name}"], errors="coerce")
        axes[0].step(ds["eps"], y, where="post", color=_CONVENTION_COLOURS.get(name), label=f"T_DS, v^ {name}")
    axes[0].axvline(result["eps_ds"], color="k", linestyle="--", linewidth=1, label="chosen eps_DS")
    axes[0].set_xlabel("eps_DS")
    dep = table[table["kind"] == "dep"]
    axes[1].step(dep["eps"], pd.to_numeric(dep["T_ID"], errors="coerce"), where="post", color="k", label="T_ID")
    axes[1].axvline(result["eps_dep"], color="k", linestyle="--", linewidth=1, label="chosen eps_dep")
    axes[1].set_xlabel("eps_dep (nats)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_ylabel("first t with statistic <= eps")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path, title or "T_DS and T_ID against the thresholds (T* = max of the two)")


def plot_t_star_vs_size(sweep: list[dict], path: str | Path, title: str = "") -> Path:
    """T_ID, T_DS and T* (each convention) against the number of molecules, thresholds recalibrated per size."""
    frame = pd.DataFrame(sweep)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(frame["n_molecules"], pd.to_numeric(frame["T_ID"], errors="coerce"), marker="s", color="k", label="T_ID")
    for column in frame.columns:
        if column.startswith("T_star_"):
            name = column[len("T_star_"):]
            ax.plot(frame["n_molecules"], pd.to_numeric(frame[column], errors="coerce"), marker="o",
                    color=_CONVENTION_COLOURS.get(name), label=f"T*, v^ {name}")
    ax.set_xscale("log")
    ax.set_xlabel("molecules in the sample")
    ax.set_ylabel("diffusion step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path, title or "T* against the sample size (null thresholds at each size)")


def plot_h_datasets(curves: dict[str, dict], path: str | Path, title: str = "") -> Path:
    """H^(2) and H^(4) against t for several data sets (name -> result curves), with T* in the labels."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, entry in curves.items():
        c = entry["curves"]
        for ax, key in zip(axes, ("H2", "H4")):
            ax.plot(c["t"], c[key], marker="o", markersize=3, label=f"{name} (T* {entry.get('T_star')})")
    for ax, key in zip(axes, ("H^(2)", "H^(4)")):
        ax.set_yscale("symlog", linthresh=0.1)
        ax.set_xlabel("diffusion step t")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path, title or "Gaussianity functional along the forward process")
