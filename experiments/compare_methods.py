"""
How many forward passes does each node-ranking method need to find the important nodes? The comparison
of the AtP* paper's §4 Experiments on the toy IOI model (or a real GPT-2): AtP, AtP+QK fix, AtP+GradDrop
and AtP* against the baselines that patch sets of nodes jointly (Subsampling, Blocks, Hierarchical
grouping) and a random order, each scored by its cost of verified recall.

  J. Kramar, T. Lieberum, R. Shah, N. Nanda (2024). "AtP*: An efficient and scalable method for
  localizing LLM behaviour to components." https://arxiv.org/abs/2403.00745

Every method outputs an order over ALL nodes of a node family and pays its own cost C. Verification then
patches nodes one at a time in that order (paper §2 Background). cost(x) = C + the verification passes
spent until the true top-x nodes by |c(n)| are all verified (paper §4 Experiments). The oracle verifies
in the true order: cost(x) = x. x runs over the nodes that count: |c(n)| >= COUNTED (1e-3) times the
largest |c(n)| of the family.

    python experiments/compare_methods.py          # toy IOI model, float64: tables, CSV and plots
                                                   # in experiments/results/
    python experiments/compare_methods.py --quick  # smoke run, written to out/ (as is every non-default run)
    python experiments/compare_methods.py --model DIR --device cuda --dtype float32
                                                   # a Hugging Face GPT-2 directory

Dimension legend: B prompt pairs, L layers, T positions, U units of a site (heads or neurons),
N nodes of a family, n candidate nodes (those a patch can change), S sets, X nodes that count (true_top).
"""

import argparse
import heapq
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))  # experiments/
ROOT = os.path.dirname(HERE)  # the repository root: atp_minimal.py, model.py, toy_ioi.py
sys.path.insert(0, ROOT)
import atp_minimal as atp  # noqa: E402

# --------------------------------------------------------------------------------------------------
# --- cost accounting: forward-pass equivalents PER PROMPT PAIR
#
# Unit: one forward pass of one prompt = 1. A method run on B prompt pairs does B times the work of one
# pair, so every cost below is the total divided by B. Verifying one node (one patched forward per
# pair) then costs 1 in every setting and the oracle is the diagonal cost(x) = x.
#
#   clean + noise forwards   2    every method needs them once per pair: the clean metric that effects
#                                 are measured from and the noise activations that get patched in.
#                                 Verification reuses them, so they are charged once, to every method.
#   backward pass            2    the usual estimate, twice a forward; a pass through l of the L layers
#                                 costs 2 l / L.
#   AtP (§2)                 4    = 2 forwards + 1 backward.
#   QK fix (§3)             +1    per backward pass that feeds it, prorated by layer (0 for a family
#                                 without q and k nodes, e.g. MLP neurons): per head it does
#                                 two QK^T-shaped products and two softmaxes, a fraction of that layer's
#                                 forward pass, which does the same plus the projections and the MLP. So
#                                 1 forward is an upper bound, not a measurement.
#   GradDrop (§3)        +(L-1)    the pass that drops layer l (l = 1..L-1) backpropagates only through
#                                 layers 0..l-1 (atp_minimal's implementation): sum_l 2 l / L = L - 1.
#                                 Dropping layer 0 needs no pass: its own nodes get 0 and no node sits
#                                 below it. The paper's count, L full backward passes, would give 2 + 2L.
#   AtP*                 4 + (L-1) + 1 + (L-1)/2   (the QK fix is recomputed inside each GradDrop pass
#                                 for the layers it reaches).
#   one joint set patch      1    Subsampling: K samples; Blocks: ceil(n/b) blocks; Hierarchical: every
#                                 group it patches. Counted by the rankers as they ask for them.
#   verify one node          1    a single-node patch a method already ran (Blocks with b = 1,
#                                 Hierarchical's leaves) is already verified and is not paid twice.
#
# A patched forward is charged as a whole forward even though atp_minimal resumes it from the cached
# clean residual stream at the first patched layer; the saving is the same for every patch.

FORWARD = 1.0  # one prompt through all L layers
BACKWARD = 2.0  # one backward pass through all L layers
BASE = 2 * FORWARD  # the clean and the noise forward, once per pair
PATCH = FORWARD  # one jointly patched set of nodes, one pair
VERIFY = PATCH  # one node verified by exact activation patching, one pair


def atp_cost(n_layer, qk_fix=False, grad_drop=False, kinds=atp.KINDS, unit="layer"):
    """Own cost per prompt pair of atp.attribution_patching for the nodes of `kinds`, layer by layer as it
    computes. The QK fix costs nothing when there are no q or k nodes to fix (MLP neurons alone).
    unit="sublayer" (GradDrop per sub-layer write): the pass dropping attn_l backpropagates through the
    l blocks below it (2 l / L), the pass dropping mlp_l through those and attn_l, counted as half a block
    (2 (l + 1/2) / L): in all 2L - 1; the QK fix then reaches l / L and (l + 1) / L of the layers: L more."""
    L = n_layer
    qk_fix = qk_fix and any(k in ("q", "k") for k in kinds)
    cost = BASE + BACKWARD  # noise forward, clean forward, one backward through all L layers
    if grad_drop and unit == "sublayer":
        cost += BACKWARD * sum((2 * l + 0.5) / L for l in range(L))
        return cost + (FORWARD + FORWARD * sum((2 * l + 1) / L for l in range(L)) if qk_fix else 0)
    if grad_drop:
        cost += sum(BACKWARD * l / L for l in range(1, L))  # drop layer l: backward through layers 0..l-1
    if qk_fix:
        cost += FORWARD  # the QK fix of all L layers, for the plain gradient
        if grad_drop:
            cost += sum(FORWARD * l / L for l in range(1, L))  # ... and of layers 0..l-1 per GradDrop pass
    return cost


