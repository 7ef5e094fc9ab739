"""Every Part II (fast) function of atp_minimal.py against its Part I (reference) twin, in float64, on small
random GPT-2s with large weights and on the shipped, trained toy IOI model; and the model protocol, on a
bare model that offers only the required pieces (no forward_from).

Tolerance: TWIN_TOL = 1e-12 absolute, on effects and scores of size 0.1-10. The two forms do the same
arithmetic in a different order (batched rows, a resumed forward, one backward graph instead of one per
dropped unit, the closed-form key fix), so they differ by float64 rounding only: 1e-15 to 1e-14 here.
Run `pytest -s tests/test_reference.py` to read the measured differences.
"""

import pytest
import torch

import atp_minimal as atp
import toy_ioi
from helpers import max_diff, random_gpt
from whole_positions import whole_position_atp, whole_position_estimates

TWIN_TOL = 1e-12


def random_pairs(model, B=2, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, model.config.vocab_size, (B, T), generator=g)
    noise = clean.clone()
    noise[:, 1] = (clean[:, 1] + 1 + torch.randint(0, 5, (B,), generator=g)) % model.config.vocab_size
    noise[:, 3] = (clean[:, 3] + 2) % model.config.vocab_size
    return clean, noise


def exact_reference(model, clean, noise, metric, kinds, positions):
    """The one-forward-per-node loop: activation_patching_reference, or for whole-position nodes
    (kind, layer, unit) the same loop over patch_node_sets_reference. kind -> (B, L, T, U) or (B, L, U)."""
    if positions == "each":
        return atp.activation_patching_reference(model, clean, noise, metric, kinds)
    out = {}
    for k in kinds:
        nodes = atp.all_nodes(model, k, clean.shape[1], "all")
        values = atp.patch_node_sets_reference(model, clean, noise, metric, [[n] for n in nodes])  # (N, B)
        out[k] = values.T.reshape(clean.shape[0], model.config.n_layer, atp.n_units(model, k))
    return out


def largest(a):
    return max(v.abs().max().item() for v in a.values()) if isinstance(a, dict) else a.abs().max().item()


@pytest.fixture(scope="module")
def random_setting():
    model = random_gpt(0, n_layer=3, std=0.6, embedding_std=0.6)  # every matrix at std 0.6, embeddings too
    clean, noise = random_pairs(model, B=2, T=5, seed=1)
    return model, clean, noise, atp.neg_log_prob(torch.tensor([3, 4]))


@pytest.fixture(scope="module")
def toy_setting():
    """The trained toy model in float64, one held-out pair (T = 15, saturated heads)."""
    model = toy_ioi.load_toy_model().double()
    clean, noise, answer, wrong = toy_ioi.make_pairs(1, split="test", seed=3)
    return model, clean, noise, atp.logit_diff(answer, wrong)


def report(name, fast, ref):
    diff = max_diff(fast, ref)
    print(f"  {name:46s} max |fast - reference| = {diff:.1e}   (largest value {largest(ref):.3f})")
    assert diff < TWIN_TOL
    return diff


@pytest.mark.parametrize("positions", ["each", "all"])
def test_fast_exact_patching_equals_the_one_forward_per_node_loop(random_setting, positions):
    model, clean, noise, metric = random_setting
    fast = atp.activation_patching(model, clean, noise, metric, positions=positions, chunk_size=7)
    report(f"activation_patching positions={positions}", fast, exact_reference(model, clean, noise, metric,
                                                                                atp.KINDS, positions))


@pytest.mark.parametrize("positions", ["each", "all"])
def test_fast_attribution_equals_its_reference_for_every_variant(random_setting, positions):
    model, clean, noise, metric = random_setting
    for qk in (False, True):
        estimates = {(False, "each"): atp.atp_estimates_reference, (True, "each"): atp.atp_qk_fix_reference,
                     (False, "all"): whole_position_atp,
                     (True, "all"): whole_position_estimates}[qk, positions]
        report(f"atp_estimates qk_fix={qk} {positions}",
               atp.atp_estimates(model, clean, noise, metric, qk_fix=qk, positions=positions),
               estimates(model, clean, noise, metric))
        for unit in ("layer", "sublayer"):
            report(f"grad_drop_scores qk_fix={qk} unit={unit} {positions}",
                   atp.grad_drop_scores(model, clean, noise, metric, qk_fix=qk, positions=positions,
                                        unit=unit),
                   atp.grad_drop_scores_reference(model, clean, noise, metric, unit=unit,
                                                  estimates=estimates))
    report(f"atp_star {positions}", atp.atp_star(model, clean, noise, metric, positions=positions),
           atp.atp_star_reference(model, clean, noise, metric) if positions == "each" else
           atp.grad_drop_scores_reference(model, clean, noise, metric, estimates=whole_position_estimates))


