"""Speed of GeoLDM on the CPU: our fast EGNN vs GeoLDM's algorithm, per training and sampling step.

Two implementations of the same model (same weights, same outputs), timed interleaved in one
fresh process per configuration:

* ``ours``: the fused EGNN (``--egnn_impl fast``) under the CPU device policy (size groups,
  cache-sized calls) in the encoder, the decoder and the denoiser;
* ``geoldm``: GeoLDM's (= EDM's) algorithm, our reference EGNN (``--egnn_impl reference``: the
  layers as EDM writes them, every ordered atom pair of the padded batch, messages concatenated
  then summed over senders) on the padded batch as one block (``--group_by_size false``), in
  all three networks.

Per configuration (paper's QM9 GeoLDM: nf 256, 9 layers, latent_nf 1; small: nf 64, 4 layers):

* training step: forward + backward of GeoLDM's training loss on 64 QM9 training molecules
  (encoder, decoder with its reconstruction loss, denoiser; ``qm9.losses.compute_loss_and_nll``);
* sampling step: one reverse step z_t -> z_s of the denoiser for 100 molecules (sizes from the
  QM9 histogram, padded to 29 as GeoLDM's sampler does);
* final decode: the decoder on those 100 latent molecules (once per chain).

Best of ``--repeats`` after a warm-up, milliseconds; the ratio geoldm / ours is the speed-up.

``--edm`` times EDM's model (``get_model``, same sizes, no autoencoder) the same two ways: the
README's Speed section has EDM's own code against ours on this machine class, so this ratio
tells how our reference EGNN compares with EDM's (= GeoLDM's) code.

    python bench/bench_geoldm.py --threads 1 --repeats 3 [--configs paper,small]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

try:
    import configs  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs.datasets_config import get_dataset_info  # noqa: E402
from equivariant_diffusion.distributions import DistributionNodes  # noqa: E402
from qm9.data.collate import make_batch  # noqa: E402
from qm9.data.qm9 import load_qm9  # noqa: E402
from qm9.losses import compute_loss_and_nll, preprocess_batch  # noqa: E402
from qm9.models import get_latent_diffusion, get_model  # noqa: E402
from qm9.sampling import masks_from_sizes  # noqa: E402
from training.args import geoldm_qm9_args  # noqa: E402

CONFIGS = {"paper": dict(nf=256, n_layers=9, latent_nf=1), "small": dict(nf=64, n_layers=4, latent_nf=1)}
IMPLS = {"ours": ("fast", "auto"), "geoldm": ("reference", "false")}  # (egnn_impl, group_by_size)


def geoldm_args(nf: int, n_layers: int, latent_nf: int, egnn_impl: str, group_by_size: str) -> argparse.Namespace:
    """GeoLDM's QM9 README run (--train_diffusion --trainable_ae, charges included) at this size."""
    return geoldm_qm9_args(nf, n_layers, latent_nf, "--egnn_impl", egnn_impl, "--group_by_size", group_by_size)


def step_functions(config: str, impl: str, datadir: str, seed: int, edm: bool = False) -> dict:
    """{'train', 'sample', 'decode'} -> a callable doing one such step on the model built for ``impl``."""
    egnn_impl, group_by_size = IMPLS[impl]
    args = geoldm_args(**CONFIGS[config], egnn_impl=egnn_impl, group_by_size=group_by_size)
    info = get_dataset_info("qm9", False)
    torch.manual_seed(0)  # the same weights for both implementations
    if edm:
        args.train_diffusion = False
        model, nodes_dist, _ = get_model(args, "cpu", info, None)
    else:
        model, nodes_dist, _ = get_latent_diffusion(args, "cpu", info, None)

    arrays = load_qm9(datadir, "train", progress=False)
    rows = np.random.default_rng(seed).choice(len(arrays["num_atoms"]), 64, replace=False)
    batch = make_batch(arrays["positions"][rows], arrays["charges"][rows], arrays["one_hot"][rows],
                       arrays["num_atoms"][rows], arrays["index"][rows])
    x, h, node_mask, edge_mask, context = preprocess_batch(batch, "cpu", torch.float32, True, False)

    def train_step():
        model.train()
        model.zero_grad(set_to_none=True)
        nll, _, _ = compute_loss_and_nll(args, model, nodes_dist, x, h, node_mask, edge_mask, context)
        nll.backward()

    torch.manual_seed(seed)
    sizes = DistributionNodes(info["n_nodes"]).sample(100)
    s_node_mask, s_edge_mask = masks_from_sizes(sizes, info["max_n_nodes"], "cpu")
    z = model.sample_combined_position_feature_noise(len(sizes), info["max_n_nodes"], s_node_mask)
    t = torch.full((len(sizes), 1), 0.5)
    s = torch.full((len(sizes), 1), 0.499)

    def sample_step():
        model.eval()
        with torch.no_grad():
            model.sample_p_zs_given_zt(s, t, z, s_node_mask, s_edge_mask, None)

    def decode():
        model.eval()
        with torch.no_grad():
            model.vae.decode(z, s_node_mask, s_edge_mask, None)

    steps = {"train": train_step, "sample": sample_step}
    if not edm:
        steps["decode"] = decode
    return steps


