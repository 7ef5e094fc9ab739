"""Tests for experiments/compare_methods.py: the baselines on planted additive effects (no model needed),
the cost of verified recall and the relative cost on hand-computed examples, the counted costs, and a
small end-to-end run on a random tiny GPT. Run `pytest -s tests/test_compare_methods.py` to see the
evidence.
"""

import math
import os

import pytest
import torch

import atp_minimal as atp
import compare_methods as cm  # experiments/compare_methods.py (conftest.py puts experiments/ on sys.path)
from model import GPT, GPTConfig


# --- helpers: a fake "patch function" with additive node effects


class Additive:
    """effect_of_sets for planted node effects: the effect of a set is the sum of its members' effects
    (the node-additivity assumption of §5.1 and §6, exactly). Counts the sets it is asked for."""

    def __init__(self, effects):
        self.effects = torch.as_tensor(effects, dtype=torch.float64)  # (n,)
        self.n_sets = 0
        self.calls = 0

    def __call__(self, member):  # member (S, n) bool -> (S,)
        self.n_sets += member.shape[0]
        self.calls += 1
        return member.double() @ self.effects


def planted(n=200, seed=0):
    """n small effects (|.| < 0.01) and three large ones, in different regions of the natural order."""
    g = torch.Generator().manual_seed(seed)
    effects = 0.01 * (2 * torch.rand(n, generator=g, dtype=torch.float64) - 1)
    top = {37: 10.0, 121: -8.0, 180: 6.0}  # node -> effect; the true order is 37, 121, 180
    for i, e in top.items():
        effects[i] = e
    return effects, list(top)


# --- the rankers on planted additive effects


