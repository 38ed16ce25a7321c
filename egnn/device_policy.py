"""How the network runs on each device: the one place that decides it.

* CPU: molecules run in size groups, each padded only to its group's largest molecule, in
  calls of at most ``cpu_chunk_pairs(nf)`` atom pairs (cache-sized edge tensors). Skipping
  padded pairs saves real work on a CPU, where every op is cheap to launch.
* Any other device (CUDA, and the stand-in accelerator of the tests): the padded batch runs as
  one block. Each extra group multiplies the kernel launches (~180 per network call for the
  paper's model), and with ~10-20 us per launch that costs more than the padded pairs; the
  factorised first layer and the fused pair kernels are kept, as they add no launches.

``--group_by_size auto|true|false`` selects it (auto: grouped iff the tensors are on the CPU);
the rule keys on "not cpu", so a stand-in device exercises the accelerator policy.
"""
from __future__ import annotations

import argparse

import torch

GROUP_BY_SIZE_CHOICES = ("auto", "true", "false")


def group_by_size_choice(text: str | bool) -> str:
    """argparse type of ``--group_by_size``: 'auto', 'true' or 'false' (True/False, yes/no, 1/0 too)."""
    if isinstance(text, bool):
        return "true" if text else "false"
    lowered = str(text).strip().lower()
    if lowered == "auto":
        return "auto"
    if lowered in ("true", "t", "yes", "y", "1", "on"):
        return "true"
    if lowered in ("false", "f", "no", "n", "0", "off"):
        return "false"
    raise argparse.ArgumentTypeError(f"expected auto, true or false, got {text!r}")


def normalise_group_by_size(value: str | bool | None) -> str:
    """A run's stored setting as 'auto'/'true'/'false' (runs from before the flag: auto)."""
    if value is None:
        return "auto"
    try:
        return group_by_size_choice(value)
    except argparse.ArgumentTypeError:
        raise ValueError(f"group_by_size must be auto, true or false, got {value!r}") from None


def groups_by_size(setting: str | bool, device: torch.device) -> bool:
    """Whether the network runs on size groups for tensors on ``device``."""
    choice = normalise_group_by_size(setting)
    if choice == "auto":
        return device.type == "cpu"
    return choice == "true"


def cpu_chunk_pairs(hidden_nf: int) -> int:
    """Largest number of atom pairs per grouped network call: edge tensors of ~4 MB (float32),
    ~8 MB at nf <= 64, where each call's fixed cost (~30 small ops per layer) weighs more than
    the cache misses (a QM9 batch of 64 then runs in one call instead of two; measured
    `bench/bench_geoldm.py --configs small`; at nf 256 8 MB was slower)."""
    return int((2**21 if hidden_nf <= 64 else 2**20) // hidden_nf)


def group_overhead_pairs(hidden_nf: int, device: torch.device) -> float:
    """Fixed cost of one more size group, in atom pairs of work (a few small kernels per layer).

    On a CPU a launch costs about as much as 6400 / nf pairs; elsewhere a launch (~10 us)
    costs about as much as a few thousand pairs of a GPU's throughput per layer, so groups
    pay off only for very uneven batches.
    """
    per_launch = 6400.0 / hidden_nf
    return per_launch if device.type == "cpu" else 200.0 * per_launch


def chunk_pairs(hidden_nf: int, device: torch.device) -> int:
    """Pair cap per call (0: none). Only the CPU chunks; a GPU wants one big call."""
    return cpu_chunk_pairs(hidden_nf) if device.type == "cpu" else 0


def configure_matmul(device: torch.device, tf32: bool) -> None:
    """Opt-in TF32 matmuls/convolutions on CUDA (``--tf32``); off by default so results stay fp32."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
        torch.backends.cudnn.allow_tf32 = bool(tf32)


def compile_network(fn, backend: str | None):
    """``torch.compile(fn)`` with ``backend`` ('inductor' on a GPU; 'aot_eager' compiles nothing,
    for tests), or ``fn`` itself when backend is None.

    The padded size changes from batch to batch: torch.compile makes shapes dynamic after the
    first recompile, and the recompile limit is raised so a dataset's sizes never fall back to eager.
    """
    if not backend:
        return fn
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(int(torch._dynamo.config.cache_size_limit), 64)
    return torch.compile(fn, backend=backend, dynamic=None)
