"""EDM's property classifier and #Atoms baseline on our dense layers reproduce
fixture_property_classifier_small.pt (nf 32, 2 layers): seeded initialisation, every activation,
predictions, per-property losses, one training step; and EDM's default classifier has exactly
the published key list (edm_learned_gnn_classifier_state_dict.txt (c), (d))."""
from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from qm9.property_prediction.models_property import classifier_inputs, get_model
from qm9.property_prediction.recipe import make_optimizer, normalised_l1, physical_mae, start_epoch

FIXTURES = Path(__file__).resolve().parent / "fixtures"
B, N = 8, 29


@functools.lru_cache(maxsize=None)
def fixture() -> dict:
    return torch.load(FIXTURES / "fixture_property_classifier_small.pt", weights_only=True)


def listed_section(letter: str) -> dict[str, tuple[int, ...]]:
    shapes, inside = {}, False
    for line in (FIXTURES / "edm_learned_gnn_classifier_state_dict.txt").read_text().splitlines():
        if line.startswith("## ("):
            inside = line.startswith(f"## ({letter})")
            continue
        if inside and line.strip() and not line.startswith("#"):
            key, shape = line.split("\t")[:2]
            shapes[key] = tuple(int(n) for n in re.findall(r"\d+", shape))
    return shapes


def classifier():
    model = get_model("egnn", nf=32, n_layers=2)
    model.load_state_dict(fixture()["state_dict"], strict=True)
    return model


def batch() -> dict[str, torch.Tensor]:
    inp = fixture()["inputs"]
    return {"positions": inp["positions"], "one_hot": inp["one_hot"], "atom_mask": inp["atom_mask"], "edge_mask": inp["edge_mask"]}


def test_default_classifier_and_numnodes_have_edm_keys_and_shapes():
    model = get_model("egnn")
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == listed_section("c")
    assert sum(p.numel() for p in model.parameters()) == 743944
    numnodes = get_model("numnodes")
    assert {k: tuple(v.shape) for k, v in numnodes.state_dict().items()} == listed_section("d")
    with pytest.raises(ValueError, match="'egnn' or 'numnodes'"):
        get_model("naive_bayes")


def test_seeded_initialisation_equals_edm():
    torch.manual_seed(0)
    model = get_model("egnn", nf=32, n_layers=2)
    for key, value in fixture()["state_dict"].items():
        assert torch.equal(model.state_dict()[key], value), key
    torch.manual_seed(1)
    numnodes = get_model("numnodes")
    for key, value in fixture()["numnodes"]["state_dict"].items():
        assert torch.equal(numnodes.state_dict()[key], value), key


def test_activations_and_prediction_equal_the_fixture():
    model = classifier()
    model.group_by_size = "false"  # EDM's padded layout: the recorded activations include padded rows
    ref = fixture()
    seen = {}
    for i in range(2):
        model._modules[f"gcl_{i}"].register_forward_hook(lambda m, a, o, i=i: seen.update({f"h_gcl_{i}": o.detach()}))
    model.node_dec.register_forward_hook(lambda m, a, o: seen.update(node_dec_out=o.detach()))
    model.graph_dec.register_forward_hook(lambda m, a, o: seen.update(graph_dec_out=o.detach(), graph_sum=a[0].detach()))
    kwargs = classifier_inputs(batch())
    pred = model(**kwargs)
    for key in ("h_gcl_0", "h_gcl_1", "node_dec_out", "graph_sum", "graph_dec_out"):
        # Padded rows included: EDM does not mask atoms inside the layers.
        assert_close(seen[key], ref["activations"][key], atol=1e-5, rtol=1e-5, msg=key)
    assert_close(pred, ref["pred"], atol=1e-5, rtol=0)
    model.group_by_size = "true"  # size groups (the CPU default): the same prediction
    assert_close(model(**kwargs), ref["pred"], atol=1e-5, rtol=0)
    model.group_by_size = "false"
    # EDM's edge list (get_adj_matrix) is accepted; padding does not change the prediction.
    rows = ref["inputs"]["edges_row"], ref["inputs"]["edges_col"]
    assert torch.equal(model(**{**kwargs, "edges": rows}), pred)
    trimmed = batch()
    n = 25
    keep = torch.zeros(B, N, N, dtype=torch.bool)
    keep[:, :n, :n] = True
    trimmed = {"positions": trimmed["positions"][:, :n], "one_hot": trimmed["one_hot"][:, :n],
               "atom_mask": trimmed["atom_mask"][:, :n], "edge_mask": trimmed["edge_mask"].view(B, N, N)[keep].view(-1, 1)}
    sub = [1, 2, 3, 4, 5, 6, 7]  # molecules of at most 25 atoms
    small = {k: (v[sub] if k != "edge_mask" else v.view(B, n * n)[sub].reshape(-1, 1)) for k, v in trimmed.items()}
    assert_close(model(**classifier_inputs(small)), pred[sub], atol=1e-5, rtol=0)