def test_attribution_patching_dispatches_to_the_named_functions(random_setting):
    model, clean, noise, metric = random_setting
    pairs = {"grad_drop=False": (dict(), atp.atp_estimates(model, clean, noise, metric)),
             "grad_drop=True": (dict(grad_drop=True), atp.grad_drop_scores(model, clean, noise, metric)),
             "grad_drop='sublayer'": (dict(grad_drop="sublayer", qk_fix=True),
                                      atp.grad_drop_scores(model, clean, noise, metric, qk_fix=True,
                                                           unit="sublayer"))}
    for name, (kwargs, want) in pairs.items():
        got = atp.attribution_patching(model, clean, noise, metric, **kwargs)
        print(f"  attribution_patching({name}) vs named function: {max_diff(got, want):.1e}")
        assert max_diff(got, want) == 0


def test_fast_verify_and_subset_sampling_equal_their_references(random_setting):
    model, clean, noise, metric = random_setting
    scores = atp.atp_star(model, clean, noise, metric)
    ranking, _ = atp.rank_nodes({k: v.mean(0) for k, v in scores.items()})
    nodes, effects = atp.verify(model, clean, noise, metric, ranking, 40)
    ref_nodes, ref_effects = atp.verify_reference(model, clean, noise, metric, ranking, 40)
    assert nodes == ref_nodes and effects.shape == (40, clean.shape[0])
    report("verify (40 nodes)", effects, ref_effects)
    rest = ranking[40:]
    member, y = atp.subset_sampling(model, clean, noise, metric, rest, p=0.2, n_samples=30, seed=4)
    ref_member, ref_y = atp.subset_sampling_reference(model, clean, noise, metric, rest, p=0.2, n_samples=30,
                                                      seed=4)
    assert torch.equal(member, ref_member)
    report(f"subset_sampling (30 joint patches of {len(rest)} nodes)", y, ref_y)


def test_fast_node_set_patching_equals_one_forward_per_set(random_setting):
    model, clean, noise, metric = random_setting
    nodes = atp.all_nodes(model, "z", clean.shape[1]) + atp.all_nodes(model, "neuron", clean.shape[1])[:60]
    member = atp.draw_subsets(12, len(nodes), 0.3, seed=5)  # (J, N)
    masks = atp.node_masks(model, clean.shape[1], nodes, member)
    fast = atp.patch_node_sets(model, clean, noise, metric, masks)
    sets = [[n for n, m in zip(nodes, row) if m] for row in member]
    report("patch_node_sets (12 random sets of z and neurons)", fast,
           atp.patch_node_sets_reference(model, clean, noise, metric, sets))


def test_the_sublayer_unit_has_2L_terms_and_divides_by_2L_minus_1(random_setting):
    # A last-layer neuron: every other sub-layer write is upstream of it (its gradient unchanged, |AtP| each)
    # and its own MLP write gives 0, so the score is (2L - 1)|AtP| / (2L - 1) = |AtP|.
    # A node inside a dropped unit gets 0 from that term: with an inert model beyond layer 0 ...
    model, clean, noise, metric = random_setting
    L = model.config.n_layer
    assert len(atp.grad_drop_units(model, "sublayer")) == 2 * L and len(atp.grad_drop_units(model)) == L
    plain = atp.atp_estimates(model, clean, noise, metric, kinds=("neuron",))["neuron"][:, L - 1].abs()
    sub = atp.grad_drop_scores(model, clean, noise, metric, kinds=("neuron",),
                               unit="sublayer")["neuron"][:, L - 1]
    rel = ((sub - plain).abs() / plain.clamp(min=1e-300)).max().item()
    print(f"  last-layer neurons, unit=sublayer: max relative |score - |AtP|| = {rel:.1e}")
    assert rel < 1e-12
    # ... and the literal form's term for the node's own unit is exactly 0: drop layer 0's attention write,
    # and every layer-0 attention node gets exactly 0, while layer-0 neurons keep their plain estimate.
    dropped = atp.GradientDropped(model, ["blocks.0.hook_attn_out"])
    est = atp.atp_estimates_reference(dropped, clean, noise, metric)
    full = atp.atp_estimates_reference(model, clean, noise, metric)
    inside = max(est[k][:, 0].abs().max().item() for k in ("q", "k", "v", "z"))
    print(f"  layer-0 attention nodes with their own write dropped: max |estimate| = {inside:.1e}; "
          f"layer-0 neurons unchanged: {torch.equal(est['neuron'][:, 0], full['neuron'][:, 0])}")
    assert inside == 0 and torch.equal(est["neuron"][:, 0], full["neuron"][:, 0])
    with pytest.raises(ValueError, match="'layer'"):
        atp.grad_drop_scores(model, clean, noise, metric, unit="head")


