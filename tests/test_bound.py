"""Verify-then-bound (the paper's diagnostic, §3 Methods; Algorithm 1, subset sampling): subset
statistics, the Welch bound, and its coverage.

Run with `pytest -s tests/test_bound.py` to see the evidence each test prints."""

import itertools
import math

import pytest
import torch

import atp_minimal as atp
from model import GPT, GPTConfig

ALPHA = 0.05


def test_student_t_matches_published_table_values():
    # Two-sided 95% / one-sided 95% critical values from any t table, and exact closed forms:
    # df = 1 is the Cauchy distribution (sf = 1/2 - atan(t)/pi); df = 2 has sf = 1/2 - t / (2 sqrt(t^2 + 2)).
    table = {(0.975, 10): 2.228138852, (0.95, 5): 2.015048373, (0.95, 1): 6.313751515,
             (0.95, math.inf): 1.644853627}
    worst = max(abs(atp.student_t_quantile(q, df) - v) for (q, df), v in table.items())
    cauchy = max(abs(atp.student_t_sf(t, 1.0) - (0.5 - math.atan(t) / math.pi))
                 for t in (-3, -0.5, 0, 0.7, 9))
    df2 = max(abs(atp.student_t_sf(t, 2.0) - (0.5 - t / (2 * math.sqrt(t * t + 2)))) for t in (-2, 0.1, 1, 5))
    print(f"max |quantile - table| {worst:.1e}; df=1 sf error {cauchy:.1e}; df=2 sf error {df2:.1e}")
    assert worst < 1e-8 and cauchy < 1e-12 and df2 < 1e-12


def test_subset_statistics_are_exact_over_all_masks_of_an_additive_model():
    # With p = 1/2 every mask is equally likely: enumerating all 2^n masks once each is the exact expectation.
    # Under additivity (y = sum of the included nodes' effects) E[y | n in] - E[y | n out] = c(n) exactly.
    n = 8
    c = torch.tensor([3.0, -2.0, 0.5, 0.0, 1e-3, -7.0, 2.5, 0.25], dtype=torch.float64)
    member = torch.tensor(list(itertools.product([False, True], repeat=n)))  # (2^n, n)
    y = member.double() @ c  # (2^n,)
    c_ss, se, df = atp.subset_statistics(member, y)
    err = (c_ss - c).abs().max().item()
    # Exact variance of y within each half: the other n-1 nodes are fair coins: Var = sum_{m != n} c_m^2 / 4.
    var_half = ((c ** 2).sum() - c ** 2) / 4  # (n,)
    N_half = 2 ** (n - 1)
    se_exact = (2 * var_half * N_half / (N_half - 1) / N_half).sqrt()
    se_err = (se - se_exact).abs().max().item()
    print(f"max |c_ss - c| over all {2 ** n} masks: {err:.1e}; max |se - exact| {se_err:.1e}")
    assert err < 1e-12 and se_err < 1e-12


def test_bound_covers_the_largest_effect_on_additive_synthetic_effects():
    # Additive effects with a few large ones: theta* must cover max |c(n)| in >= 1 - alpha of the seeds.
    # The margin allows for the binomial noise of 200 seeds (3 standard errors of a 95% rate ~ 0.046).
    gen = torch.Generator().manual_seed(0)
    N, S, p = 300, 200, 0.1
    covered, trials = 0, 200
    for seed in range(trials):
        c = torch.randn(N, generator=gen, dtype=torch.float64) * 0.01
        c[:3] = torch.tensor([0.3, -0.2, 0.15])  # the large unverified effects
        member = torch.rand(S, N, generator=gen) < p
        y = member.double() @ c
        theta_star, worst, _ = atp.welch_bound(*atp.subset_statistics(member, y), alpha=ALPHA)
        covered += theta_star >= c.abs().max().item()
    rate = covered / trials
    print(f"theta* >= max |c(n)| in {covered}/{trials} seeds = {rate:.1%} (nominal >= {1 - ALPHA:.0%})")
    assert rate >= 1 - ALPHA - 0.046


def test_p_value_rejects_far_thresholds_and_not_near_ones():
    gen = torch.Generator().manual_seed(1)
    c = torch.zeros(100, dtype=torch.float64)
    c[0] = 0.5
    member = torch.rand(400, 100, generator=gen) < 0.2
    # + measurement noise
    y = member.double() @ c + 0.01 * torch.randn(400, generator=gen, dtype=torch.float64)
    stats = atp.subset_statistics(member, y)
    theta_star, worst, p_far = atp.welch_bound(*stats, theta=5.0)
    _, _, p_near = atp.welch_bound(*stats, theta=0.5)
    print(f"theta* {theta_star:.3f} (set by node {worst}); p(theta=5) {p_far:.2e}; p(theta=0.5) {p_near:.2f}")
    assert worst == 0 and p_far < 1e-6 and p_near > ALPHA  # far: rejected; at the true size: not


def toy_or_random_model():
    """The shipped toy IOI model with test-split pairs; a random 4-layer GPT if it is absent."""
    try:
        import toy_ioi
        model = toy_ioi.load_toy_model()
        clean, noise, answer, wrong = toy_ioi.make_pairs(4, split="test", seed=0)
        return model, clean, noise, atp.logit_diff(answer, wrong)
    except (ImportError, FileNotFoundError):  # pragma: no cover
        torch.manual_seed(0)
        model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=64, n_positions=16, vocab_size=50))
        clean = torch.randint(0, 50, (4, 12))
        noise = clean.clone()
        noise[:, 6] = (noise[:, 6] + 1) % 50
        return model, clean, noise, atp.logit_diff(1, 2)


