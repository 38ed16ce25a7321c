"""Helpers for the reference fixtures (tests/fixtures/fixture_{edm,gaga}_small.pt).

See /work/shared/reference/FIXTURES.md: fixture A ('edm') is EDM's code with charges, fixture
B ('gaga') is the GAGA fork without charges and max_t = 550; both nf = 32, 2 layers, built with
torch.manual_seed(0), with every random draw fixed and recorded.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
from pathlib import Path

import torch

from configs.datasets_config import get_dataset_info
from qm9.models import get_model

FIXTURES = Path(__file__).resolve().parent / "fixtures"
NAMES = ("edm", "gaga")


@functools.lru_cache(maxsize=None)
def load(name: str) -> dict:
    return torch.load(FIXTURES / f"fixture_{name}_small.pt", weights_only=True)


def args_of(name: str, **overrides) -> argparse.Namespace:
    args = argparse.Namespace(**load(name)["config"]["args"])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def build(name: str, **overrides):
    """(model with the fixture's weights, nodes_dist, args)."""
    args = args_of(name, **overrides)
    model, nodes_dist, _ = get_model(args, "cpu", get_dataset_info("qm9", False), None)
    model.load_state_dict(load(name)["state_dict"], strict=True)
    return model, nodes_dist, args


def model_inputs(name: str, dtype: torch.dtype = torch.float32):
    """(x, h, node_mask, edge_mask) exactly as the fixture passed them to the model."""
    inp = load(name)["inputs"]
    h = {"categorical": inp["one_hot"].to(dtype), "integer": inp["h_integer_passed"].to(dtype)}
    return inp["x"].to(dtype), h, inp["node_mask"].to(dtype), inp["edge_mask"].to(dtype)


@contextlib.contextmanager
def fixed_draws(model, t_int: torch.Tensor | None, noises: list[torch.Tensor], expect_low: int | None = None,
                expect_high: int | None = None):
    """Replace the model's random draws by the fixture's: torch.randint returns t_int (after
    checking its bounds) and the noise function returns ``noises`` in call order."""
    queue = list(noises)
    original_randint = torch.randint

    def fake_randint(low, high, size, device=None, **kwargs):
        assert (low, high) == (expect_low, expect_high), f"t drawn from [{low}, {high}), expected [{expect_low}, {expect_high})"
        assert tuple(size) == tuple(t_int.shape)
        return t_int.clone()

    def fake_noise(n_samples, n_nodes, node_mask):
        return queue.pop(0)

    if t_int is not None:
        torch.randint = fake_randint
    model.sample_combined_position_feature_noise = fake_noise
    try:
        yield
    finally:
        torch.randint = original_randint
        del model.sample_combined_position_feature_noise
    assert not queue, f"{len(queue)} fixed noise tensors were not used"