def test_per_property_losses_and_numnodes_equal_the_fixture():
    model = classifier()
    ref = fixture()
    kwargs = classifier_inputs(batch())
    pred = model(**kwargs)
    torch.manual_seed(1)
    numnodes = get_model("numnodes")
    numnodes.load_state_dict(ref["numnodes"]["state_dict"])
    pred_nn = numnodes(**kwargs)
    assert_close(pred_nn, ref["numnodes"]["pred"], atol=1e-6, rtol=0)
    for prop, values in ref["per_property"].items():
        mean, mad, label = values["mean"], values["mad"], values["label"]
        assert_close(mad * pred + mean, values["pred_physical"], atol=1e-4, rtol=1e-6)
        assert_close(normalised_l1(pred, label, mean, mad), values["train_loss_normalized_L1"], atol=1e-5, rtol=1e-6)
        assert_close(physical_mae(pred, label, mean, mad).item(), values["eval_mae_physical"], atol=1e-4, rtol=1e-6)
        assert_close(physical_mae(pred_nn, label, mean, mad).item(), values["numnodes_eval_mae_physical"], atol=1e-4, rtol=1e-6)
    assert abs(ref["per_property"]["alpha"]["eval_mae_physical"] - 25.79586) < 1e-4


def test_one_training_step_equals_edm_recipe():
    model = classifier()
    ref = fixture()["train_step_alpha"]
    optimizer, scheduler = make_optimizer(model, lr=5e-4, weight_decay=1e-16, epochs=1000)
    lr = start_epoch(scheduler)
    assert lr == pytest.approx(ref["lr_used"], rel=1e-12)
    alpha = fixture()["per_property"]["alpha"]
    pred = model(**classifier_inputs(batch()))
    loss = normalised_l1(pred, alpha["label"], alpha["mean"], alpha["mad"])
    assert_close(loss.item(), ref["loss"], atol=1e-5, rtol=1e-6)
    optimizer.zero_grad()
    loss.backward()
    for name, param in model.named_parameters():
        assert_close(param.grad, ref["grads"][name], rtol=1e-4, atol=1e-6, msg=name)
    optimizer.step()
    for name, value in model.state_dict().items():
        assert_close(value, ref["state_dict_after"][name], rtol=1e-5, atol=1e-6, msg=name)


def fixture_loader(batch_size: int):
    """Our dataloader over the fixture's 8 molecules (trimmed batches, property columns)."""
    import numpy as np

    from qm9.data.collate import make_dataloader

    inp = fixture()["inputs"]
    charges = (inp["one_hot"].float() @ torch.tensor([1.0, 6, 7, 8, 9])).long().numpy()
    arrays = {"positions": inp["positions"].numpy(), "charges": charges, "one_hot": inp["one_hot"].bool().numpy(),
              "num_atoms": inp["n_nodes"].numpy(), "index": inp["qm9_index"].numpy()}
    arrays.update({p: v["label"].numpy().astype(np.float32) for p, v in fixture()["per_property"].items()})
    return make_dataloader(arrays, batch_size=batch_size, shuffle=False)


def test_train_epoch_and_evaluate_mae_follow_edm_recipe():
    from qm9.property_prediction.recipe import evaluate_mae, train_epoch

    ref = fixture()
    model = classifier()
    for prop, values in ref["per_property"].items():
        # Batches trimmed to their largest molecule and split unevenly give the same MAE.
        assert evaluate_mae(model, fixture_loader(3), prop, values["mean"], values["mad"]) == pytest.approx(
            values["eval_mae_physical"], abs=1e-4)
    alpha = ref["per_property"]["alpha"]
    optimizer, scheduler = make_optimizer(model, lr=5e-4)
    start_epoch(scheduler)
    loss = train_epoch(model, fixture_loader(8), optimizer, "alpha", alpha["mean"], alpha["mad"])
    assert loss == pytest.approx(ref["train_step_alpha"]["loss"], abs=1e-5)
    for name, value in model.state_dict().items():
        assert_close(value, ref["train_step_alpha"]["state_dict_after"][name], rtol=1e-5, atol=1e-6, msg=name)