def test_bound_covers_the_true_largest_unverified_effect_on_the_toy_model():
    # Attention nodes, ranked by AtP*, top K verified; the truth comes from exhaustive patching.
    model, clean, noise, metric = toy_or_random_model()
    kinds = ("q", "k", "v", "z")
    truth = {k: v.mean(0) for k, v in
             atp.activation_patching(model, clean, noise, metric, kinds=kinds).items()}
    scores = {k: v.mean(0) for k, v in atp.atp_star(model, clean, noise, metric, kinds=kinds).items()}
    ranking, _ = atp.rank_nodes(scores)
    K = 10
    covered, seeds = 0, range(8)
    for seed in seeds:
        r = atp.false_negative_bound(model, clean, noise, metric, ranking, K=K, p=0.1, n_samples=200,
                                     seed=seed)
        true_max = max(abs(truth[n[0]][n[1:]].item()) for n in r["unverified"])
        verified_err = max(abs(e.item() - truth[n[0]][n[1:]].item())
                           for n, e in zip(r["verified"], r["verified_effects"]))
        covered += r["theta_star"] >= true_max
        print(f"seed {seed}: theta* {r['theta_star']:.4f}  true max unverified |c| {true_max:.4f}  "
              f"verified effects exact to {verified_err:.1e}")
        assert verified_err < 1e-5
    print(f"coverage {covered}/{len(seeds)}")
    assert covered >= 0.75 * len(seeds)


def test_bound_refuses_impossible_settings():
    model, clean, noise, metric = toy_or_random_model()
    ranking, _ = atp.rank_nodes({k: v.mean(0) for k, v in atp.attribution_patching(
        model, clean, noise, metric, kinds=("z",)).items()})
    cases = [(dict(p=0.0), "strictly between 0 and 1"), (dict(p=1.5), "strictly between 0 and 1"),
             (dict(K=len(ranking) + 1), "between 0 and the number of nodes given"),
             (dict(alpha=1.0), "alpha"), (dict(alpha=0.5), "alpha"),
             (dict(n_samples=3), "too few samples")]
    for kwargs, message in cases:
        args = dict(K=5) | kwargs
        with pytest.raises(ValueError, match=message):
            atp.false_negative_bound(model, clean, noise, metric, ranking, **args)
    everything = atp.false_negative_bound(model, clean, noise, metric, ranking, K=len(ranking), theta=0.1)
    assert everything["theta_star"] == 0.0 and everything["p_value"] == 0.0
    with pytest.raises(ValueError, match="budget"):
        atp.verify(model, clean, noise, metric, ranking, len(ranking) + 1)


def test_t_quantile_of_a_heavy_tail_beyond_the_first_bracket():
    # df = 1 is the Cauchy distribution: its quantile is tan(pi (q - 1/2)), 3183.1 at q = 1 - 1e-4.
    got, want = atp.student_t_quantile(1 - 1e-4, 1.0), math.tan(math.pi * (0.5 - 1e-4))
    print(f"  t quantile, df 1, q 1 - 1e-4: {got:.6f} (Cauchy closed form {want:.6f})")
    assert abs(got - want) < 1e-6 * want


def test_fast_welch_bound_equals_the_literal_max_over_nodes():
    # welch_bound brackets every node's quantile between the normal's and the one at the smallest df, and
    # computes exact quantiles only for the nodes whose bracket reaches the best; welch_bound_reference
    # computes every node's bound and p-value. Same arithmetic on the nodes that matter, so they must agree
    # exactly: theta*, the worst node and the p-value, on random settings with spread-out df, ties and
    # nodes whose se is 0.
    worst_gap, settings = 0.0, 0
    for seed in range(22):
        g = torch.Generator().manual_seed(seed)
        N = int(torch.randint(1, 400, (1,), generator=g))
        c_ss = torch.randn(N, generator=g, dtype=torch.float64) * 0.3
        se = torch.rand(N, generator=g, dtype=torch.float64) * 0.2
        df = 1.0 + torch.rand(N, generator=g, dtype=torch.float64) ** 3 * 300
        if seed % 3 == 0:  # exact nodes: se = 0, df = inf
            zero = torch.rand(N, generator=g) < 0.2
            se[zero], df[zero] = 0.0, math.inf
        if seed % 4 == 1:  # ties in the bound
            c_ss[:N // 2], se[:N // 2], df[:N // 2] = 0.1, 0.05, 7.0
        alpha = (0.05, 0.01, 0.2)[seed % 3]
        theta = float(c_ss.abs().max()) + (0.0, 0.1, 1.0)[seed % 3]
        fast = atp.welch_bound(c_ss, se, df, alpha, theta)
        literal = atp.welch_bound_reference(c_ss, se, df, alpha, theta)
        assert fast == literal, (seed, fast, literal)
        worst_gap = max(worst_gap, abs(fast[0] - literal[0]))
        settings += 1
    print(f"  welch_bound vs welch_bound_reference on {settings} random settings: theta*, worst node and "
          f"p-value identical (largest |theta* difference| {worst_gap:.1e})")
