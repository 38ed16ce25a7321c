"""GAGA's variance and T* in the latent space of QM9 GeoLDM models at initialisation.

GeoLDM's released recipe never trains the encoder, so a run's latent distribution is the one
of its encoder at initialisation. This builds GeoLDM's QM9 model (paper scale by default:
nf 256, 9 layers; the encoder has its one block) for each latent_nf and seed, saves it as a
run folder (args.pickle + generative_model_ema.npy, as training saves one), and runs the GAGA
tools on it exactly as a user would:

    python Variance_Estimate.py --model_path RUN --test_name T --n_molecules N
    python Gaussianity_test.py  --model_path RUN --test_name T --n_molecules N [--variance_mode per-modality]

then prints one table row per model (JSON lines, then a markdown table).

    python bench/geoldm_latents.py [--latent_nf 1,2] [--seeds 0,1,2] [--n_molecules 2000]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

import torch

try:
    import configs  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs.datasets_config import get_dataset_info  # noqa: E402
from configs.run_args import save_run_args  # noqa: E402
from qm9.models import get_latent_diffusion  # noqa: E402
from training.args import geoldm_qm9_args  # noqa: E402


def save_init_run(folder: Path, args: argparse.Namespace, seed: int) -> Path:
    """A GeoLDM run folder holding the model at initialisation from ``seed``."""
    torch.manual_seed(seed)
    model, _, _ = get_latent_diffusion(args, "cpu", get_dataset_info("qm9", False), None)
    folder.mkdir(parents=True, exist_ok=True)
    save_run_args(folder, args)
    torch.save(model.state_dict(), folder / "generative_model_ema.npy")
    return folder


def encoder_position_shift(run: Path, datadir: str, n_molecules: int) -> dict:
    """RMS of mu_x - x (Angstrom) and of mu_h over the same molecules as the tools: how far the
    untrained encoder moves the positions, and the raw scale of the latent h."""
    import numpy as np

    from gaga.data import random_subset_rows
    from gaga.latent import encode_arrays, geoldm_run, load_encoder
    from qm9.data.qm9 import load_qm9

    arrays = load_qm9(datadir, "train", progress=False)
    mask = arrays["charges"] > 0
    rows = random_subset_rows(mask.sum(1), n_molecules, 0)
    vae = load_encoder(geoldm_run(run))
    latent = encode_arrays(vae, arrays["positions"][rows], arrays["one_hot"][rows], arrays["charges"][rows],
                           arrays["index"][rows], include_charges=True)
    m = mask[rows][..., None]
    x = arrays["positions"][rows].astype(np.float64) * m
    x = (x - x.sum(1, keepdims=True) / m.sum(1, keepdims=True)) * m
    shift = latent.values[..., :3] - x
    return {"rms_mu_x_minus_x": float(np.sqrt((shift**2).sum() / (3 * m.sum()))),
            "rms_x": float(np.sqrt((x**2).sum() / (3 * m.sum())))}


def run_cli(main, argv: list[str]) -> str:
    """Run a script's main in-process, returning what it printed (also echoed to stderr)."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(argv)
    sys.stderr.write(buffer.getvalue())
    if code:
        raise SystemExit(f"{argv} exited with {code}")
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent_nf", default="1,2")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--nf", type=int, default=256)
    parser.add_argument("--n_layers", type=int, default=9)
    parser.add_argument("--n_molecules", type=int, default=2000)
    parser.add_argument("--datadir", default="qm9/temp")
    parser.add_argument("--out", default="outputs/geoldm_latents")
    parser.add_argument("--per_modality", action="store_true",
                        help="for the first seed of each latent_nf also: T* with each modality's measured variance (grid 0:1000:50), "
                             "and how far the latent positions are from the input positions")
    parser.add_argument("--threads", type=int, default=1)
    opts = parser.parse_args(argv)
    torch.set_num_threads(opts.threads)
    import Gaussianity_test
    import Variance_Estimate

    out = Path(opts.out)
    rows = []
    for k in (int(v) for v in opts.latent_nf.split(",")):
        for seed in (int(v) for v in opts.seeds.split(",")):
            start = time.perf_counter()
            name = f"k{k}_seed{seed}"
            args = geoldm_qm9_args(opts.nf, opts.n_layers, k, "--datadir", opts.datadir, "--exp_name", "geoldm_init")
            run = save_init_run(out / "runs" / name, args, seed)
            common = ["--model_path", str(run), "--test_name", name, "--n_molecules", str(opts.n_molecules),
                      "--datadir", opts.datadir, "--no_progress"]
            run_cli(Variance_Estimate.main, common + ["--out_dir", str(out / f"variance_{name}")])
            stats = json.loads((out / f"variance_{name}" / "variance.json").read_text())["statistics"]
            run_cli(Gaussianity_test.main, common + ["--out_dir", str(out / f"gauss_{name}"), "--no_plot"])
            t_star = json.loads((out / f"gauss_{name}" / "run_summary.json").read_text())["t_star"]["pass"]
            row = {
                "latent_nf": k, "seed": seed,
                "rms_all": stats["all"]["rms"], "var_all": stats["all"]["mean_square"],
                "var_positions": stats["positions"]["mean_square"], "var_latent_h": stats["latent_h"]["mean_square"],
                "t_star_mean": t_star["t_star_mean"], "t_star_q95": t_star["t_star_quantile"],
            }
            if opts.per_modality and seed == int(opts.seeds.split(",")[0]):
                row.update(encoder_position_shift(run, opts.datadir, opts.n_molecules))
                run_cli(Gaussianity_test.main, common + ["--out_dir", str(out / f"gauss_pm_{name}"), "--no_plot",
                                                         "--variance_mode", "per-modality", "--timesteps", "0:1000:50"])
                pm = json.loads((out / f"gauss_pm_{name}" / "run_summary.json").read_text())["t_star"]["pass"]
                row.update(t_star_mean_per_modality=pm["t_star_mean"], t_star_q95_per_modality=pm["t_star_quantile"])
            row["seconds"] = round(time.perf_counter() - start, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| latent_nf | seed | RMS all (v, GAGA's statistic) | var all | var positions | var latent h | T* mean | T* q0.95 |"
          + (" T* mean, per-modality v | q0.95 |" if opts.per_modality else ""))
    print("|---|---|---|---|---|---|---|---|" + ("---|---|" if opts.per_modality else ""))
    def fmt(value) -> str:
        return "-" if value is None else (f"{value:.1f}" if isinstance(value, float) else str(value))

    for r in rows:
        line = (f"| {r['latent_nf']} | {r['seed']} | {r['rms_all']:.4f} | {r['var_all']:.4f} | {r['var_positions']:.4f} | "
                f"{r['var_latent_h']:.2e} | {fmt(r['t_star_mean'])} | {fmt(r['t_star_q95'])} |")
        if opts.per_modality:
            line += f" {fmt(r.get('t_star_mean_per_modality', ''))} | {fmt(r.get('t_star_q95_per_modality', ''))} |"
        print(line)


if __name__ == "__main__":
    main()