# --------------------------------------------------------------------------------------------------
# --- node families (paper §4 Experiments): attention nodes and MLP neurons, evaluated separately

FAMILIES = {"attention": ("q", "k", "v", "z"), "neurons": ("neuron",)}


class Family:
    """The nodes of one family in natural order: layer, then position, then kind, then unit.
    Blocks and Hierarchical group contiguous runs of this order; ties in every ranking break by it."""

    def __init__(self, name, kinds, cfg, T):
        self.name, self.kinds, self.L, self.T = name, kinds, cfg.n_layer, T
        self.units = {k: cfg.d_mlp if k == "neuron" else cfg.n_head for k in kinds}
        self.width = sum(self.units.values())  # nodes per (layer, position)
        self.N = self.L * T * self.width
        self.offset, self.slot = {}, {}
        start = 0
        for k in kinds:
            self.offset[k] = start
            rows = torch.arange(self.L * T)[:, None] * self.width  # (L*T, 1): first node of (layer, pos)
            self.slot[k] = (rows + start + torch.arange(self.units[k])).reshape(-1)  # (L*T*U,)
            start += self.units[k]

    def vector(self, per_kind):
        """kind -> (L, T, U) values -> (N,) in natural order."""
        first = per_kind[self.kinds[0]]
        out = torch.zeros(self.N, dtype=first.dtype)
        for k in self.kinds:
            out[self.slot[k]] = per_kind[k].detach().reshape(-1).cpu()
        return out

    def node(self, i):
        """Node index -> atp_minimal's node tuple (kind, layer, pos, unit)."""
        lt, r = divmod(int(i), self.width)
        layer, pos = divmod(lt, self.T)
        kind = [k for k in self.kinds if self.offset[k] <= r][-1]
        return (kind, layer, pos, r - self.offset[kind])


# --------------------------------------------------------------------------------------------------
# --- rankers. Each returns a Ranking of the n candidate nodes (indices in natural order).

@dataclass
class Ranking:
    order: torch.Tensor  # (n,) node indices in the order to verify them, best first
    n_sets: int = 0  # joint set patches the ranker ran (each one forward per prompt pair)
    exact: Optional[torch.Tensor] = None  # (n,) bool: nodes the ranker already patched alone


def rank_by_score(score):
    """score (n,) -> order (n,): largest first, ties in natural order (AtP family, Subsampling)."""
    return torch.sort(score, descending=True, stable=True).indices


def random_ranking(n, seed):
    """The floor: a seeded random order (a baseline of the paper's §4 Experiments: activation patching in
    random order)."""
    return Ranking(torch.randperm(n, generator=torch.Generator().manual_seed(seed)))


# effect_of_sets(member (S, n) bool) -> (S,): the mean over prompt pairs of the signed effect
# metric(clean | do(set <- noise)) - metric(clean) of patching each set jointly. SetPatcher (below) is
# the one for a real model; the tests pass sums of planted node effects.
EffectOfSets = Callable[[torch.Tensor], torch.Tensor]


def subsampling_ranking(effect_of_sets: EffectOfSets, n, n_samples, p, seed=0):
    """Subsampling (the paper's Algorithm 1): n_samples random subsets, each node in with probability p, each
    patched jointly; rank by |c_ss(n)| = |mean y over subsets with n - mean y over subsets without n|.
    Draws its subsets with atp.draw_subsets, as atp.subset_sampling does."""
    member = atp.draw_subsets(n_samples, n, p, seed)  # (K, n)
    y = effect_of_sets(member)  # (K,)
    c_ss, _, _ = atp.subset_statistics(member, y)  # (n,)
    return Ranking(rank_by_score(c_ss.abs()), n_sets=n_samples)


def blocks_ranking(effect_of_sets: EffectOfSets, n, block_size):
    """Blocks (a baseline of the paper's §4 Experiments): contiguous blocks of `block_size` nodes in natural
    order, each patched jointly. Verify block by block, largest |block effect| first; inside a block,
    natural order."""
    starts = list(range(0, n, block_size))
    member = torch.zeros(len(starts), n, dtype=torch.bool)  # (ceil(n/b), n)
    for i, s in enumerate(starts):
        member[i, s:s + block_size] = True
    effect = effect_of_sets(member)  # (ceil(n/b),)
    block_order = torch.sort(effect.abs(), descending=True, stable=True).indices.tolist()
    order = torch.cat([torch.arange(starts[i], min(starts[i] + block_size, n)) for i in block_order])
    exact = torch.full((n,), block_size == 1)  # a block of one is an exact single-node patch
    if n % block_size == 1:
        exact[-1] = True  # so is a last block of one
    return Ranking(order, n_sets=len(starts), exact=exact)


