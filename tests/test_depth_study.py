"""
Checks on experiments/depth_study.py's own parts: the cost charged for per-sub-layer GradDrop
(compare_methods.atp_cost), the grid that makes its rankings the same on every CPU, and the accuracy
floor for its models. (The estimators it scores are atp_minimal's, tested in tests/test_atp.py and
tests/test_reference.py.) `pytest -s tests/test_depth_study.py`.
"""

import os

import torch

import compare_methods
import depth_study


def test_sublayer_cost_counts_the_partial_backward_passes():
    # L = 1: AtP (4), then the pass dropping mlp_0 reaches attn_0 only (half a block: 2 * 0.5 = 1); the
    # QK fix: 1 for the plain gradient and 1 in the pass dropping mlp_0. Neurons have nothing to fix.
    assert compare_methods.atp_cost(1, True, True, ("q",), unit="sublayer") == 4 + 1 + 1 + 1
    assert compare_methods.atp_cost(1, True, True, ("neuron",), unit="sublayer") == 4 + 1
    for L in (2, 4, 12):  # in general 4 + (2L - 1), and L + 1 more for the QK fix
        sub = compare_methods.atp_cost(L, True, True, ("q",), unit="sublayer")
        block = compare_methods.atp_cost(L, True, True, ("q",))
        print(f"  L = {L:2d}: AtP* {block:5.1f}, per-sub-layer {sub:5.1f} forward passes per pair")
        assert abs(sub - (4 + (2 * L - 1) + 1 + L)) < 1e-12


def test_grid_turns_last_bit_differences_into_ties_broken_in_natural_order():
    x = torch.tensor([1.0, 3.0, 3.0 * (1 + 4e-16), 2.0, 3.0 * (1 - 4e-16)], dtype=torch.float64)
    on = depth_study.on_grid(x)
    assert on[1] == on[2] == on[4]
    assert compare_methods.rank_by_score(on).tolist() == [1, 2, 4, 3, 0]
    assert torch.equal(depth_study.on_grid(torch.zeros(3)), torch.zeros(3))


def test_a_model_below_the_accuracy_floor_is_recorded_and_not_used(tmp_path, monkeypatch):
    # Two training steps leave a 2-layer model at chance: its record is written, its weights are not
    # (and a checkpoint an earlier run left there is removed), and reading it back gives no model.
    monkeypatch.setattr(depth_study, "MODELS_DIR", str(tmp_path))
    monkeypatch.setitem(depth_study.RECIPE, "steps", 2)
    stale = tmp_path / "L2_seed0"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"left by an earlier run")
    model, record = depth_study.get_model(2, 0, retrain=True)
    print(f"  2 steps: held-out accuracy {record['test_accuracy']:.3f}, files {sorted(os.listdir(stale))}")
    assert model is None and record["test_accuracy"] < depth_study.MIN_ACCURACY
    assert sorted(os.listdir(stale)) == ["training.json"]
    again, same = depth_study.get_model(2, 0)
    assert again is None and same == record
