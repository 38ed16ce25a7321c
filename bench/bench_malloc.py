"""CPU seconds (user, sys) of a fixed sampling workload with and without the malloc tuning
(configs/malloc_tuning.py), each in a fresh process, alternating; CPU time is less sensitive
to other jobs on the machine than wall time.

    python bench/bench_malloc.py [--pairs 3] [--steps 100] [--molecules 100] [--nf 64] [--n_layers 4]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

WORKLOAD = r"""
import sys, time, torch
torch.set_num_threads(1)
from configs.datasets_config import get_dataset_info
from qm9.models import get_model
from qm9.sampling import sample
import argparse
nf, n_layers, steps, molecules = (int(a) for a in sys.argv[1:5])
args = argparse.Namespace(model="egnn_dynamics", nf=nf, n_layers=n_layers, inv_sublayers=1, attention=True, tanh=True,
    norm_constant=1, sin_embedding=False, normalization_factor=1, aggregation_method="sum", condition_time=True,
    context_node_nf=0, diffusion_steps=1000, diffusion_noise_schedule="polynomial_2", diffusion_noise_precision=1e-5,
    diffusion_loss_type="l2", normalize_factors=[1, 4, 10], include_charges=False, conditioning=[], remove_h=False,
    dataset="qm9", max_t=None, dataset_var=1.0)
info = get_dataset_info("qm9", False)
torch.manual_seed(0)
model, nodes_dist, _ = get_model(args, "cpu", info, None)
model.eval()
sizes = nodes_dist.sample(molecules)
start = time.perf_counter()
sample(args, torch.device("cpu"), model, info, nodesxsample=sizes, start_step=steps, dataset_var=1.0)
print(time.perf_counter() - start)
"""


def run(tuned: bool, argv: list[str]) -> dict[str, float]:
    env = dict(os.environ, EDM_MALLOC_TUNING="1" if tuned else "0", OMP_NUM_THREADS="1")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([sys.executable, "-c", WORKLOAD, *argv], env=env, capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"wall_sampling_s": float(out.stdout.split()[-1]), "user_s": after.ru_utime - before.ru_utime,
            "sys_s": after.ru_stime - before.ru_stime}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--molecules", type=int, default=100)
    p.add_argument("--nf", type=int, default=64)
    p.add_argument("--n_layers", type=int, default=4)
    a = p.parse_args()
    argv = [str(a.nf), str(a.n_layers), str(a.steps), str(a.molecules)]
    rows = []
    for _ in range(a.pairs):
        for tuned in (False, True):
            rows.append({"malloc_tuning": tuned, **run(tuned, argv)})
            print(json.dumps(rows[-1]), flush=True)
    for tuned in (False, True):
        mine = [r for r in rows if r["malloc_tuning"] == tuned]
        print(json.dumps({"malloc_tuning": tuned, **{k: round(min(r[k] for r in mine), 2) for k in mine[0] if k != "malloc_tuning"}}))


if __name__ == "__main__":
    main()