def test_blocks_verify_the_planted_nodes_first():
    effects, top = planted()
    fake = Additive(effects)
    r = cm.blocks_ranking(fake, len(effects), block_size=10)
    first_blocks = r.order[:30].tolist()  # the three blocks verified first
    print(f"\nBlocks b=10: first three blocks {sorted({i // 10 for i in first_blocks})}, planted {top}; "
          f"{r.n_sets} set patches")
    assert set(top) <= set(first_blocks)
    assert [i // 10 for i in r.order[::10].tolist()][:3] == [3, 12, 18]  # by |block effect|: 10, 8, 6
    assert r.order[:10].tolist() == list(range(30, 40))  # natural order inside a block
    assert sorted(r.order.tolist()) == list(range(len(effects)))


def test_hierarchical_reaches_the_planted_nodes_first():
    effects, top = planted()
    fake = Additive(effects)
    r = cm.hierarchical_ranking(fake, len(effects), branching=4, budget=60)
    print(f"\nHierarchical (4 children, budget 60): first reached {r.order[:3].tolist()}, planted {top}; "
          f"{r.n_sets} set patches in {fake.calls} calls, {int(r.exact.sum())} nodes patched alone")
    assert r.order[:3].tolist() == top  # best-first by |effect|: reached in the true order
    assert r.exact[top].all()  # their single-node patches were made: verifying them is free
    assert sorted(r.order.tolist()) == list(range(len(effects)))


def test_subsampling_recovers_the_planted_nodes():
    effects, top = planted()
    fake = Additive(effects)
    r = cm.subsampling_ranking(fake, len(effects), n_samples=400, p=0.2, seed=0)
    print(f"\nSubsampling K=400, p=0.2: top three {r.order[:3].tolist()}, planted {top}")
    assert set(r.order[:3].tolist()) == set(top)
    assert r.n_sets == fake.n_sets == 400


def test_blocks_hide_nodes_that_cancel_inside_a_block():
    """The weakness the paper names (§6): +5 and -5 in one block sum to 0, so the block is verified last."""
    effects = torch.full((40,), 0.01, dtype=torch.float64)
    effects[3], effects[6] = 5.0, -5.0  # both in block 0
    r = cm.blocks_ranking(Additive(effects), 40, block_size=10)
    pos = {i: r.order.tolist().index(i) for i in (3, 6)}
    print(f"\nBlocks b=10 with +5 and -5 in block 0: verified at positions {pos} of 40")
    assert min(pos.values()) >= 30


# --- counted costs


def test_blocks_cost_is_ceil_n_over_b_set_patches():
    for n, b in ((200, 10), (201, 10), (7, 3), (5, 1)):
        fake = Additive(torch.ones(n))
        r = cm.blocks_ranking(fake, n, b)
        print(f"Blocks n={n} b={b}: {r.n_sets} sets (ceil = {math.ceil(n / b)}), exact {int(r.exact.sum())}")
        assert r.n_sets == fake.n_sets == math.ceil(n / b)
        assert int(r.exact.sum()) == (n if b == 1 else int(n % b == 1))  # blocks of one are exact patches


@pytest.mark.parametrize("budget", [None, 0, 3, 4, 7, 40, 100])
def test_hierarchical_cost_counts_every_set_it_patches(budget):
    effects, _ = planted(n=190)
    fake = Additive(effects)
    r = cm.hierarchical_ranking(fake, 190, branching=4, budget=budget)
    print(f"Hierarchical budget={budget}: counted {r.n_sets}, evaluated {fake.n_sets}")
    assert r.n_sets == fake.n_sets
    if budget is not None:
        assert r.n_sets <= budget
    else:  # no budget: every group of the tree below the root is patched; every node alone
        assert bool(r.exact.all())
    assert sorted(r.order.tolist()) == list(range(190))


def test_atp_costs_by_hand():
    # L = 4: AtP = 2 forwards + a backward (2) = 4; the QK fix adds 1; GradDrop adds backwards through
    # 1, 2, 3 of the 4 layers = 2 (1 + 2 + 3) / 4 = 3; AtP* adds the QK fix for those layers: 6/4 = 1.5.
    assert cm.atp_cost(4) == 4
    assert cm.atp_cost(4, qk_fix=True) == 5
    assert cm.atp_cost(4, grad_drop=True) == 7
    assert cm.atp_cost(4, qk_fix=True, grad_drop=True) == 9.5
    assert cm.atp_cost(12, grad_drop=True) == 4 + 11
    assert cm.atp_cost(4, qk_fix=True, grad_drop=True, kinds=("neuron",)) == 7  # no q or k nodes to fix


# --- cost of verified recall and relative cost on hand examples


def test_perfect_order_is_the_diagonal():
    truth = torch.tensor([0.3, -2.0, 1.0, 0.5, -0.1], dtype=torch.float64)
    perfect = torch.sort(truth.abs(), descending=True).indices
    curve = cm.cost_of_verified_recall(perfect, truth, own_cost=4)
    print(f"\nperfect order: {curve.tolist()}")
    assert curve.tolist() == [5, 6, 7, 8, 9]  # cost(x) = x + C
    assert cm.relative_cost(cm.cost_of_verified_recall(perfect, truth, own_cost=0)) == pytest.approx(1.0)


def test_reversed_order_costs_every_node_for_every_x():
    truth = torch.tensor([0.3, -2.0, 1.0, 0.5, -0.1], dtype=torch.float64)
    reversed_order = torch.sort(truth.abs(), descending=False).indices  # the true top-1 comes last
    curve = cm.cost_of_verified_recall(reversed_order, truth, own_cost=4)
    print(f"reversed order: {curve.tolist()}")
    assert curve.tolist() == [9] * 5  # |N| + C for every x


def test_cost_of_verified_recall_by_hand():
    # True order by |c|: node 1 (3), node 3 (2), node 4 (1), node 0 (0.5); node 2 has c = 0: X = 4.
    truth = torch.tensor([0.5, -3.0, 0.0, 2.0, 1.0], dtype=torch.float64)
    order = torch.tensor([3, 2, 1, 0, 4])  # positions: node 3 -> 0, 2 -> 1, 1 -> 2, 0 -> 3, 4 -> 4
    # top-1 {1}: verify up to position 2 (3 passes); top-2 adds node 3 (position 0): still 3;
    # top-3 adds node 4 (position 4): 5 passes; top-4 adds node 0 (position 3): still 5.
    curve = cm.cost_of_verified_recall(order, truth, own_cost=10)
    assert curve.tolist() == [13, 13, 15, 15]
    # Node 2 already patched alone by the method: its pass is not paid again.
    exact = torch.tensor([False, False, True, False, False])
    assert cm.cost_of_verified_recall(order, truth, 10, exact).tolist() == [12, 12, 14, 14]
    with pytest.raises(ValueError, match="permutation"):
        cm.cost_of_verified_recall(torch.tensor([0, 0, 1, 2, 3]), truth, 0)


def test_only_effects_above_a_thousandth_of_the_largest_count():
    # |c| = 2, 1e-3 * 2 = 2e-3: 0.5, 2 and 0.002 count; 0.0019 (below) and rounding residue (1e-9, 0) do not.
    truth = torch.tensor([0.5, 1e-9, -2.0, 0.0, 0.0019, -0.002], dtype=torch.float64)
    assert cm.true_top(truth).tolist() == [2, 0, 5]
    curve = cm.cost_of_verified_recall(torch.arange(6), truth, own_cost=0)
    assert curve.tolist() == [3, 3, 6]
    assert cm.true_top(torch.zeros(4, dtype=torch.float64)).numel() == 0  # nothing counts


def test_cost_of_verified_recall_is_verifications_needed_for_every_x():
    """The vectorised curve against atp.verifications_needed, the reference, on random orders."""
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        truth = torch.randn(60, generator=g, dtype=torch.float64) * torch.rand(60, generator=g) ** 4
        order = torch.randperm(60, generator=g)
        curve = cm.cost_of_verified_recall(order, truth, own_cost=2.5)
        top = cm.true_top(truth).tolist()
        want = [2.5 + atp.verifications_needed(order.tolist(), top[:x]) for x in range(1, len(top) + 1)]
        assert curve.tolist() == want


def test_only_the_default_run_writes_the_shipped_results():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shipped, scratch = os.path.join(root, "experiments", "results"), os.path.join(root, "out")
    assert cm.parse_args([]).out == shipped
    assert cm.parse_args(["--threads", "2"]).out == shipped  # threads change no number
    for argv in (["--quick"], ["--pairs", "2"], ["--no-sweep"], ["--dtype", "float32"], ["--model", "m"]):
        assert cm.parse_args(argv).out == scratch, argv
        for spelling in (shipped, os.path.relpath(shipped), shipped + "/"):
            with pytest.raises(SystemExit):  # refused: experiments/results/ ships the default run
                cm.parse_args(argv + ["--out", spelling])
        assert cm.parse_args(argv + ["--out", "elsewhere"]).out == "elsewhere"


def test_relative_cost_is_the_inverse_rank_weighted_geometric_mean():
    # cost = (3, 4, 6) at x = 1, 2, 3: ratios 3, 2, 2 with weights 1, 1/2, 1/3 (sum 11/6), so
    # exp((6/11) ln 3 + (3/11) ln 2 + (2/11) ln 2) = 3^(6/11) 2^(5/11).
    got = cm.relative_cost(torch.tensor([3.0, 4.0, 6.0], dtype=torch.float64))
    want = 3 ** (6 / 11) * 2 ** (5 / 11)
    print(f"\nrelative cost of (3, 4, 6): {got:.6f} (by hand {want:.6f})")
    assert got == pytest.approx(want, rel=1e-12)
    assert cm.relative_cost(torch.tensor([2.0, 2.0])) == pytest.approx(2 ** (2 / 3), rel=1e-12)
    gmean, gstd = cm.geometric_stats([1.0, 4.0])
    assert (gmean, gstd) == (pytest.approx(2.0), pytest.approx(2.0))


# --- end to end on a random tiny GPT


def tiny():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=3, n_head=2, n_embd=8, vocab_size=20, n_positions=8))
    with torch.no_grad():
        for p in model.parameters():  # larger weights than the init, so effects are far from linear
            p.mul_(4.0)
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, 20, (1, 7), generator=g)  # (B, T)
    noise = clean.clone()
    noise[:, 3] = (clean[:, 3] + 5) % 20  # differ at one position, as the IOI pairs do
    return model, clean, noise, atp.logit_diff(torch.tensor([1]), torch.tensor([2]))