def hierarchical_ranking(effect_of_sets: EffectOfSets, n, branching=4, budget=None):
    """Hierarchical grouping (a baseline of the paper's §4 Experiments): a tree of nested contiguous groups,
    each split into `branching` near-equal children, down to single nodes. Best-first: take the patched
    group with the largest |effect|; a single node is reached (its patch was exact), a larger group has
    its children patched, one set each, while the budget (set patches; None: no limit) allows. Order:
    nodes in the order reached, then the frontier groups by |effect|, each in natural order. The root
    itself is not patched."""
    exact = torch.zeros(n, dtype=torch.bool)
    frontier = []  # heap of (-|effect|, first node, end): ties in natural order
    n_sets = 0

    def children(lo, hi):
        c = min(branching, hi - lo)
        cuts = [lo + (hi - lo) * i // c for i in range(c + 1)]
        return list(zip(cuts[:-1], cuts[1:]))

    def expand(lo, hi):
        nonlocal n_sets
        groups = children(lo, hi)
        member = torch.zeros(len(groups), n, dtype=torch.bool)  # (S, n), S <= branching
        for i, (a, b) in enumerate(groups):
            member[i, a:b] = True
        effect = effect_of_sets(member).tolist()  # (S,)
        n_sets += len(groups)
        for (a, b), e in zip(groups, effect):
            heapq.heappush(frontier, (-abs(e), a, b))
            if b - a == 1:
                exact[a] = True

    order = []
    if n > 0 and (budget is None or budget >= min(branching, n)):
        expand(0, n)
    else:
        frontier = [(0.0, 0, n)] if n > 0 else []  # nothing patched: natural order
    while frontier:
        _, lo, hi = frontier[0]
        if hi - lo == 1:
            heapq.heappop(frontier)
            order.append(lo)  # reached a single node
        elif budget is None or n_sets + min(branching, hi - lo) <= budget:
            heapq.heappop(frontier)
            expand(lo, hi)
        else:
            break  # budget spent: the rest follows in frontier order
    while frontier:
        _, lo, hi = heapq.heappop(frontier)
        order.extend(range(lo, hi))
    return Ranking(torch.tensor(order, dtype=torch.long), n_sets=n_sets, exact=exact)


class SetPatcher:
    """effect_of_sets for a model: member (S, n) bool over `nodes` (atp_minimal node tuples) -> (S,),
    the mean over the B prompt pairs of the signed joint-patch effect, via atp.patch_node_sets.
    Remembers sets it has patched, so a sweep of one ranker's settings reruns nothing; the cost of a
    ranking is what the ranker counts (n_sets), the work it would do on its own."""

    def __init__(self, model, clean, noise, metric, nodes, chunk_size=256):
        self.model, self.clean, self.noise, self.metric = model, clean, noise, metric
        self.nodes, self.chunk_size = nodes, chunk_size
        self.memo = {}
        self.patched = 0  # sets actually sent to patch_node_sets

    def __call__(self, member):
        keys = [row.numpy().tobytes() for row in member]
        todo = [i for i, key in enumerate(keys) if key not in self.memo]
        if todo:
            new = member[todo]  # (S', n)
            used = new.any(0).nonzero()[:, 0]  # nodes in any of the sets: build masks for those only
            effect = torch.zeros(len(todo), dtype=torch.float64)
            if len(used):
                masks = atp.node_masks(self.model, self.clean.shape[1],  # kind -> (S', L, T, U)
                                       [self.nodes[i] for i in used.tolist()], new[:, used])
                effect = atp.patch_node_sets(self.model, self.clean, self.noise, self.metric, masks,
                                             self.chunk_size, progress=False).mean(1).double().cpu()  # (S',)
            self.patched += len(todo)
            for i, e in zip(todo, effect.tolist()):
                self.memo[keys[i]] = e
        return torch.tensor([self.memo[key] for key in keys], dtype=torch.float64)  # (S,)


# --------------------------------------------------------------------------------------------------
# --- evaluation (paper §4 Experiments): the nodes that count, cost of verified recall, relative cost

# A node counts toward the true top-x when |c(n)| >= COUNTED * the largest |c(n)| of its family in that
# setting. A definition of the model's behaviour, not of the CPU: "c(n) != 0" would count rounding
# residue too (nodes whose c(n) is 1e-6 of a logit in float32, 1e-15 in float64, and exactly 0.0 or not
# depending on the math library's code path), and it moved X, and with it every relative cost, from
# one CPU to another. Effects below a thousandth of the largest are not what verification is for, and
# a relative threshold carries over to models of any scale. The comparison computes c(n) in float64
# (main's --dtype), so no node's side of the threshold depends on rounding either.
COUNTED = 1e-3


def true_top(truth):
    """The nodes that count, best first: (X,) indices of |c(n)| >= COUNTED * max |c(n)|, sorted by |c(n)|
    (ties: natural order). truth: (N,) c(n). Every node counts for nothing when all c(n) are 0."""
    size = truth.abs()
    if size.numel() == 0 or size.max() == 0:
        return torch.zeros(0, dtype=torch.long)
    X = int((size >= COUNTED * size.max()).sum())
    return torch.sort(size, descending=True, stable=True).indices[:X]


def cost_of_verified_recall(order, truth, own_cost, exact=None):
    """cost(x) for x = 1..X over the X nodes that count (`true_top`). cost(x) = own_cost + the verification
    passes, verifying in `order`, until the true top-x are all verified: that is, up to position
    atp.verifications_needed(order, true top-x) of the order, for every x at once (a running maximum of
    positions). Nodes in `exact` were already patched alone by the method and cost nothing to verify.
    order: (N,) a permutation of the nodes; truth: (N,) c(n); exact: (N,) bool. Returns (X,) float64."""
    N = truth.numel()
    if order.numel() != N or not torch.equal(torch.sort(order).values, torch.arange(N)):
        raise ValueError(f"order must be a permutation of all {N} nodes")
    top = true_top(truth)  # (X,)
    position = torch.empty(N, dtype=torch.long)
    position[order] = torch.arange(N)  # position[node] = its place in `order`
    paid = torch.ones(N, dtype=torch.float64) if exact is None else (~exact).double()  # (N,)
    spent = paid[order].cumsum(0)  # (N,): verification passes after verifying order[:i+1]
    deepest = position[top].cummax(0).values  # (X,): verifications_needed(order, top[:x]) - 1
    return own_cost + VERIFY * spent[deepest]  # (X,)


def relative_cost(curve):
    """Inverse-rank-weighted geometric mean of cost(x)/x over x = 1..X (weights proportional to 1/x)."""
    x = torch.arange(1, curve.numel() + 1, dtype=torch.float64)  # (X,)
    w = (1.0 / x) / (1.0 / x).sum()
    return math.exp(float((w * torch.log(curve.double() / x)).sum()))


def geometric_stats(values):
    """Geometric mean and geometric standard deviation (population) of positive numbers."""
    logs = torch.log(torch.tensor(values, dtype=torch.float64))
    return math.exp(float(logs.mean())), math.exp(float(logs.std(unbiased=False))) if len(values) > 1 else 1.0


# --------------------------------------------------------------------------------------------------
# --- one setting: D = the given prompt pairs (B = 1: single prompt pair, as the paper's IOI-PP)

ATP_METHODS = {"AtP": (False, False), "AtP+QK fix": (True, False), "AtP+GradDrop": (False, True),
               "AtP*": (True, True)}
BASELINES = ("Subsampling", "Blocks", "Hierarchical")
FACTORS = ("×1", "×1/4", "×1/2", "×2", "×4")  # hyper-parameter sweep, relative to the default


def baseline_settings(n, sweep):
    """method -> [(factor, label, kwargs)], the default first. Defaults, fixed before any run:
    Subsampling K = 100 subsets with p = min(1/2, 20/K) (each node in about 20 subsets, so every node
    is in and out of >= 2, which the statistics need); Blocks b = round(sqrt n) (minimises n/b + b, the
    cost of verifying the top node under additivity); Hierarchical 4 children per group and a budget of
    4 ceil(sqrt n) set patches. sweep=True adds 1/4, 1/2, 2 and 4 times each default."""
    scale = {"×1": 1, "×1/4": 0.25, "×1/2": 0.5, "×2": 2, "×4": 4}
    out = {"Subsampling": [], "Blocks": [], "Hierarchical": []}
    for factor in (FACTORS if sweep else FACTORS[:1]):
        f = scale[factor]
        K = max(4, round(100 * f))
        out["Subsampling"].append((factor, f"K={K}", dict(n_samples=K, p=min(0.5, 20 / K))))
        b = max(1, round(math.sqrt(n) * f))
        out["Blocks"].append((factor, f"b={b}", dict(block_size=b)))
        h = max(1, round(4 * math.ceil(math.sqrt(n)) * f))
        out["Hierarchical"].append((factor, f"budget={h}", dict(budget=h)))
    return out


def run_baseline(method, effect_of_sets, n, seed, kwargs):
    if method == "Subsampling":
        return subsampling_ranking(effect_of_sets, n, seed=seed, **kwargs)
    if method == "Blocks":
        return blocks_ranking(effect_of_sets, n, **kwargs)
    return hierarchical_ranking(effect_of_sets, n, branching=4, **kwargs)


def atp_scores(model, clean, noise, metric, kinds):
    """method -> kind -> (L, T, U) scores of the four AtP variants, and method -> seconds."""
    scores, seconds = {}, {}
    for name, (qk_fix, grad_drop) in ATP_METHODS.items():
        start = time.perf_counter()
        est = atp.attribution_patching(model, clean, noise, metric, kinds, qk_fix=qk_fix, grad_drop=grad_drop)
        # AtP: |.| per prompt pair, then the mean; GradDrop's per-pair scores are already >= 0
        scores[name] = {k: (v if grad_drop else v.abs()).mean(0) for k, v in est.items()}  # kind -> (L, T, U)
        seconds[name] = time.perf_counter() - start
    return scores, seconds


def moved_nodes(model, clean, noise, kinds):
    """kind -> (L, T, U) bool: nodes the noise prompt moves in some pair (atp.moved). The others have
    I(n) = 0 exactly; the clean and noise forwards, charged to every method, reveal them."""
    with torch.no_grad():
        sites = [atp.site(k, l) for k in kinds for l in range(model.config.n_layer)]
        _, clean_cache = atp.run_with_cache(model, clean, sites)
        _, noise_cache = atp.run_with_cache(model, noise, sites)
    return {k: torch.stack([atp.moved(clean_cache, noise_cache, k, l) for l in range(model.config.n_layer)])
            for k in kinds}


class FamilyRun:
    """One node family in one setting: c(n), the candidates (moved nodes) that every method ranks, and
    the rows and curves of the rankings scored so far. Unmoved nodes go last, in natural order."""

    def __init__(self, fam, c, moved):
        self.fam, self.c = fam, c  # c: (N,) float64
        self.candidates = moved.nonzero()[:, 0]  # (n,)
        self.rest = (~moved).nonzero()[:, 0]  # (N - n,)
        self.n = len(self.candidates)
        self.rows, self.curves = [], {}

    def record(self, method, ranking, own_cost, seed, secs, factor="", label=""):
        """Score one ranking of the candidates; factor "" is the main comparison, "×..." the sweep."""
        order = torch.cat([self.candidates[ranking.order], self.rest])  # (N,): unmoved nodes last
        exact = torch.zeros(self.fam.N, dtype=torch.bool)
        if ranking.exact is not None:
            exact[self.candidates[ranking.exact]] = True
        curve = cost_of_verified_recall(order, self.c, own_cost, exact)  # (X,)
        if not factor:
            self.curves.setdefault((self.fam.name, method), []).append(curve)
        # The order's quality alone: relative cost of the verification passes without C (only where
        # nothing was verified for free, so that cost(x) - C >= x still holds).
        no_c = relative_cost(curve - own_cost) if not exact.any() else None
        self.rows.append(dict(family=self.fam.name, method=method, setting=factor, label=label, seed=seed,
                              own_cost=own_cost, rel_cost=relative_cost(curve), rel_cost_no_c=no_c, n=self.n,
                              X=curve.numel(), seconds=secs))


def score_baselines(run, patcher, seeds, sweep):
    """Subsampling, Blocks and Hierarchical at their default settings (and the sweep), on one family."""
    for method, settings in baseline_settings(run.n, sweep).items():
        for j, (factor, label, kwargs) in enumerate(settings):
            for seed in (seeds if method == "Subsampling" else (None,)):
                start = time.perf_counter()
                try:
                    ranking = run_baseline(method, patcher, run.n, seed, kwargs)
                except ValueError as err:  # Subsampling: a node in (or out of) fewer than 2 subsets
                    if j == 0:
                        raise
                    print(f"  {run.fam.name} {method} {label}: skipped ({err})")
                    continue
                secs = time.perf_counter() - start
                own_cost = BASE + PATCH * ranking.n_sets  # counted by the ranker
                if j == 0:
                    run.record(method, ranking, own_cost, seed, secs, label=label)
                if sweep:  # (wall time only for the default: the other settings replay its patches)
                    run.record(method, ranking, own_cost, seed, secs if j == 0 else None, factor=factor,
                               label=label)


def evaluate_setting(model, clean, noise, metric, seeds=(0,), families=FAMILIES, sweep=False):
    """Rank every family's nodes with every method and score each order against exact activation
    patching. clean, noise: (B, T). Returns (rows, curves): rows are dicts (family, method, setting, seed,
    own_cost, rel_cost, n, X, seconds); curves maps (family, method) -> list of cost(x) tensors (X,).
    Deterministic methods run once (seed None); Subsampling and Random once per seed."""
    cfg, T = model.config, clean.shape[1]
    kinds = tuple(k for fam in families.values() for k in fam)
    start = time.perf_counter()
    truth = atp.activation_patching(model, clean, noise, metric, kinds,
                                    progress=False)  # kind -> (B, L, T, U)
    truth_seconds = time.perf_counter() - start
    scores, seconds = atp_scores(model, clean, noise, metric, kinds)
    moved = moved_nodes(model, clean, noise, kinds)
    rows, curves = [], {}
    for fam_name, fam_kinds in families.items():
        fam = Family(fam_name, fam_kinds, cfg, T)
        run = FamilyRun(fam, fam.vector({k: truth[k].mean(0) for k in fam_kinds}).double(),  # c(n)
                        fam.vector({k: moved[k] for k in fam_kinds}))
        for name, (qk_fix, grad_drop) in ATP_METHODS.items():
            score = fam.vector({k: scores[name][k] for k in fam_kinds})[run.candidates]  # (n,)
            run.record(name, Ranking(rank_by_score(score)),
                       atp_cost(cfg.n_layer, qk_fix, grad_drop, fam_kinds), None, seconds[name])
        # One patcher per family: a sweep's settings share its memory of patched sets (Hierarchical's
        # smaller budgets and Subsampling's smaller K replay a prefix of the larger run).
        patcher = SetPatcher(model, clean, noise, metric, [fam.node(i) for i in run.candidates.tolist()])
        score_baselines(run, patcher, seeds, sweep)
        for seed in seeds:
            run.record("Random", random_ranking(run.n, seed), BASE, seed, 0.0)
        run.rows.append(dict(family=fam_name, method="exact patching (truth)", setting="", label="",
                             seed=None, own_cost=BASE + run.n * PATCH, rel_cost=None, rel_cost_no_c=None,
                             n=run.n, X=len(true_top(run.c)), seconds=truth_seconds))
        rows += run.rows
        curves.update(run.curves)
    return rows, curves


# --------------------------------------------------------------------------------------------------
# --- reporting: markdown table, CSV, plots, and the paper's claims

METHOD_ORDER = list(ATP_METHODS) + list(BASELINES) + ["Random"]


def summarize(rows, setting=""):
    """(where, family, method) -> dict(gmean, gstd, runs, own_cost, label) over prompt pairs and seeds.
    setting "" is the main comparison; a factor such as "×2" picks that row of the baseline sweep."""
    groups = {}
    for r in rows:
        if r["setting"] == setting and r["method"] in METHOD_ORDER:
            groups.setdefault((r["where"], r["family"], r["method"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        gmean, gstd = geometric_stats([r["rel_cost"] for r in rs])
        no_c = [r["rel_cost_no_c"] for r in rs]
        out[key] = dict(gmean=gmean, gstd=gstd, runs=len(rs),
                        own_cost=sum(r["own_cost"] for r in rs) / len(rs), label=rs[0]["label"],
                        no_c=geometric_stats(no_c)[0] if None not in no_c else None)
    return out


def per_pair(rows, where, family, method):
    """pair -> relative cost (geometric mean over seeds) of one method in the main comparison."""
    values = {}
    for r in rows:
        if (r["where"], r["family"], r["method"], r["setting"]) == (where, family, method, ""):
            values.setdefault(r["pair"], []).append(r["rel_cost"])
    return {pair: geometric_stats(v)[0] for pair, v in values.items()}


def claims(summary, rows, wheres, families):
    """The paper's headline ordering (its §4 Experiments), per setting and family, with numbers.
    Printable lines."""
    lines = []
    for where in wheres:
        for fam in families:
            rc = {m: summary[(where, fam, m)]["gmean"] for m in METHOD_ORDER}
            ok = all(rc["AtP"] < rc[m] for m in BASELINES)
            lines.append(f"[{where}, {fam}] AtP beats Subsampling, Blocks and Hierarchical: "
                         f"{'yes' if ok else 'NO'} (AtP {rc['AtP']:.2f}; "
                         + ", ".join(f"{m} {rc[m]:.2f}" for m in BASELINES) + ")")
            lines.append(f"[{where}, {fam}] AtP* <= AtP: {'yes' if rc['AtP*'] <= rc['AtP'] else 'NO'} "
                         f"(AtP* {rc['AtP*']:.2f}, AtP {rc['AtP']:.2f}; AtP+QK fix {rc['AtP+QK fix']:.2f}, "
                         f"AtP+GradDrop {rc['AtP+GradDrop']:.2f})")
            lines.append("    the orders alone (relative cost of the verification passes, C left out): "
                         + ", ".join(f"{m} {summary[(where, fam, m)]['no_c']:.2f}" for m in ATP_METHODS))
            swept = [summarize(rows, factor) for factor in FACTORS[1:]]
            if any(swept):  # each baseline at its best swept setting, chosen in hindsight on these very runs
                best = {m: min([rc[m]] + [s[(where, fam, m)]["gmean"] for s in swept if (where, fam, m) in s])
                        for m in BASELINES}
                lines.append(f"    ... and against each baseline's best setting in hindsight: "
                             f"{'yes' if all(rc['AtP'] < best[m] for m in BASELINES) else 'NO'} ("
                             + ", ".join(f"{m} {best[m]:.2f}" for m in BASELINES) + ")")
            atp_runs = per_pair(rows, where, fam, "AtP")
            if len(atp_runs) > 1:  # how consistent: prompt pair by prompt pair
                star = per_pair(rows, where, fam, "AtP*")
                lines.append(f"    AtP* <= AtP in {sum(star[p] <= atp_runs[p] for p in atp_runs)}/"
                             f"{len(atp_runs)} prompt pairs")
                for m in BASELINES:
                    other = per_pair(rows, where, fam, m)
                    lines.append(f"    AtP < {m} in {sum(atp_runs[p] < other[p] for p in atp_runs)}/"
                                 f"{len(atp_runs)} prompt pairs")
    return lines


def write_csv(path, rows):
    """One line per run: setting (where, pair), family, method, sweep factor and label, seed, sizes, costs
    (rel_cost_no_c: the relative cost with the method's own cost C left out)."""
    keys = ["where", "pair", "family", "method", "setting", "label", "seed", "n", "X", "own_cost", "rel_cost",
            "rel_cost_no_c", "seconds"]
    with open(path, "w") as f:
        f.write(",".join(keys) + "\n")
        for r in rows:
            cell = lambda v: "" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v))
            f.write(",".join(cell(r.get(k)) for k in keys) + "\n")


def plot_curves(path, curves, family, wheres):
    """cost(x) against x on log-log axes: the geometric mean over runs, shaded by the geometric std,
    and the oracle diagonal cost(x) = x. One panel per setting. Returns False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(wheres), figsize=(5.2 * len(wheres), 4.2), squeeze=False)
    for ax, where in zip(axes[0], wheres):
        X, drawn = None, {}
        for method in METHOD_ORDER:
            runs = curves.get((where, family, method))
            if not runs:
                continue
            X = min(r.numel() for r in runs)  # x runs to the smallest number of counted nodes
            logs = torch.stack([torch.log(r[:X]) for r in runs])  # (runs, X)
            mean, std = logs.mean(0).exp(), logs.std(0, unbiased=False).exp()  # (X,)
            x = torch.arange(1, X + 1)
            style = "-" if method in ATP_METHODS else ("--" if method in BASELINES else ":")
            same = [m for m, other in drawn.items() if torch.equal(other, mean)]  # e.g. the QK fix on neurons
            drawn[method] = mean
            label = f"{method} (same curve as {same[0]})" if same else method
            line, = ax.plot(x, mean, style, lw=1.3, label=label)
            if len(runs) > 1:
                ax.fill_between(x, mean / std, mean * std, color=line.get_color(), alpha=0.12, lw=0)
        if X:
            ax.plot([1, X], [1, X], color="black", lw=0.8, label="oracle: cost = x")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("x (true top-x nodes by |c(n)| all verified)")
        ax.set_ylabel("cost, forward passes per prompt pair")
        ax.set_title(f"{family} nodes, {where}", fontsize=10)
        ax.grid(alpha=0.3, which="both", lw=0.4)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def report_header(title, command, cfg, rows, elapsed, dist_pairs, dtype):
    """The markdown report's title and the paragraphs that say what was run and how it is scored."""
    return [f"# Cost of verified recall: {title}", "",
            f"`{command}`: {elapsed:.0f} s wall clock, torch threads: {torch.get_num_threads()}. Model: "
            f"{cfg.n_layer} layers, {cfg.n_head} heads, d_model {cfg.n_embd}, d_mlp {cfg.d_mlp}, run in "
            f"{dtype}. Metric: logit difference (answer minus the other name) at the last position. Settings "
            "(paper §4 Experiments): "
            "**single pair** runs each sampled prompt pair alone with its own ground truth (like IOI-PP); "
            "**distribution** takes the pairs as one distribution, c(n) = mean over the pairs."
            + (" The pairs come from one seeded sample (held-out names for the toy model): the single-pair "
               f"runs use its first pairs, the distribution its first {dist_pairs}. The distribution is one "
               "draw, so its spread covers only the seeds of Subsampling and Random." if dist_pairs else ""),
            "",
            "Relative cost (paper §4 Experiments): the inverse-rank-weighted (w ∝ 1/x) geometric mean of "
            f"cost(x)/x over x = 1..X, where X counts the nodes with |c(n)| ≥ {COUNTED:g} × the largest "
            "|c(n)| of their family in that setting (smaller effects are not what verification is for; "
            "counting every c(n) ≠ 0 would count rounding residue, whose exact zeros depend on the CPU); "
            "the oracle scores 1. Each cell: geometric mean over prompt pairs (and seeds, for Subsampling "
            "and Random) ×/÷ geometric std. C: the method's own cost per prompt pair, in forward passes "
            "(accounting below).", ""]


def report_setting(summary, rows, where, families):
    """One setting's table of relative costs, and its node counts."""
    out = [f"## {where}", "",
           "| method | " + " | ".join(f"{fam}: C | {fam}: relative cost" for fam in families) + " |",
           "|---|" + "---:|---:|" * len(families)]
    for m in METHOD_ORDER:
        cells = []
        for fam in families:
            s = summary[(where, fam, m)]
            cells += [f"{s['own_cost']:.1f}", f"{s['gmean']:.2f} ×/÷ {s['gstd']:.2f}"]
        labels = list(dict.fromkeys(summary[(where, f, m)]["label"] for f in families))  # once if all equal
        name = m + (f" ({' / '.join(labels)})" if m in BASELINES else "")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    truth = [r for r in rows if r["where"] == where and r["method"] == "exact patching (truth)"]

    def span(fam, key):
        values = [r[key] for r in truth if r["family"] == fam]
        return f"{min(values)}" if min(values) == max(values) else f"{min(values)}-{max(values)}"

    return out + ["", "Nodes: " + "; ".join(f"{fam}: {span(fam, 'n')} moved by the noise prompt, "
                                            f"{span(fam, 'X')} counted (|c(n)| ≥ {COUNTED:g} × max)"
                                            for fam in families)
                  + ". C of exact patching of every moved node: 2 + that number.", ""]


def report_sweep(summary, rows, wheres, families):
    """The baselines' hyper-parameter sweep, one table per setting."""
    out = ["## Baseline hyper-parameters", "",
           "Each baseline's default (×1, fixed before any run) and 1/4 to 4 times it. Relative cost, "
           "geometric mean over runs, with the setting per family.", ""]
    for where in wheres:
        out += [f"{where}:", "", "| baseline | factor | " + " | ".join(families) + " |",
                "|---|---|" + "---:|" * len(families)]
        for m in BASELINES:
            for factor in FACTORS:
                s = summarize(rows, factor)
                cells = [f"{s[(where, f, m)]['gmean']:.2f} ({s[(where, f, m)]['label']})"
                         if (where, f, m) in s else "–" for f in families]
                out.append(f"| {m} | {factor} | " + " | ".join(cells) + " |")
        out += ["", "AtP for reference: " + ", ".join(
            f"{f} {summary[(where, f, 'AtP')]['gmean']:.2f}" for f in families) + ".", ""]
    return out


def report_costs(L):
    """The cost accounting table (per prompt pair)."""
    return ["## Cost accounting (per prompt pair; one forward pass of one prompt = 1)", "",
            "| item | cost |", "|---|---:|",
            "| clean + noise forward (every method, once; verification reuses them) | 2 |",
            "| backward pass through l of the L layers | 2 l / L |",
            f"| AtP: 2 forwards + 1 backward | {atp_cost(L):g} |",
            f"| AtP+QK fix: + the QK fix, at most 1 forward (two QK^T-sized products and softmaxes per "
            f"head); neurons: nothing to fix, 4 | {atp_cost(L, qk_fix=True):g} |",
            f"| AtP+GradDrop: + the pass dropping layer l, through the l layers below it: "
            f"sum 2 l / L = L - 1 | {atp_cost(L, grad_drop=True):g} |",
            f"| AtP*: both; the QK fix is redone in each GradDrop pass for the layers it reaches; "
            f"neurons: {atp_cost(L, True, True, ('neuron',)):g} | {atp_cost(L, True, True):g} |",
            "| Subsampling, Blocks, Hierarchical: 2 + one per set patched (counted by the ranker) "
            "| 2 + sets |",
            "| Random order | 2 |",
            "| verifying one node (free when the method already patched it alone) | 1 |", "",
            "Nodes that the noise prompt leaves unchanged in every pair have c(n) = 0 exactly. The clean and "
            "noise forwards reveal them, so every method ranks only the moved nodes and lists the others "
            "last; they never count among the true top-x.", ""]


def markdown_report(title, command, cfg, rows, wheres, families, claim_lines, elapsed, plots, dist_pairs,
                    dtype="float64"):
    summary = summarize(rows)
    out = report_header(title, command, cfg, rows, elapsed, dist_pairs, dtype)
    for where in wheres:
        out += report_setting(summary, rows, where, families)
    out += ["## Does the paper's ordering reproduce? (paper §4 Experiments)", "", "```"]
    out += claim_lines + ["```", ""]
    if any(r["setting"] for r in rows):
        out += report_sweep(summary, rows, wheres, families)
    out += report_costs(cfg.n_layer)
    out += [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------------
# --- main

# The committed results: written only by the default run (see experiments/results/README.md).
SHIPPED = os.path.join(HERE, "results")
SCRATCH = os.path.join(ROOT, "out")  # every other run writes here unless --out says otherwise (git-ignored)


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Compare AtP, AtP* and the patching baselines by their cost "
                                     "of verified recall (AtP* paper, §4 Experiments). Default: the toy IOI "
                                     "model.")
    parser.add_argument("--model", default=None, help="a Hugging Face GPT-2 directory; default: toy_model/")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--dtype", default="float64", choices=("float64", "float32"),
                        help="model and estimates (default float64: no ranking, and no node's side of the "
                        "counting threshold, depends on the CPU's float32 rounding; float32 for large "
                        "models)")
    parser.add_argument("--pairs", type=int, default=5, help="prompt pairs, each its own single-pair setting")
    parser.add_argument("--seeds", type=int, default=2, help="seeds for Subsampling and Random")
    parser.add_argument("--dist-pairs", type=int, default=8,
                        help="prompt pairs of the distribution setting (0: skip it)")
    parser.add_argument("--no-sweep", action="store_true", help="baselines at their default settings only")
    parser.add_argument("--out", default=None, help="output directory (default: experiments/results/ for "
                        "the default run on the toy model, which is what experiments/results/ ships; out/ "
                        "for any other run, which may not write to experiments/results/)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the many small "
                        "patched forwards gain little from more, and more threads slow down badly on a busy "
                        "machine)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 pairs, 1 seed, no distribution, no sweep")
    args = parser.parse_args(argv)
    if args.quick:
        args.pairs, args.seeds, args.dist_pairs, args.no_sweep = 2, 1, 0, True
    defaults = parser.parse_args([])
    shipped_run = all(getattr(args, k) == getattr(defaults, k) for k in
                      ("model", "device", "dtype", "pairs", "seeds", "dist_pairs", "no_sweep"))
    if args.out is None:
        args.out = SHIPPED if shipped_run else SCRATCH
    elif os.path.abspath(args.out) == SHIPPED and not shipped_run:
        parser.error("experiments/results/ holds the results of the default run; write this one elsewhere "
                     "(--out DIR)")
    return args


def load(args):
    """(model, label, stem, make): the model on args.device in args.dtype, and make(n, seed) -> pairs."""
    if args.model is None:
        import toy_ioi
        if not os.path.isdir(toy_ioi.TOY_MODEL_DIR):
            raise SystemExit(f"{toy_ioi.TOY_MODEL_DIR} not found: run `python toy_ioi.py --out toy_model` to "
                             "train it")
        model = toy_ioi.load_toy_model()
        make = lambda n, seed: toy_ioi.make_pairs(n, split="test", seed=seed)
        label, stem = "toy IOI model (toy_model/)", "compare_toy"
    else:
        from model import GPT
        model = GPT.from_pretrained(args.model)
        make = lambda n, seed: atp.gpt2_ioi_pairs(n, seed)[:4]
        label = args.model
        stem = "compare_" + os.path.basename(os.path.normpath(args.model))
    return model.to(args.device, getattr(torch, args.dtype)), label, stem, make


def run_settings(model, make, args):
    """Every single-pair setting, then the distribution setting. Returns (rows, curves, wheres)."""
    rows, curves, seeds = [], {}, tuple(range(args.seeds))
    clean, noise, answer, wrong = make(max(args.pairs, args.dist_pairs), 0)
    settings = [("single pair", i, slice(i, i + 1)) for i in range(args.pairs)]  # the paper's IOI-PP
    if args.dist_pairs:  # the distribution setting: the first dist_pairs pairs as one D
        settings.append(("distribution", f"{args.dist_pairs} pairs", slice(0, args.dist_pairs)))
    for where, pair, s in settings:
        start = time.perf_counter()
        c, n, a, w = (t[s].to(args.device) for t in (clean, noise, answer, wrong))
        r, cs = evaluate_setting(model, c, n, atp.logit_diff(a, w), seeds, sweep=not args.no_sweep)
        for row in r:
            row.update(where=where, pair=pair)
        rows.extend(r)
        for (fam, method), runs in cs.items():
            curves.setdefault((where, fam, method), []).extend(runs)
        rc = {(x["family"], x["method"]): x["rel_cost"] for x in r
              if x["setting"] == "" and x["seed"] in (None, 0)}
        print(f"{where} {pair}: "
              + "; ".join(f"{fam}: AtP {rc[(fam, 'AtP')]:.2f}, AtP* {rc[(fam, 'AtP*')]:.2f}, "
                          f"Blocks {rc[(fam, 'Blocks')]:.2f}" for fam in FAMILIES)
              + f"  ({time.perf_counter() - start:.1f} s)")
    return rows, curves, list(dict.fromkeys(where for where, _, _ in settings))


def write_outputs(args, stem, label, cfg, rows, curves, wheres, claim_lines, elapsed, argv):
    """The plots, the markdown report and the CSV in args.out. Returns the plot paths written."""
    os.makedirs(args.out, exist_ok=True)
    plots = [os.path.join(args.out, f"{stem}_{fam}.png") for fam in FAMILIES]
    if not all([plot_curves(path, curves, fam, wheres) for path, fam in zip(plots, FAMILIES)]):
        print("matplotlib is not installed: skipped the plots")
        plots = []
    command = "python experiments/compare_methods.py" + "".join(
        f" {a}" for a in (sys.argv[1:] if argv is None else argv))
    with open(os.path.join(args.out, f"{stem}.md"), "w") as f:
        f.write(markdown_report(label, command, cfg, rows, wheres, FAMILIES, claim_lines, elapsed, plots,
                                args.dist_pairs, args.dtype))
    write_csv(os.path.join(args.out, f"{stem}.csv"), rows)
    return plots


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    began = time.perf_counter()
    model, label, stem, make = load(args)
    cfg = model.config
    print(f"model: {label}: {cfg.n_layer} layers, {cfg.n_head} heads, d_model {cfg.n_embd}, "
          f"d_mlp {cfg.d_mlp}, {args.dtype}")
    rows, curves, wheres = run_settings(model, make, args)
    summary = summarize(rows)
    claim_lines = claims(summary, rows, wheres, FAMILIES)
    elapsed = time.perf_counter() - began
    plots = write_outputs(args, stem, label, cfg, rows, curves, wheres, claim_lines, elapsed, argv)
    for where in wheres:
        print(f"\nrelative cost, {where} (geometric mean ×/÷ geometric std; C = own cost per prompt pair):")
        for m in METHOD_ORDER:
            cells = [summary[(where, fam, m)] for fam in FAMILIES]
            print(f"  {m:>13}: " + "   ".join(f"{fam} {s['gmean']:8.2f} ×/÷ {s['gstd']:.2f} "
                                             f"(C {s['own_cost']:6.1f})" for fam, s in zip(FAMILIES, cells)))
    print("\n" + "\n".join(claim_lines))
    print(f"\nwrote {os.path.join(args.out, stem)}.md, .csv"
          + "".join(f", {os.path.basename(p)}" for p in plots) + f" in {elapsed:.0f} s")


if __name__ == "__main__":
    main()