def test_fast_forms_equal_references_on_the_trained_toy_model(toy_setting):
    model, clean, noise, metric = toy_setting
    report("toy: activation_patching, q and k nodes",
           atp.activation_patching(model, clean, noise, metric, ("q", "k")),
           atp.activation_patching_reference(model, clean, noise, metric, ("q", "k")))
    report("toy: activation_patching, neurons, positions=all",
           atp.activation_patching(model, clean, noise, metric, ("neuron",), positions="all"),
           exact_reference(model, clean, noise, metric, ("neuron",), "all"))
    report("toy: AtP+QK fix", atp.atp_estimates(model, clean, noise, metric, qk_fix=True),
           atp.atp_qk_fix_reference(model, clean, noise, metric))
    for unit in ("layer", "sublayer"):
        report(f"toy: AtP* unit={unit}", atp.atp_star(model, clean, noise, metric, unit=unit),
               atp.atp_star_reference(model, clean, noise, metric, unit=unit))


# --- the model protocol

class BareModel(torch.nn.Module):
    """Only what the protocol requires: model(idx, hooks), config, attention_scale. No forward_from,
    no check_tokens, no site_names: exact patching must fall back to full forwards."""

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt
        self.config = gpt.config

    def forward(self, idx, hooks=None):
        return self.gpt(idx, hooks=hooks)

    def attention_scale(self, layer):
        return self.gpt.attention_scale(layer)


def test_a_bare_protocol_model_gives_the_same_numbers_as_model_gpt(random_setting):
    model, clean, noise, metric = random_setting
    bare = BareModel(model)
    assert not hasattr(bare, "forward_from")
    calls = {"activation_patching": lambda m: atp.activation_patching(m, clean, noise, metric),
             "activation_patching all":
                 lambda m: atp.activation_patching(m, clean, noise, metric, positions="all"),
             "atp_estimates qk": lambda m: atp.atp_estimates(m, clean, noise, metric, qk_fix=True),
             "atp_star": lambda m: atp.atp_star(m, clean, noise, metric),
             "atp_star sublayer": lambda m: atp.atp_star(m, clean, noise, metric, unit="sublayer")}
    for name, call in calls.items():
        diff = max_diff(call(bare), call(model))
        print(f"  bare model vs model.GPT, {name:24s}: max diff {diff:.1e}")
        assert diff < TWIN_TOL
    ranking, _ = atp.rank_nodes({k: v.mean(0) for k, v in atp.atp_star(model, clean, noise, metric).items()})
    bound = [atp.false_negative_bound(m, clean, noise, metric, ranking, K=10, n_samples=40, p=0.3)
             for m in (bare, model)]
    print(f"  false_negative_bound theta*: bare {bound[0]['theta_star']:.12f}, "
          f"model.GPT {bound[1]['theta_star']:.12f}")
    assert abs(bound[0]["theta_star"] - bound[1]["theta_star"]) < TWIN_TOL


def test_a_model_missing_a_protocol_piece_gets_an_error_naming_it(random_setting):
    model, clean, noise, metric = random_setting

    class NoScale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gpt, self.config = model, model.config

        def forward(self, idx, hooks=None):
            return self.gpt(idx, hooks=hooks)

    class NoConfig(BareModel):
        def __init__(self):
            super().__init__(model)
            self.config = object()

    for bad, missing in ((NoScale(), "attention_scale"), (NoConfig(), "n_layer")):
        with pytest.raises(TypeError, match=missing) as err:
            atp.atp_star(bad, clean, noise, metric)
        print(f"  {type(bad).__name__}: {err.value}")