def test_end_to_end_on_a_random_tiny_gpt():
    model, clean, noise, metric = tiny()
    rows, curves = cm.evaluate_setting(model, clean, noise, metric, seeds=(0, 1), sweep=True)
    main = [r for r in rows if r["setting"] == "" and r["method"] in cm.METHOD_ORDER]
    for r in main:
        print(f"{r['family']:>9} {r['method']:>13} {r['label']:>10} seed {r['seed']}: "
              f"C {r['own_cost']:6.1f}  relative cost {r['rel_cost']:7.2f}  (n {r['n']}, X {r['X']})")
    assert ({(r["family"], r["method"]) for r in main}
            == {(f, m) for f in cm.FAMILIES for m in cm.METHOD_ORDER})
    for (family, method), runs in curves.items():
        for curve in runs:
            x = torch.arange(1, curve.numel() + 1, dtype=torch.float64)
            assert (curve >= x).all(), (family, method)  # nothing beats the oracle
    cost = {(r["family"], r["method"]): r["own_cost"] for r in main}
    assert cost[("attention", "AtP")] == 4 and cost[("attention", "AtP*")] == cm.atp_cost(3, True, True)
    assert cost[("neurons", "AtP+QK fix")] == 4
    # Nodes before the changed position are never moved; layer-0 q/k/v after it are not either.
    n = {r["family"]: r["n"] for r in main}
    assert n == {"attention": 4 * 2 * 4 * 3 - 3 * 2 * 3, "neurons": 4 * 32 * 3}
    # Every sweep setting was scored, and the default appears in the sweep as factor x1.
    assert {r["setting"] for r in rows if r["method"] == "Blocks"} == {""} | set(cm.FACTORS)


def test_set_patcher_matches_atp_subset_sampling():
    """The model-backed effect_of_sets with Subsampling's draw reproduces atp.subset_sampling exactly."""
    model, clean, noise, metric = tiny()
    nodes = [("neuron", l, t, u) for l in range(3) for t in range(3, 7) for u in range(32)]
    member, y = atp.subset_sampling(model, clean, noise, metric, nodes, p=0.2, n_samples=30, seed=5)
    patcher = cm.SetPatcher(model, clean, noise, metric, nodes)
    generator = torch.Generator().manual_seed(5)
    ours = torch.rand(30, len(nodes), generator=generator) < 0.2  # the draw of cm.subsampling_ranking
    assert torch.equal(ours, member)
    got = patcher(member)
    print(f"\nSetPatcher vs atp.subset_sampling: max |diff| {(got - y.double()).abs().max():.2e}")
    torch.testing.assert_close(got, y.double(), rtol=1e-6, atol=1e-6)
    patcher(member)  # asked again: remembered, nothing patched twice
    assert patcher.patched == 30