def measure(config: str, impls: list[str], repeats: int, datadir: str, seed: int, edm: bool = False) -> dict:
    """Best of ``repeats`` ms per step kind and implementation, the implementations interleaved
    (ours, geoldm, ours, ...) so that load from other work on the machine hits both alike."""
    cases = {impl: step_functions(config, impl, datadir, seed, edm) for impl in impls}
    best: dict = {impl: {} for impl in impls}
    for kind in cases[impls[0]]:
        for impl in impls:
            cases[impl][kind]()  # warm-up
        for _ in range(repeats):
            for impl in impls:
                start = time.perf_counter()
                cases[impl][kind]()
                elapsed = (time.perf_counter() - start) * 1000.0
                best[impl][f"{kind}_ms"] = round(min(best[impl].get(f"{kind}_ms", float("inf")), elapsed), 1)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="paper,small")
    parser.add_argument("--impls", default="ours,geoldm")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--datadir", default="qm9/temp")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--edm", action="store_true", help="time EDM's model instead (calibrates our reference EGNN against EDM's code)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    configs_, impls = opts.configs.split(","), opts.impls.split(",")
    for name in configs_:
        if name not in CONFIGS:
            raise SystemExit(f"unknown config {name!r}; choose from {', '.join(CONFIGS)}")
    for name in impls:
        if name not in IMPLS:
            raise SystemExit(f"unknown implementation {name!r}; choose from {', '.join(IMPLS)}")
    if opts.worker:
        torch.set_num_threads(opts.threads)
        print(json.dumps(measure(configs_[0], impls, opts.repeats, opts.datadir, opts.seed, opts.edm)))
        return

    report = {"model": "EDM" if opts.edm else "GeoLDM", "threads": opts.threads, "repeats": opts.repeats, "torch": torch.__version__,
              "load_average_at_start": [round(v, 2) for v in os.getloadavg()], "results": {}}
    for config in configs_:
        # one fresh process per configuration: thread pools and kernel caches start alike
        cmd = [sys.executable, __file__, "--worker", "--configs", config, "--impls", ",".join(impls), "--repeats",
               str(opts.repeats), "--threads", str(opts.threads), "--datadir", opts.datadir, "--seed", str(opts.seed)]
        done = subprocess.run(cmd + (["--edm"] if opts.edm else []), capture_output=True, text=True)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines()
            raise SystemExit(f"benchmark worker failed: {lines[-1] if lines else done.returncode}")
        result = {**CONFIGS[config], **json.loads(done.stdout)}
        if "ours" in result and "geoldm" in result:
            result["speedup"] = {k[:-3]: round(result["geoldm"][k] / result["ours"][k], 2) for k in result["ours"]}
        print(json.dumps({config: result}), file=sys.stderr, flush=True)
        report["results"][config] = result
    report["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(report, indent=1))
    for config, result in report["results"].items():
        if "speedup" in result:
            sp = result["speedup"]
            parts = [f"{label} {result['geoldm'][key + '_ms']:.0f} / {result['ours'][key + '_ms']:.0f} ms = {sp[key]}x"
                     for key, label in (("train", "training step"), ("sample", "sampling step"), ("decode", "final decode")) if key in sp]
            print(f"{report['model']} {config}: " + ", ".join(parts) + " (EDM's/GeoLDM's algorithm / ours)")


if __name__ == "__main__":
    main()
