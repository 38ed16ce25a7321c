"""get_model builds EDM's parameter set from a run's args; checkpoints load strictly or fail
with one line that names the problem; the GAGA mode is read or inferred from the args."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import torch

import edm_fixtures as ef
from configs.datasets_config import get_dataset_info
from equivariant_diffusion.distributions import DistributionNodes
from qm9.models import CheckpointError, get_model, infer_zero_center_h, load_generative_model

REFERENCE_KEYS = Path(__file__).resolve().parent / "fixtures" / "edm_qm9_state_dict.txt"


def reference_shapes() -> dict[str, tuple[int, ...]]:
    """key -> shape from the listing of the GAGA QM9 model's state dict (EDM code, same keys)."""
    shapes = {}
    for line in REFERENCE_KEYS.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape = line.split("\t")[:2]
        shapes[key] = tuple(int(n) for n in re.findall(r"\d+", shape))
    return shapes


def gaga_qm9_args(**changes) -> argparse.Namespace:
    """The GAGA QM9 run's fields as its args.pickle holds them (legacy: no zero_center_h)."""
    fields = dict(
        model="egnn_dynamics", probabilistic_model="diffusion", nf=256, n_layers=9, inv_sublayers=1,
        attention=True, tanh=True, norm_constant=1, sin_embedding=False, normalization_factor=1,
        aggregation_method="sum", condition_time=True, context_node_nf=0, diffusion_steps=1000,
        diffusion_noise_schedule="polynomial_2", diffusion_noise_precision=1e-5, diffusion_loss_type="l2",
        normalize_factors=[1, 4, 10], include_charges=False, conditioning=[], max_t=550, remove_h=False,
        dataset="qm9",
    )
    fields.update(changes)
    return argparse.Namespace(**fields)


@pytest.fixture(scope="module")
def gaga_qm9_model():
    model, nodes_dist, prop_dist = get_model(gaga_qm9_args(), "cpu", get_dataset_info("qm9", False), None)
    return model, nodes_dist, prop_dist


def test_gaga_qm9_model_has_exactly_the_reference_keys_and_shapes(gaga_qm9_model):
    model, _, prop_dist = gaga_qm9_model
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == reference_shapes()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 5339407 and sum(p.numel() for p in model.parameters()) == 5340408
    assert not model.gamma.gamma.requires_grad
    assert prop_dist is None
    assert model.max_t == 550 and model.zero_center_h


def test_random_reference_state_dict_loads_strictly(gaga_qm9_model, tmp_path):
    model, _, _ = gaga_qm9_model
    generator = torch.Generator().manual_seed(0)
    state = {key: torch.randn(shape, generator=generator) for key, shape in reference_shapes().items()}
    path = tmp_path / "generative_model_ema.npy"
    torch.save(state, path)
    load_generative_model(model, path, gaga_qm9_args())
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_edm_checkpoint_into_gaga_model_names_the_first_bad_key_and_the_config(gaga_qm9_model, tmp_path):
    model, _, _ = gaga_qm9_model
    state = {k: torch.zeros(s) for k, s in reference_shapes().items()}
    state["dynamics.egnn.embedding.weight"] = torch.zeros(256, 7)  # an EDM (with charges) checkpoint
    path = tmp_path / "edm.npy"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as error:
        load_generative_model(model, path, gaga_qm9_args())
    message = str(error.value)
    assert "\n" not in message
    assert "dynamics.egnn.embedding.weight has shape (256, 7), the model expects (256, 6)" in message
    assert "nf=256" in message and "n_layers=9" in message and "include_charges=False" in message
    assert str(path) in message


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda s: s.pop("dynamics.egnn.e_block_8.gcl_equiv.coord_mlp.4.weight"),
         "missing key dynamics.egnn.e_block_8.gcl_equiv.coord_mlp.4.weight"),
        (lambda s: s.update({"dynamics.egnn.e_block_9.gcl_0.edge_mlp.0.weight": torch.zeros(1)}),
         "unexpected key dynamics.egnn.e_block_9.gcl_0.edge_mlp.0.weight"),
    ],
)
def test_missing_and_unexpected_keys_are_named(gaga_qm9_model, tmp_path, change, expected):
    model, _, _ = gaga_qm9_model
    state = {k: torch.zeros(s) for k, s in reference_shapes().items()}
    change(state)
    path = tmp_path / "ckpt.npy"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        load_generative_model(model, path, "nf=256, n_layers=9")


def test_corrupt_checkpoint_is_a_one_line_error_naming_the_file(tmp_path):
    model, _, _ = ef.build("edm")
    path = tmp_path / "generative_model.npy"
    path.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError) as error:
        load_generative_model(model, path, "")
    assert str(path) in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_generative_model(model, tmp_path / "missing.npy", "")


def test_fixture_checkpoints_round_trip_and_init_is_edms_for_the_same_seed(tmp_path):
    for name in ef.NAMES:
        torch.manual_seed(0)
        model, _, _ = get_model(ef.args_of(name), "cpu", get_dataset_info("qm9", False), None)
        reference = ef.load(name)["state_dict"]
        for key, value in model.state_dict().items():
            assert torch.equal(value, reference[key]), f"{name}: {key} differs from EDM's init"
        path = tmp_path / f"{name}.npy"
        torch.save(reference, path)
        load_generative_model(model, path, ef.args_of(name))


def test_gaga_mode_is_recorded_or_inferred_from_max_t():
    edm_legacy = argparse.Namespace(nf=32)  # EDM's args.pickle: no max_t
    assert not infer_zero_center_h(edm_legacy)
    assert infer_zero_center_h(argparse.Namespace(max_t=550))  # GAGA fork's args.pickle
    assert infer_zero_center_h(argparse.Namespace(max_t=1000))
    assert not infer_zero_center_h(argparse.Namespace(max_t=None))  # our runs may record max_t=None
    assert not infer_zero_center_h(argparse.Namespace(max_t=550, zero_center_h=False))  # a recorded flag wins
    assert infer_zero_center_h(argparse.Namespace(zero_center_h=True))
    model, _, _ = get_model(ef.args_of("gaga"), "cpu", get_dataset_info("qm9", False), None, zero_center_h=False)
    assert not model.zero_center_h and model.max_t == 550


def test_context_width_must_match_the_conditioning_properties():
    # Conditional models themselves are tested in test_conditional_model.py.
    with pytest.raises(ValueError, match="one context channel per property"):
        get_model(ef.args_of("edm", conditioning=["alpha"], context_node_nf=2), "cpu", get_dataset_info("qm9", False), None)
    with pytest.raises(ValueError, match="one context channel per property"):
        get_model(ef.args_of("edm", conditioning=[], context_node_nf=1), "cpu", get_dataset_info("qm9", False), None)


def test_atom_count_distribution_matches_reference_log_probabilities():
    f = ef.load("edm")
    nodes_dist = DistributionNodes(get_dataset_info("qm9", False)["n_nodes"])
    log_p = nodes_dist.log_prob(f["inputs"]["n_nodes"])
    assert log_p.dtype == torch.float32
    assert torch.equal(log_p, f["loss_train"]["log_pN"])
    torch.manual_seed(0)
    sizes = nodes_dist.sample(1000)
    assert sizes.min() >= 3 and sizes.max() <= 29 and abs(sizes.float().mean().item() - 18.0) < 0.5
    with pytest.raises(ValueError, match=r"\[2\]"):
        nodes_dist.log_prob(torch.tensor([2, 9]))
