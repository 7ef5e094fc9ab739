"""
AtP* in one file: exact activation patching (the ground truth), AtP, the QK fix, GradDrop, AtP*, and the
statistical bound on the false negatives that remain, in the order of the paper:

  J. Kramar, T. Lieberum, R. Shah, N. Nanda (2024). "AtP*: An efficient and scalable method for
  localizing LLM behaviour to components." https://arxiv.org/abs/2403.00745

Part I is the paper in code: each method in its literal form, short enough to check against its formula
by eye. Part II computes the same numbers fast (batched, resumed, one backward graph); the public API is
Part II, and each fast function is tested equal to its Part I twin (`X` against `X_reference`). Part III
holds the input checks and Student's t. Part I calls nothing in Part II.

Conventions (the paper's, everywhere): run on the CLEAN prompt, patch in the NOISE value, take the
gradient at the clean activation, Delta = noise - clean, |.| per prompt pair before averaging. Part I
assumes a model in eval mode (model.eval(): no dropout); Part II's functions set it for each call.

Dimension legend: B prompt pairs, L layers, T query position, S key position, H query heads, Hkv
key-value heads (H with plain attention; fewer with grouped-query attention), Dh d_head, M MLP neurons,
U units of a site (H for q/z, Hkv for k/v, M for neurons), E features per unit (Dh, or 1 for a neuron),
N nodes, J node sets. G is dL/dpattern (B, H, T, S), the gradient on the attention probabilities.

Nodes (paper §2 Background): a kind in KINDS at (layer, position, unit), written (kind, layer, pos, unit);
or a unit at every position at once, (kind, layer, unit) (positions="all" in Part II). Per-node
results are PerPair dicts kind -> (B, L, T, U) (or (B, L, U)), prompt pairs first; functions that take
a LIST of nodes or sets return (N, B) or (J, B). Signed per-pair values are "effects"/"estimates";
rankings (>= 0) "scores".

The model protocol: what a model must provide to be used with this file.
  - a torch.nn.Module called as model(idx, hooks) -> logits (B, T, V), idx (B, T) token ids. hooks maps
    a site name to fn(tensor) -> None (read it) or a tensor of the same shape and dtype (replace it).
    A hook is given the very tensor the rest of the forward consumes (autograd.grad works through it).
  - model.config with n_layer, n_head, d_head, d_mlp, vocab_size, n_positions, and optionally n_kv_head
    (key-value heads, default n_head; query head h reads key-value head h // (n_head // n_kv_head)).
  - model.attention_scale(layer) -> float: scores = (q . k) * scale, causal mask, softmax over keys.
  - sites, per layer l (TransformerLens names):
      blocks.{l}.hook_resid_pre                 (B, T, D)    what block l consumes (l = 0: the graph's start)
      blocks.{l}.attn.hook_q                    (B, T, H, Dh)  q and k: the vectors whose dot product IS the
      blocks.{l}.attn.hook_k, attn.hook_v       (B, T, Hkv, Dh)  score (after any rotary embedding)
      blocks.{l}.attn.hook_z                    (B, T, H, Dh)  pattern-weighted values, before W_O
      blocks.{l}.attn.hook_pattern              (B, H, T, S)
      blocks.{l}.mlp.hook_post                  (B, T, M)    the neurons
      blocks.{l}.hook_attn_out, hook_mlp_out    (B, T, D)    layer l's residual writes, with
      blocks.{l}.hook_resid_post                (B, T, D)    = resid_pre + attn_out + mlp_out
  - optional, only faster (exact patching without it runs full forwards and gives the same numbers):
    model.forward_from(layer, resid, hooks, past, last_position_only) -> logits: run blocks layer..L-1 on
    resid (n, T', D), the clean stream entering `layer` at positions T-T'..T-1; `past` holds, per layer,
    the clean values of the sites model.resume_sites (default attn.hook_k, attn.hook_v) at the earlier
    positions. model.GPT (model.py) has it; tl_adapter.py wraps TransformerLens.

    import atp_minimal as atp
    effects = atp.activation_patching(model, clean, noise, metric)        # I(n) per pair, exact
    scores  = atp.atp_star(model, clean, noise, metric)                    # per pair, >= 0
    ranking, _ = atp.rank_nodes({k: s.mean(0) for k, s in scores.items()})  # c_hat(n), best first

The worked example on the shipped toy IOI model: `python demo.py`.
"""

import itertools
import math
import numbers
from contextlib import contextmanager

import torch

KINDS = ("q", "k", "v", "z", "neuron")
SITES = {"q": "attn.hook_q", "k": "attn.hook_k", "v": "attn.hook_v", "z": "attn.hook_z",
         "neuron": "mlp.hook_post"}


class PerPair(dict):
    """kind -> tensor (B, ...): one value per prompt pair and node. A plain dict otherwise; rank_nodes
    refuses it, since a ranking needs one value per node (average over the pairs first: .mean(0))."""


# ==================================================================================================
# Part I: the paper, in code
# ==================================================================================================

# --- nodes, sites and caches

def site(kind, layer):
    """The site of a node kind in a layer: site("z", 3) = "blocks.3.attn.hook_z"."""
    return f"blocks.{layer}.{SITES[kind]}"


def n_units(model, kind):
    """Units of a site: M neurons, H query heads for q and z, Hkv key-value heads for k and v
    (config.n_kv_head under grouped-query attention, else H)."""
    if kind == "neuron":
        return model.config.d_mlp
    if kind in ("k", "v"):
        return getattr(model.config, "n_kv_head", None) or model.config.n_head
    return model.config.n_head


def all_nodes(model, kind, T, positions="each"):
    """Every node of a kind, in index order: (kind, layer, pos, unit), or (kind, layer, unit) for "all"."""
    L, U = model.config.n_layer, n_units(model, kind)
    if positions == "all":
        return [(kind, l, u) for l in range(L) for u in range(U)]
    return [(kind, l, t, u) for l in range(L) for t in range(T) for u in range(U)]


def run_with_cache(model, idx, names, hooks=None):
    """Forward on idx -> (logits (B, T, V), {name: tensor at that site}). The cached tensors are the very
    objects the forward consumed, so torch.autograd.grad can differentiate with respect to them. Hooks
    given for a cached site run first, and the cache keeps what they return."""
    cache, hooks = {}, dict(hooks or {})
    for name in dict.fromkeys(names):
        def keep(t, name=name, inner=hooks.get(name)):
            out = inner(t) if inner is not None else None
            cache[name] = t if out is None else out
            return out
        hooks[name] = keep
    return model(idx, hooks=hooks), cache


def as_units(t):
    """Site tensor -> (B, T, U, E): q/k/v/z are (B, T, H, Dh) already; neurons (B, T, M) get E = 1."""
    return t if t.dim() == 4 else t.unsqueeze(-1)


# --- metrics: one scalar per prompt pair (paper §2 Background)
#
# A metric maps logits (B, T, V) to (B,), and value b must depend on row b alone: AtP differentiates the
# sum over pairs, and patched runs stack copies of the B pairs. The public functions check both. The
# metrics here record the position they read (metric.position); Part II computes only that position's
# logits when it is the last.

def logit_diff(answer, wrong, position=-1):
    """metric(logits (B, T, V)) -> (B,): logit of `answer` minus logit of `wrong` at `position`.
    answer/wrong: a token id or one id per prompt pair."""
    answer, wrong = token_ids(answer, "answer"), token_ids(wrong, "wrong")

    def metric(logits):
        at = at_position(logits, position, "logit_diff")  # (B, V), float32 or better
        a, w = fit_ids(answer, at, "answer"), fit_ids(wrong, at, "wrong")  # (B,) each
        return at.gather(1, a[:, None])[:, 0] - at.gather(1, w[:, None])[:, 0]  # (B,)
    metric.position = check_position(position)
    return metric


def neg_log_prob(target, position=-1):
    """metric(logits (B, T, V)) -> (B,): -log p(target) at `position`."""
    target = token_ids(target, "target")

    def metric(logits):
        logp = torch.log_softmax(at_position(logits, position, "neg_log_prob"), dim=-1)  # (B, V)
        return -logp.gather(1, fit_ids(target, logp, "target")[:, None])[:, 0]  # (B,)
    metric.position = check_position(position)
    return metric


# --- activation patching, the ground truth (paper §2 Background)

def patch_hooks(nodes, noise_acts):
    """Hooks that overwrite each node with its cached noise value: node (kind, layer, pos, unit) is
    t[:, pos, unit] at its site; (kind, layer, unit) is t[:, :, unit], the unit at every position."""
    at_site = {}  # site name -> the nodes there
    for node in nodes:
        at_site.setdefault(site(node[0], node[1]), []).append(node)
    return {name: overwrite(here, noise_acts[name]) for name, here in at_site.items()}


def overwrite(nodes, new):
    """A hook returning its tensor with every node's entries taken from `new`, the site's noise value."""
    def patch(t):  # (B, T, U, Dh) or (B, T, M)
        t = t.clone()
        for node in nodes:
            if len(node) == 4:  # (kind, layer, pos, unit)
                where = (slice(None), node[2], node[3])
            else:  # (kind, layer, unit): the unit at every position
                where = (slice(None), slice(None), node[2])
            t[where] = new[where]
        return t
    return patch


def patch_node_sets_reference(model, clean, noise, metric, node_sets):
    """For each of J node sets: metric(clean | do(set <- its noise values)) - metric(clean), (J, B). With one
    node in a set that is I(n), the node's exact effect. The noise activations and the clean metric are
    computed once; then one patched forward per set."""
    names = {site(n[0], n[1]) for nodes in node_sets for n in nodes}
    with torch.no_grad():
        _, noise_acts = run_with_cache(model, noise, names)
        base = check_metric(metric, model(clean), clean.shape[0])  # (B,), the clean run's metric
        effects = [metric(model(clean, hooks=patch_hooks(nodes, noise_acts))) - base for nodes in node_sets]
    return torch.stack(effects) if effects else base.new_zeros(0, clean.shape[0])  # (J, B)


def activation_patching_reference(model, clean, noise, metric, kinds=KINDS):
    """Exhaustive activation patching as a plain loop, one forward per node:
    I(n) = metric(clean | do(n <- n(noise))) - metric(clean). Returns kind -> (B, L, T, U); the true
    contribution is c(n) = effects[kind].mean(0)."""
    kinds = check_inputs(model, clean, noise, kinds)
    B, T, L = clean.shape[0], clean.shape[1], model.config.n_layer
    effects = {}
    for k in kinds:
        nodes = all_nodes(model, k, T)
        values = patch_node_sets_reference(model, clean, noise, metric, [[n] for n in nodes])  # (N, B)
        effects[k] = values.T.reshape(B, L, T, n_units(model, k))  # nodes are in (layer, pos, unit) order
    return PerPair(effects)


# --- AtP (paper §2 Background: attribution patching)

def clean_gradients(model, clean, metric, names):
    """One clean forward and one backward of sum_b metric_b: ({name: activation}, {name: dL/d activation}),
    both detached. A site with no path to the metric gets a zero gradient."""
    start = {"blocks.0.hook_resid_pre": lambda t: t.detach().requires_grad_(True)}  # the graph starts here
    with torch.enable_grad():
        logits, acts = run_with_cache(model, clean, names, start)
        values = check_metric(metric, logits, clean.shape[0])  # (B,)
        grads = torch.autograd.grad(values.sum(), [acts[n] for n in names], allow_unused=True)
    grads = {n: torch.zeros_like(acts[n]) if g is None else g for n, g in zip(names, grads)}
    return {n: a.detach() for n, a in acts.items()}, grads


def atp_runs(model, clean, noise, metric, names):
    """AtP's two forwards and one backward: (noise activations, clean activations, clean dL/d activation),
    each {name: tensor} for the sites `names`, detached."""
    with torch.no_grad():
        _, noise_acts = run_with_cache(model, noise, names)  # forward 1: the noise run
    clean_acts, grads = clean_gradients(model, clean, metric, names)  # forward 2 and the backward
    return noise_acts, clean_acts, grads


def delta_dot_grad(noise_act, clean_act, grad):
    """AtP's estimate for every node of a site: (n(noise) - n(clean)) . dL/dn over each unit's E features.
    Site tensors (B, T, U, E) or (B, T, M) -> (B, T, U)."""
    return ((as_units(noise_act) - as_units(clean_act)) * as_units(grad)).sum(-1)


def atp_estimates_reference(model, clean, noise, metric, kinds=KINDS):
    """AtP: I_hat(n) = (n(noise) - n(clean)) . dL/dn at the clean run, for every node at once, from two
    forwards and one backward. Signed, per pair: kind -> (B, L, T, U)."""
    kinds = check_inputs(model, clean, noise, kinds)
    L = model.config.n_layer
    names = [site(k, l) for k in kinds for l in range(L)]
    noise_acts, clean_acts, grads = atp_runs(model, clean, noise, metric, names)  # 2 forwards, 1 backward
    estimates = {}
    for k in kinds:
        per_layer = [delta_dot_grad(noise_acts[site(k, l)], clean_acts[site(k, l)], grads[site(k, l)])
                     for l in range(L)]  # each (B, T, U): Delta n . dL/dn
        estimates[k] = torch.stack(per_layer, 1)  # (B, L, T, U)
    return PerPair(estimates)


# --- the QK fix (paper §3 Methods: attention saturation). Recompute the attention softmax exactly, and
# linearise only what comes after it, with G = dL/dpattern from the clean backward pass.

def per_query_head(k, H):
    """Keys or values (B, T, Hkv, Dh) -> (B, T, H, Dh): each key-value head repeated for the query heads it
    serves (its group of H // Hkv consecutive heads). A no-op when Hkv = H."""
    return k.repeat_interleave(H // k.shape[2], dim=2)


def causal_scores(q, k, scale):
    """Attention scores (B, H, T, S) = q_t . k_s * scale, with -inf where key s > query t.
    q: (B, T, H, Dh); k: (B, S, Hkv, Dh), Hkv key-value heads; S = T (one sequence attending to itself)."""
    k = per_query_head(k, q.shape[2])  # (B, S, H, Dh)
    T = q.shape[1]
    scores = (q.transpose(1, 2) @ k.permute(0, 2, 3, 1)) * scale  # (B, H, T, Dh) @ (B, H, Dh, S)
    return scores.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), float("-inf"))


def query_fix(q_clean, q_noise, k_clean, G, scale):
    """Query fix: I_hat_Q(q_t) = sum_s (softmax_s(q_t(noise) . k_s(clean) * scale + mask) - a_ts) G_ts.
    q: (B, T, H, Dh); k: (B, S, Hkv, Dh); G: dL/dpattern (B, H, T, S). Returns (B, T, H)."""
    a = torch.softmax(causal_scores(q_clean, k_clean, scale), -1)  # (B, H, T, S), the clean pattern
    a_new = torch.softmax(causal_scores(q_noise, k_clean, scale), -1)  # noise query, clean keys
    return ((a_new - a) * G).sum(-1).transpose(1, 2)  # (B, H, T) -> (B, T, H)


def key_fix_reference(q_clean, k_clean, k_noise, G, scale):
    """Key fix, literally: patching key s moves logit s of every query row t >= s. Recompute each row's
    softmax with only that logit moved to q_t(clean) . k_s(noise) * scale, and linearise after it:
        I_hat_K(k_s) = sum_{t >= s} sum_s' (a~(s)_ts' - a_ts') G_ts'.        O(T^3) per head.
    Under grouped-query attention key-value head g feeds the query heads of its group: sum over them.
    q: (B, T, H, Dh); k: (B, S, Hkv, Dh); G: (B, H, T, S). Returns (B, S, Hkv)."""
    scores = causal_scores(q_clean, k_clean, scale)  # (B, H, T, S)
    moved = causal_scores(q_clean, k_noise, scale)  # (B, H, T, S): every logit with its key's noise value
    a = torch.softmax(scores, -1)
    per_head = torch.zeros_like(G[:, :, 0, :])  # (B, H, S)
    for s in range(scores.shape[-1]):
        one_moved = scores.clone()
        one_moved[..., s] = moved[..., s]  # only logit s moves (rows t < s cannot see key s: -inf either way)
        per_query = ((torch.softmax(one_moved, -1) - a) * G).sum(-1)  # (B, H, T): dI_t(k_s)
        per_head[..., s] = per_query[..., s:].sum(-1)  # the queries t >= s that see key s
    B, H, S = per_head.shape
    Hkv = k_clean.shape[2]
    per_group = per_head.view(B, Hkv, H // Hkv, S)  # (B, Hkv, H/Hkv, S): the query heads of each group
    return per_group.sum(2).transpose(1, 2)  # (B, S, Hkv)


def atp_qk_fix_reference(model, clean, noise, metric, kinds=KINDS):
    """AtP with the QK fix: q and k nodes get query_fix and key_fix_reference, with G = dL/dpattern from
    the clean backward pass and the model's own attention scale; other kinds keep AtP's estimate. The
    same two forwards and one backward as AtP. Signed, per pair: kind -> (B, L, T, U)."""
    kinds = check_inputs(model, clean, noise, kinds)
    L = model.config.n_layer
    qk = [site(x, l) for l in range(L) for x in ("q", "k")]
    patterns = [f"blocks.{l}.attn.hook_pattern" for l in range(L)]
    node_sites = [site(kind, l) for kind in kinds for l in range(L)]
    noise_acts, clean_acts, grads = atp_runs(model, clean, noise, metric, node_sites + qk + patterns)
    estimates = {}
    for kind in kinds:
        per_layer = []
        for l in range(L):
            q_c, k_c, G = clean_acts[site("q", l)], clean_acts[site("k", l)], grads[patterns[l]]
            scale = model.attention_scale(l)
            if kind == "q":
                per_layer.append(query_fix(q_c, noise_acts[site("q", l)], k_c, G, scale))  # (B, T, H)
            elif kind == "k":
                k_n = noise_acts[site("k", l)]
                per_layer.append(key_fix_reference(q_c, k_c, k_n, G, scale))  # (B, S, Hkv)
            else:
                per_layer.append(delta_dot_grad(noise_acts[site(kind, l)], clean_acts[site(kind, l)],
                                                grads[site(kind, l)]))  # (B, T, U)
        estimates[kind] = torch.stack(per_layer, 1)  # (B, L, T, U)
    return PerPair(estimates)


# --- GradDrop (paper §3 Methods: cancellation). Dropout on the backward pass: stop the gradient through
# one layer's residual write, so a node's direct and indirect effects cannot cancel through that layer.

def grad_drop_units(model, unit="layer"):
    """The units GradDrop drops, each a list of residual-write sites detached together: a layer's whole
    write, attention + MLP (the paper's unit), or with unit="sublayer" each of the two on its own."""
    L = model.config.n_layer
    if unit == "layer":
        return [[f"blocks.{l}.hook_attn_out", f"blocks.{l}.hook_mlp_out"] for l in range(L)]
    if unit == "sublayer":
        return [[f"blocks.{l}.hook_{w}_out"] for l in range(L) for w in ("attn", "mlp")]
    raise ValueError(f"GradDrop unit must be 'layer' (the paper's) or 'sublayer', got {unit!r}")


class GradientDropped(torch.nn.Module):
    """The model with a stop-gradient on some residual writes: every forward value is the same, but no
    gradient flows back through those writes. Its gradient is that of L(M(x | do(out <- out(x))))."""

    def __init__(self, model, writes):
        super().__init__()
        self.model, self.writes, self.config = model, list(writes), model.config

    def attention_scale(self, layer):
        return self.model.attention_scale(layer)

    def forward(self, idx, hooks=None):
        hooks = dict(hooks or {})
        for w in self.writes:
            hooks[w] = stop_gradient(hooks.get(w))
        return self.model(idx, hooks=hooks)


def stop_gradient(inner=None):
    """A hook returning its tensor (after the hook `inner`, if given) detached: same value, no gradient."""
    def hook(t):
        out = inner(t) if inner is not None else None
        return (t if out is None else out).detach()
    return hook


def grad_drop_scores_reference(model, clean, noise, metric, kinds=KINDS, unit="layer",
                               estimates=atp_estimates_reference):
    """GradDrop, literally: for each unit u (a layer, or with unit="sublayer" an attention or MLP write),
    the estimates on the model with u's write detached (GradientDropped), and the per-pair score
        sum_u |I_hat_u(n)| / (number of units - 1);   c_hat_GD(n) is its mean over the pairs.
    A node inside the dropped unit gets no gradient, so one term is always 0: hence L - 1 (2L - 1 for
    sub-layers). `estimates`: AtP, or atp_qk_fix_reference for AtP*. Per-pair scores >= 0, (B, L, T, U)."""
    units = grad_drop_units(model, unit)
    check_grad_drop_depth(len(units))
    total = {}
    for writes in units:
        est = estimates(GradientDropped(model, writes), clean, noise, metric, kinds)
        total = {k: v.abs() + total.get(k, 0) for k, v in est.items()}
    return PerPair({k: v / (len(units) - 1) for k, v in total.items()})


# --- AtP* (paper §3 Methods) = AtP + the QK fix + GradDrop

def atp_star_reference(model, clean, noise, metric, kinds=KINDS, unit="layer"):
    """AtP*: GradDrop scores of the QK-fixed estimates. Per-pair scores >= 0, kind -> (B, L, T, U);
    c_hat(n) = scores[kind].mean(0)."""
    return grad_drop_scores_reference(model, clean, noise, metric, kinds, unit, atp_qk_fix_reference)


# --- rank, verify, and bound what is left (paper §3 Methods: the diagnostic)

def rank_nodes(scores, descending=True):
    """scores: kind -> (L, T, U) or (L, U), one value per node. Returns the node list sorted by score,
    [(kind, layer, pos, unit) or (kind, layer, unit), ...], and the sorted scores (ties: index order)."""
    check_scores(scores)
    nodes = [(k,) + index for k, s in scores.items() for index in itertools.product(*map(range, s.shape))]
    values = torch.cat([s.reshape(-1) for s in scores.values()])  # (N,), in the same order
    order = torch.sort(values, descending=descending, stable=True).indices
    return [nodes[i] for i in order.tolist()], values[order]


def verify_reference(model, clean, noise, metric, ranking, budget):
    """Verification: exact patching of the first `budget` nodes of `ranking`, one forward each. Removes
    false positives; never finds what it is not shown. Returns (nodes, effects (N, B)), c(n) = .mean(1)."""
    nodes = check_nodes(model, clean.shape[1], ranking[:check_count(budget, "budget", 0, len(ranking))])
    return nodes, patch_node_sets_reference(model, clean, noise, metric, [[n] for n in nodes])  # (N, B)


def draw_subsets(n_samples, n_nodes, p, seed=0):
    """The random subsets of Algorithm 1: member (J, N) bool, each entry True with probability p (seeded)."""
    if not 0 < p < 1:
        raise ValueError(f"inclusion probability p must lie strictly between 0 and 1, got {p}")
    check_count(n_samples, "n_samples", 1)
    return torch.rand(n_samples, n_nodes, generator=torch.Generator().manual_seed(seed)) < p


def subset_sampling_reference(model, clean, noise, metric, nodes, p, n_samples, seed=0):
    """Subset sampling (paper Algorithm 1): n_samples random subsets of `nodes`, each node in with
    probability p, each patched jointly in one forward. Returns (member (J, N) bool, y (J,)), where
    y = mean over prompt pairs of metric(clean | do(subset <- noise)) - metric(clean). (Algorithm 1 draws
    one pair per sample; here each subset is patched in all B pairs: the same for a single pair.)"""
    nodes = check_nodes(model, clean.shape[1], nodes)
    member = draw_subsets(n_samples, len(nodes), p, seed)  # (J, N)
    subsets = [[n for n, m in zip(nodes, row) if m] for row in member]
    return member, patch_node_sets_reference(model, clean, noise, metric, subsets).mean(1)  # (J,)


def subset_statistics(member, y):
    """Split the samples per node into 'in the subset' (+) and 'not in it' (-): c_ss = mean+ - mean- (N,),
    its Welch standard error se (N,) and Welch-Satterthwaite degrees of freedom df (N,). Under additivity
    E[y | n in] - E[y | n out] = c(n). member (J, N) bool, y (J,); every node in >= 2 and out >= 2 times."""
    inc = member.double().to(y.device)  # (J, N), where y is (the model's device)
    exc = 1.0 - inc
    y = y.double()[:, None]  # (J, 1)
    n_in, n_out = inc.sum(0), exc.sum(0)  # (N,)
    if n_in.min() < 2 or n_out.min() < 2:
        raise ValueError(f"too few samples for a variance: some node was included {int(n_in.min())} times or "
                         f"left out {int(n_out.min())} times (each needs >= 2); raise n_samples or move p "
                         "toward 0.5")
    mean_in, mean_out = (inc * y).sum(0) / n_in, (exc * y).sum(0) / n_out
    var_in = (inc * (y - mean_in) ** 2).sum(0) / (n_in - 1)  # unbiased sample variances
    var_out = (exc * (y - mean_out) ** 2).sum(0) / (n_out - 1)
    v_in, v_out = var_in / n_in, var_out / n_out
    se = (v_in + v_out).sqrt()
    df = (v_in + v_out) ** 2 / (v_in ** 2 / (n_in - 1) + v_out ** 2 / (n_out - 1))
    df = torch.where(se > 0, df, torch.full_like(df, math.inf))  # y constant within each group: exact
    return mean_in - mean_out, se, df


def welch_bound_reference(c_ss, se, df, alpha=0.05, theta=None):
    """theta* = max_n [|c_ss(n)| + t_{1-alpha, df_n} se_n], the level-(1-alpha) upper confidence bound on the
    largest unverified |c(n)|; the index of the node that sets it; and, if theta is given, the p-value of
    H0 "some node has |c(n)| >= theta": max_n P(T_df_n > (theta - |c_ss(n)|) / se_n), the least favourable
    null being c(n) = theta sign(c_ss(n)) (an intersection-union test: no multiple-testing correction)."""
    check_alpha(alpha)
    c_ss, se, df = c_ss.tolist(), se.tolist(), df.tolist()
    upper = [abs(c) + student_t_quantile(1 - alpha, d) * s for c, s, d in zip(c_ss, se, df)]
    worst = max(range(len(upper)), key=upper.__getitem__)  # the first of the largest
    p_value = None
    if theta is not None:  # se = 0: c_ss is exact, and H0 stands iff |c_ss| >= theta
        p_value = max(student_t_sf((theta - abs(c)) / s, d) if s > 0 else float(abs(c) >= theta)
                      for c, s, d in zip(c_ss, se, df))
    return upper[worst], worst, p_value


def false_negative_bound_reference(model, clean, noise, metric, ranking, K, p=0.1, n_samples=200, alpha=0.05,
                                   theta=None, seed=0):
    """The diagnostic: verify the top K nodes of `ranking` (which should list every node), run subset
    sampling on the unverified rest R, and bound max_{n in R} |c(n)| by a one-sided Welch test per node.
    Returns a dict: verified, verified_effects (c(n) of the top K), unverified (R), theta_star, worst_node,
    p_value (for theta), and per-node c_ss, se, df on R. Assumes approximate additivity of node effects, as
    the paper does; interactions bias c_ss by O(p)."""
    check_alpha(alpha)
    check_count(K, "K", 0, len(check_ranking(ranking)))
    verified, effects = verify_reference(model, clean, noise, metric, ranking, K)
    rest = list(ranking[K:])
    if not rest:  # everything verified: nothing can hide
        return bound_result(verified, effects, rest, alpha, theta)
    member, y = subset_sampling_reference(model, clean, noise, metric, rest, p, n_samples, seed)
    c_ss, se, df = subset_statistics(member, y)
    bound = welch_bound_reference(c_ss, se, df, alpha, theta)  # (theta*, index of the worst node, p-value)
    return bound_result(verified, effects, rest, alpha, theta, (c_ss, se, df), bound)


# ==================================================================================================
# Part II: the same, fast. Each function here is tested equal to its Part I twin (float64).
# ==================================================================================================

# --- exact patching: recompute only what a patch can change, many nodes per forward

def activation_patching(model, clean, noise, metric, kinds=KINDS, positions="each", chunk_size=256,
                        progress=None):
    """activation_patching_reference, fast: kind -> (B, L, T, U) signed effects I(n), c(n) = .mean(0);
    positions="all": (B, L, U), each unit patched at every position at once. A node the noise prompt does
    not move (in any pair) has I(n) = 0 exactly and is skipped. The others share forwards of at most
    `chunk_size` rows, each resumed at the node's layer and position (resume_patched)."""
    kinds = check_inputs(model, clean, noise, kinds, positions)
    check_count(chunk_size, "chunk_size", 1)
    B, T, L = clean.shape[0], clean.shape[1], model.config.n_layer
    per_chunk = max(1, chunk_size // B)  # nodes per forward; each node is B rows
    with eval_mode(model), torch.no_grad():
        clean_logits, clean_acts, noise_acts, base = clean_and_noise_runs(model, clean, noise, metric, kinds)
        effects = {k: base.new_zeros((B, L) + ((T,) if positions == "each" else ()) + (n_units(model, k),))
                   for k in kinds}
        jobs = []  # (kind, layer, position or None for every position, units): nodes that share a forward
        for k in kinds:
            for l in range(L):
                changed = moved(clean_acts, noise_acts, k, l)  # (T, U)
                for pos in (range(T) if positions == "each" else [None]):
                    units = (changed.any(0) if pos is None else changed[pos]).nonzero()[:, 0].tolist()
                    jobs += [(k, l, pos, units[i:i + per_chunk]) for i in range(0, len(units), per_chunk)]
        for k, l, pos, units in _progress(jobs, progress, "activation patching"):
            start = resume_position(model, 0 if pos is None else pos)
            hooks = {site(k, l): one_node_per_copy(noise_acts[site(k, l)], pos, units, start, B)}
            logits = resume_patched(model, clean, clean_acts, clean_logits, l, start, len(units), hooks,
                                    metric)  # (n*B, T, V)
            for i, unit in enumerate(units):
                copy_i = logits[i * B:(i + 1) * B]  # (B, T, V): the clean prompts with node i patched
                value = check_metric_values(metric(copy_i), B, f"a patched run ({k}, layer {l})")
                if pos is None:
                    effects[k][:, l, unit] = value - base
                else:
                    effects[k][:, l, pos, unit] = value - base
    return PerPair(effects)


def one_node_per_copy(noise_act, pos, units, start, B):
    """The hook for n = len(units) stacked copies of the B clean prompts (copy i: rows i*B..i*B+B-1) that
    gives copy i the noise value of unit units[i] at position pos (pos None: at every position). The hook
    sees positions start..T-1 only, as a resumed forward does."""
    new = as_units(noise_act)[:, start:]  # (B, T', U, E), T' = T - start
    copy, units = torch.arange(len(units)), torch.tensor(units, dtype=torch.long)  # (n,), (n,)

    def patch(t):  # t: (n*B, T', U, E), or (n*B, T', M) for neurons
        copies = as_units(t).clone().view((len(units), B) + new.shape[1:])  # (n, B, T', U, E)
        if pos is None:  # unit units[i] of copy i, at every position
            copies[copy, :, :, units] = new[:, :, units].permute(2, 0, 1, 3)  # (B, T', n, E) -> (n, B, T', E)
        else:
            copies[copy, :, pos - start, units] = new[:, pos - start, units].transpose(0, 1)  # (n, B, E)
        return copies.view(t.shape)
    return patch


def clean_and_noise_runs(model, clean, noise, metric, kinds):
    """The two cached runs a patching sweep starts from: node sites on both; on the clean run also what
    resuming needs (every layer's resid_pre and resume sites); the clean metric (B,), checked."""
    L = model.config.n_layer
    sites = [site(k, l) for k in kinds for l in range(L)]
    resume = [f"blocks.{l}.{x}" for l in range(L) for x in ("hook_resid_pre",) + resume_sites(model)]
    _, noise_acts = run_with_cache(model, noise, sites)
    clean_logits, clean_acts = run_with_cache(model, clean, sites + resume)
    base = check_metric(metric, clean_logits, clean.shape[0])
    return clean_logits, clean_acts, noise_acts, base


def moved(clean_acts, noise_acts, kind, layer):
    """(T, U) bool: does the noise prompt change this node in any prompt pair?"""
    delta = as_units(noise_acts[site(kind, layer)]) - as_units(clean_acts[site(kind, layer)])  # (B, T, U, E)
    return (delta != 0).any(-1).any(0)


def resume_sites(model):
    return tuple(getattr(model, "resume_sites", ("attn.hook_k", "attn.hook_v")))


def resume_position(model, pos):
    """Where a patched run can start: at the patch's position with forward_from, else at 0 (full forward)."""
    return pos if hasattr(model, "forward_from") else 0


def resume_patched(model, clean, clean_acts, clean_logits, layer, start, n, hooks, metric):
    """Logits of n patched copies of the B clean prompts (rows i*B..i*B+B-1: copy i), when every patch
    sits at a layer >= `layer` and a position >= `start`. Nothing before that can change, so with
    forward_from only layers layer..L-1 run, on positions start..T-1, from the cached clean residual stream
    and the cached clean keys and values of earlier positions (attention is causal). Hooks see positions
    start..T-1. Returns (n*B, T, V), or (n*B, 1, V) for a metric that reads the last position only."""
    last_only = reads_last_position_only(metric)
    if not hasattr(model, "forward_from"):  # the protocol's plain call: a full forward, same numbers
        logits = model(clean.repeat(n, 1), hooks=hooks)  # (n*B, T, V)
        return logits[:, -1:] if last_only else logits
    repeat = lambda t: t.repeat((n,) + (1,) * (t.dim() - 1))  # (B, ...) -> (n*B, ...)
    resid = repeat(clean_acts[f"blocks.{layer}.hook_resid_pre"][:, start:])  # (n*B, T - start, D)
    past = None
    if start > 0:  # per resumed layer, the clean values of the resume sites at positions < start
        past = [tuple(repeat(clean_acts[f"blocks.{l}.{x}"][:, :start]) for x in resume_sites(model))
                for l in range(layer, model.config.n_layer)]
    suffix = model.forward_from(layer, resid, hooks, past, last_only)  # (n*B, T - start, V) or (n*B, 1, V)
    if last_only:
        return suffix
    return torch.cat([repeat(clean_logits[:, :start]), suffix], dim=1)  # (n*B, T, V)


def patch_node_sets(model, clean, noise, metric, masks, chunk_size=256, progress=None):
    """patch_node_sets_reference, fast, for J sets given as masks: kind -> bool (J, L, T, U) (or (J, L, U)
    for whole-position nodes; see node_masks). Returns (J, B). Sets whose earliest patch sits at the same
    layer and position share resumed forwards; a set that moves nothing has effect 0 exactly."""
    check_count(chunk_size, "chunk_size", 1)
    kinds = check_inputs(model, clean, noise, tuple(masks))
    B, T, L = clean.shape[0], clean.shape[1], model.config.n_layer
    J = next(iter(masks.values())).shape[0]
    with eval_mode(model), torch.no_grad():
        clean_logits, clean_acts, noise_acts, base = clean_and_noise_runs(model, clean, noise, metric, kinds)
        patched = {}  # (kind, layer) -> (J, T, U): the nodes each set patches that the noise prompt moves
        for k, m in masks.items():
            for l in range(L):
                m_l = m[:, l].to(clean.device)  # (J, T, U), or (J, U): the unit at every position
                if m_l.dim() == 2:
                    m_l = m_l[:, None, :].expand(J, T, m_l.shape[-1])  # (J, T, U)
                m_l = m_l & moved(clean_acts, noise_acts, k, l)[None]  # (J, T, U) & (1, T, U)
                if m_l.any():
                    patched[k, l] = m_l
        first_layer, first_pos = earliest_patch(patched, J, L, T)
        groups = {}  # (first layer, first position) -> sets starting there; a set that moves nothing stays 0
        for j in range(J):
            if first_layer[j] < L:
                groups.setdefault((first_layer[j], first_pos[j]), []).append(j)
        per_chunk = max(1, chunk_size // B)
        chunks = [(key, ids[c:c + per_chunk]) for key, ids in sorted(groups.items())
                  for c in range(0, len(ids), per_chunk)]
        out = torch.zeros(J, B, dtype=base.dtype, device=base.device)
        for (layer, pos), ids in _progress(chunks, progress, "patching node sets"):
            start = resume_position(model, pos)
            hooks = {site(k, l): masked_patch(m_l[ids], noise_acts[site(k, l)], start, B)
                     for (k, l), m_l in patched.items() if l >= layer and m_l[ids].any()}
            logits = resume_patched(model, clean, clean_acts, clean_logits, layer, start, len(ids), hooks,
                                    metric)  # (n*B, T, V)
            for i, j in enumerate(ids):
                copy_i = logits[i * B:(i + 1) * B]  # (B, T, V): the clean prompts with set j patched
                out[j] = check_metric_values(metric(copy_i), B, "a jointly patched run") - base
    return out


def earliest_patch(patched, J, L, T):
    """Per set j, the lowest layer and the lowest position among the nodes it patches (L and T if none):
    nothing before them can change, so the set's resumed forward starts there. Two lists of J ints."""
    first_layer, first_pos = [L] * J, [T] * J
    for (k, l), m_l in patched.items():
        at = m_l.any(-1)  # (J, T): set j patches this site at position t
        for j in at.any(-1).nonzero()[:, 0].tolist():
            first_layer[j] = min(first_layer[j], l)
            first_pos[j] = min(first_pos[j], int(at[j].nonzero()[0, 0]))
    return first_layer, first_pos


def masked_patch(mask, noise_act, start, B):
    """The hook for n stacked copies of the B clean prompts (copy i: rows i*B..i*B+B-1) that puts the
    noise value wherever mask[i] (T, U) is True, in copy i. The hook sees positions start..T-1 only."""
    new = as_units(noise_act)[None, :, start:]  # (1, B, T', U, E): the same for every copy
    where = mask[:, None, start:, :, None]  # (n, 1, T', U, 1): the same for every pair and feature

    def patch(t):  # t: (n*B, T', U, E), or (n*B, T', M) for neurons; on its layer's device
        copies = as_units(t).view((mask.shape[0], B) + new.shape[2:])  # (n, B, T', U, E)
        return torch.where(where.to(t.device), new.to(t.device), copies).reshape(t.shape)
    return patch


def node_masks(model, T, nodes, member):
    """Sets of nodes as patch masks: member (J, N) bool says which of `nodes` are in set j.
    Returns kind -> bool (J, L, T, U), or (J, L, U) when the nodes are whole-position (kind, layer, unit)."""
    J, out = member.shape[0], {}
    for i, node in enumerate(nodes):
        kind, index = node[0], node[1:]  # index: (layer, pos, unit) or (layer, unit)
        if kind not in out:
            shape = (J, model.config.n_layer) + ((T,) if len(index) == 3 else ()) + (n_units(model, kind),)
            out[kind] = torch.zeros(shape, dtype=torch.bool)
        out[kind][(slice(None),) + index] = member[:, i]
    return out


def patch_nodes(model, clean, noise, metric, nodes):
    """metric(clean | do(nodes <- their noise values)) - metric(clean), (B,): one joint patch of the
    nodes (one node: its exact effect I(n)). patch_node_sets_reference with one set, fast."""
    nodes = check_nodes(model, clean.shape[1], nodes)
    if not nodes:
        raise ValueError("patch_nodes needs at least one node")
    masks = node_masks(model, clean.shape[1], nodes, torch.ones(1, len(nodes), dtype=torch.bool))
    return patch_node_sets(model, clean, noise, metric, masks)[0]


def verify(model, clean, noise, metric, ranking, budget, chunk_size=256, progress=None):
    """verify_reference, fast: (nodes, effects (N, B)) for the first `budget` nodes of `ranking`."""
    budget = check_count(budget, "budget", 0, len(check_ranking(ranking)))
    nodes = check_nodes(model, clean.shape[1], ranking[:budget])
    if not nodes:
        return nodes, torch.zeros(0, clean.shape[0])
    masks = node_masks(model, clean.shape[1], nodes, torch.eye(len(nodes), dtype=torch.bool))  # set i: node i
    return nodes, patch_node_sets(model, clean, noise, metric, masks, chunk_size, progress)


def subset_sampling(model, clean, noise, metric, nodes, p, n_samples, seed=0, chunk_size=256, progress=None):
    """subset_sampling_reference, fast: (member (J, N) bool, y (J,)), all subsets through patch_node_sets."""
    nodes = check_nodes(model, clean.shape[1], nodes)
    member = draw_subsets(n_samples, len(nodes), p, seed)  # (J, N)
    masks = node_masks(model, clean.shape[1], nodes, member)
    return member, patch_node_sets(model, clean, noise, metric, masks, chunk_size, progress).mean(1)


@contextmanager
def eval_mode(model):
    """Run in eval mode (no dropout anywhere), then restore the caller's mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _progress(items, progress, desc):
    """A tqdm bar on long sweeps (progress=None: only when there are many steps)."""
    if not (progress if progress is not None else len(items) > 50):
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, leave=False)


# --- AtP, the QK fix and GradDrop from ONE clean forward graph

def atp_estimates(model, clean, noise, metric, kinds=KINDS, qk_fix=False, positions="each"):
    """atp_estimates_reference (AtP) or, with qk_fix=True, atp_qk_fix_reference, fast: signed I_hat(n),
    kind -> (B, L, T, U). positions="all": (B, L, U), a unit at every position at once (AtP: by linearity
    the sum over positions; the QK fix moves every query, or every key, of the head at once)."""
    return attribution(model, clean, noise, metric, kinds, qk_fix, positions, unit=None)


def grad_drop_scores(model, clean, noise, metric, kinds=KINDS, qk_fix=False, positions="each", unit="layer"):
    """grad_drop_scores_reference, fast: sum_u |I_hat_u(n)| / (units - 1) per pair, kind -> (B, L, T, U)."""
    return attribution(model, clean, noise, metric, kinds, qk_fix, positions, unit)


def atp_star(model, clean, noise, metric, kinds=KINDS, positions="each", unit="layer"):
    """atp_star_reference, fast: AtP + QK fix + GradDrop. Per-pair scores >= 0, kind -> (B, L, T, U)."""
    return grad_drop_scores(model, clean, noise, metric, kinds, True, positions, unit)


def attribution_patching(model, clean, noise, metric, kinds=KINDS, qk_fix=False, grad_drop=False,
                         positions="each"):
    """All first-order methods behind one call: grad_drop=False gives atp_estimates (signed), grad_drop=True
    or "layer" / "sublayer" gives grad_drop_scores (>= 0). Prefer the two named functions."""
    if grad_drop is False:
        return atp_estimates(model, clean, noise, metric, kinds, qk_fix, positions)
    return grad_drop_scores(model, clean, noise, metric, kinds, qk_fix, positions,
                            "layer" if grad_drop is True else grad_drop)


def attribution(model, clean, noise, metric, kinds, qk_fix, positions, unit):
    """AtP (unit None) or GradDrop (unit "layer" / "sublayer"), optionally QK-fixed, from one noise forward
    and one clean forward graph: the GradDrop terms backpropagate only what dropping a unit changes."""
    kinds = check_inputs(model, clean, noise, kinds, positions)
    if torch.is_inference_mode_enabled():
        raise RuntimeError("AtP needs gradients: call it outside torch.inference_mode()")
    L = model.config.n_layer
    units = grad_drop_units(model, unit) if unit else []
    if unit:
        check_grad_drop_depth(len(units))
    use_qk = qk_fix and any(k in ("q", "k") for k in kinds)
    # per layer, the sites whose gradient the estimates need: the nodes', and dL/dpattern for the QK fix
    needs = {l: [site(k, l) for k in kinds] + ([f"blocks.{l}.attn.hook_pattern"] if use_qk else [])
             for l in range(L)}
    nodes = [site(k, l) for k in kinds for l in range(L)]
    qk = [site(x, l) for l in range(L) for x in ("q", "k")] if use_qk else []
    patterns = [f"blocks.{l}.attn.hook_pattern" for l in range(L)] if use_qk else []
    resid_post = [f"blocks.{l}.hook_resid_post" for l in range(L)] if unit == "layer" else []
    resid_pre = [f"blocks.{l}.hook_resid_pre" for l in range(L)] if unit == "layer" else []
    writes = [w for u in units for w in u] if unit == "sublayer" else []
    with eval_mode(model):
        with torch.no_grad():  # forward 1: the noise run
            _, noise_acts = run_with_cache(model, noise, nodes + qk)
        with torch.enable_grad():  # forward 2 and the backward: the clean run, its graph from resid_pre 0
            start = {"blocks.0.hook_resid_pre": lambda t: t.detach().requires_grad_(True)}
            cached = nodes + qk + patterns + resid_pre + resid_post + writes
            logits, clean_acts = run_with_cache(model, clean, cached, start)
            values = check_metric(metric, logits, clean.shape[0])
            wrt = nodes + patterns + resid_post + writes
            grads = dict(zip(wrt, torch.autograd.grad(values.sum(), [clean_acts[n] for n in wrt],
                                                      retain_graph=bool(unit), allow_unused=True)))
            estimate = Estimator(model, clean_acts, noise_acts, kinds, use_qk, positions)
            plain = estimate(grads, layers=range(L))  # kind -> (B, L, T, U), signed: AtP (+ QK fix)
            if not unit:
                return PerPair(plain)
            drop = grad_drop_layers if unit == "layer" else grad_drop_sublayers
            total = drop(estimate, plain, grads, clean_acts, needs, L)
            return PerPair({k: v / (len(units) - 1) for k, v in total.items()})


def grad_drop_layers(estimate, plain, grads, clean_acts, needs, L):
    """sum_l |I_hat_l(n)| over the dropped layers l, from the one clean graph. For a node in layer m:
      l < m: its gradient is unchanged, the term is |I_hat(n)|      (m such terms)
      l = m: no gradient reaches inside a dropped layer: 0
      l > m: the gradient at resid_pre_l is that of resid_post_l (skip path only): backprop from there."""
    total = {k: torch.zeros_like(v) for k, v in plain.items()}  # (B, L, ...)
    for k, v in plain.items():
        for m in range(L):
            total[k][:, m] = v[:, m].abs() * m
    for l in range(1, L):
        below = [name for m in range(l) for name in needs[m]]  # the sites of layers < l
        dropped = torch.autograd.grad(clean_acts[f"blocks.{l}.hook_resid_pre"],
                                      [clean_acts[n] for n in below],
                                      grad_outputs=grads[f"blocks.{l}.hook_resid_post"], retain_graph=True,
                                      allow_unused=True)
        est = estimate(dict(zip(below, dropped)), layers=range(l))
        for k in total:
            total[k][:, :l] += est[k][:, :l].abs()
    return total


def grad_drop_sublayers(estimate, plain, grads, clean_acts, needs, L):
    """sum_u |I_hat_u(n)| over the 2L sub-layer writes u, from the one clean graph: the gradient with write
    w detached is the full gradient minus the part that flows through w, g - (dw/dn)^T dL/dw. A node inside
    w gets 0; a node in a later layer keeps |I_hat(n)|."""
    total = {k: torch.zeros_like(v) for k, v in plain.items()}
    for l in range(L):
        upto = [name for m in range(l + 1) for name in needs[m]]  # the sites of layers <= l
        for w, inside in (("attn", ("q", "k", "v", "z")), ("mlp", ("neuron",))):
            write = f"blocks.{l}.hook_{w}_out"
            through = torch.autograd.grad(clean_acts[write], [clean_acts[n] for n in upto],
                                          grad_outputs=grads[write], retain_graph=True, allow_unused=True)
            kept = {n: grads[n] - g if g is not None and grads[n] is not None else grads[n]
                    for n, g in zip(upto, through)}
            est = estimate(kept, layers=range(l + 1))
            for k in total:
                est[k][:, l + 1:] = plain[k][:, l + 1:]  # nodes after the write: unchanged gradient
                if k in inside:
                    est[k][:, l] = 0.0  # the node's own write: no gradient reaches it
                total[k] += est[k].abs()
    return total


class Estimator:
    """Per-node estimates from one backward pass's gradients, for the layers asked for: AtP's Delta . g,
    or the QK fix for q and k. Holds detached clean and noise activations, reused by every GradDrop term."""

    def __init__(self, model, clean_acts, noise_acts, kinds, qk_fix, positions):
        self.model, self.kinds, self.qk_fix, self.positions = model, kinds, qk_fix, positions
        self.clean = {name: t.detach() for name, t in clean_acts.items()}  # estimates are plain numbers
        self.noise = {name: t.detach() for name, t in noise_acts.items()}
        self.dtype = torch.promote_types(self.clean[site(kinds[0], 0)].dtype, torch.float32)  # fp32 or better

    def __call__(self, grads, layers):
        first = self.clean[site(self.kinds[0], 0)]
        B, T, L = first.shape[0], first.shape[1], self.model.config.n_layer
        out = {k: torch.zeros((B, L) + ((T,) if self.positions == "each" else ()) + (n_units(self.model, k),),
                              dtype=self.dtype, device=first.device) for k in self.kinds}
        for k in self.kinds:
            for l in layers:
                if self.qk_fix and k in ("q", "k"):
                    G = grads.get(f"blocks.{l}.attn.hook_pattern")
                    if G is not None:
                        out[k][:, l] = self.qk_estimate(k, l, G.to(self.dtype))
                elif grads.get(site(k, l)) is not None:  # None: no path from this node to the metric
                    act_clean, act_noise = (as_units(acts[site(k, l)]).to(self.dtype)
                                            for acts in (self.clean, self.noise))  # (B, T, U, E)
                    grad = as_units(grads[site(k, l)]).to(self.dtype)
                    est = ((act_noise - act_clean) * grad).sum(-1)  # (B, T, U): Delta n . dL/dn
                    out[k][:, l] = est.sum(1) if self.positions == "all" else est
        return out

    def qk_estimate(self, kind, layer, G):
        p, scale = f"blocks.{layer}.attn.", self.model.attention_scale(layer)
        q, k = (self.clean[p + x].to(self.dtype) for x in ("hook_q", "hook_k"))  # (B,T,H,Dh), (B,S,Hkv,Dh)
        if kind == "q":
            est = query_fix(q, self.noise[p + "hook_q"].to(self.dtype), k, G, scale)  # (B, T, H)
            return est.sum(1) if self.positions == "all" else est
        k_noise = self.noise[p + "hook_k"].to(self.dtype)
        if self.positions == "all":
            return key_fix_all_positions(q, k, k_noise, G, scale)
        return key_fix(q, k, k_noise, G, scale)


def key_fix(q_clean, k_clean, k_noise, G, scale):
    """key_fix_reference in O(T^2) per head. Moving only logit s of row t by d_ts = q_t . (k_s(noise) -
    k_s(clean)) * scale sets that key's probability to a~_ts = sigmoid(logit(a_ts) + d_ts) and rescales the
    rest of the row by (1 - a~_ts) / (1 - a_ts), so
        dI_t(k_s) = (a~_ts - a_ts) * (G_ts - G_bar_t,-s),  G_bar_t,-s = sum_{s' != s} a_ts' G_ts' / (1 - a_ts)
    Computed in log space, without clamping: a key with a = 1e-20 can still become dominant. (B, S, Hkv)."""
    B, H, Hkv = q_clean.shape[0], q_clean.shape[2], k_clean.shape[2]
    scores = causal_scores(q_clean, k_clean, scale)  # (B, H, T, S)
    masked = torch.isinf(scores)  # keys a query cannot see
    k_delta = per_query_head(k_noise - k_clean, H)  # (B, S, H, Dh)
    d = (q_clean.transpose(1, 2) @ k_delta.permute(0, 2, 3, 1)) * scale  # (B, H, T, Dh) @ (B, H, Dh, S)
    log_a = torch.log_softmax(scores, dim=-1)  # from the scores, so no probability underflows
    a = log_a.exp()
    # logit(a) = log a - log(1 - a). Only the largest entry of a row can exceed 1/2; for it, log(1 - a) is
    # the log-sum-exp of the OTHER scores, taken directly (no cancellation as a -> 1).
    is_top = torch.zeros_like(masked).scatter_(-1, scores.argmax(-1, keepdim=True), True)
    others = scores.masked_fill(is_top, float("-inf"))  # the row without its top key
    lse_others = torch.logsumexp(others, dim=-1, keepdim=True)  # (B, H, T, 1); -inf if one key is visible
    only_key = torch.isinf(lse_others)  # a row that sees a single key: moving its logit changes nothing
    logit_a = torch.where(is_top, scores - lse_others, log_a - torch.log1p(-a))
    a_new = torch.sigmoid(logit_a + d)  # the patched key's new probability
    G_bar = ((a * G).sum(-1, keepdim=True) - a * G) / (1 - a)  # valid where a <= 1/2
    G_bar_top = (torch.softmax(others.masked_fill(only_key, 0.0), dim=-1) * G).sum(-1, keepdim=True)
    G_bar = torch.where(is_top, G_bar_top, G_bar)
    # d = 0 leaves logit s where it was: exactly 0 (sigmoid(logit(a)) is a only to rounding).
    per_query = torch.where(d == 0, 0.0, a_new - a) * (G - G_bar)  # (B, H, T, S): dI_t(k_s)
    per_query = per_query.masked_fill(masked | only_key, 0.0)
    per_head = per_query.sum(2)  # (B, H, S): sum over the queries t >= s
    return per_head.view(B, Hkv, H // Hkv, -1).sum(2).transpose(1, 2)  # (B, S, Hkv): sum over each group


def key_fix_all_positions(q_clean, k_clean, k_noise, G, scale):
    """The QK fix of a key-value head's keys at every position at once: every logit of every row moves,
    so recompute each softmax with all keys noised, sum_t sum_s (a~_ts - a_ts) G_ts. Returns (B, Hkv)."""
    B, H, Hkv = q_clean.shape[0], q_clean.shape[2], k_clean.shape[2]
    a = torch.softmax(causal_scores(q_clean, k_clean, scale), -1)  # (B, H, T, S)
    a_new = torch.softmax(causal_scores(q_clean, k_noise, scale), -1)
    per_head = ((a_new - a) * G).sum((-1, -2))  # (B, H)
    return per_head.view(B, Hkv, H // Hkv).sum(-1)  # (B, Hkv)


def welch_bound(c_ss, se, df, alpha=0.05, theta=None):
    """welch_bound_reference, fast for many nodes: Student's t quantile falls as df grows, between the
    normal's (df = inf) and the one at the smallest df. Bracket every node's bound with those two, and
    compute exact quantiles (and p-values) only where a bracket reaches the best."""
    check_alpha(alpha)
    q_low, q_high = student_t_quantile(1 - alpha, math.inf), student_t_quantile(1 - alpha, df.min().item())
    low, high = c_ss.abs() + q_low * se, c_ss.abs() + q_high * se  # (N,)
    candidates = (high >= low.max()).nonzero()[:, 0].tolist()
    upper = {i: abs(c_ss[i].item()) + student_t_quantile(1 - alpha, df[i].item()) * se[i].item()
             for i in candidates}
    worst = max(upper, key=upper.get)
    p_value = None
    if theta is not None:
        t = (theta - c_ss.abs()) / se  # (N,); large t: |c(n)| is clearly below theta
        normal = 0.5 * torch.erfc(t / math.sqrt(2.0))  # the same bracketing for P(T_df > t)
        heavy = torch.tensor([student_t_sf(ti, df.min().item()) for ti in t.tolist()], dtype=t.dtype)
        low_p, high_p = torch.minimum(normal, heavy), torch.maximum(normal, heavy)
        exact_se0 = (c_ss.abs() >= theta).to(t.dtype)  # se = 0: c_ss is exact, H0 stands iff |c_ss| >= theta
        low_p, high_p = torch.where(se > 0, low_p, exact_se0), torch.where(se > 0, high_p, exact_se0)
        candidates = (high_p >= low_p.max()).nonzero()[:, 0].tolist()
        p_value = max(student_t_sf(t[i].item(), df[i].item()) if se[i] > 0 else exact_se0[i].item()
                      for i in candidates)
    return upper[worst], worst, p_value


def false_negative_bound(model, clean, noise, metric, ranking, K, p=0.1, n_samples=200, alpha=0.05,
                         theta=None, seed=0, chunk_size=256, progress=None):
    """false_negative_bound_reference, fast: verify, subset_sampling and welch_bound for their twins."""
    check_alpha(alpha)
    check_count(K, "K", 0, len(check_ranking(ranking)))
    verified, effects = verify(model, clean, noise, metric, ranking, K, chunk_size, progress)
    rest = list(ranking[K:])
    if not rest:  # everything verified: nothing can hide
        return bound_result(verified, effects, rest, alpha, theta)
    member, y = subset_sampling(model, clean, noise, metric, rest, p, n_samples, seed, chunk_size, progress)
    c_ss, se, df = subset_statistics(member, y)
    bound = welch_bound(c_ss, se, df, alpha, theta)  # (theta*, index of the worst node, p-value)
    return bound_result(verified, effects, rest, alpha, theta, (c_ss, se, df), bound)


# ==================================================================================================
# Part III: helpers for results, input checks (a clear error instead of a silently wrong number),
# Student's t
# ==================================================================================================

# --- results: labels, verification counts, the diagnostic's dict

def node_label(node):
    """('k', 2, 7, 3) -> 'k L2 H3 @7'; ('neuron', 1, 4, 99) -> 'neuron L1 N99 @4'. For k and v the head is a
    key-value head (the same as a query head without grouped-query attention)."""
    kind, layer, *rest = node
    where = f" @{rest[0]}" if len(rest) == 2 else ""
    return f"{kind} L{layer} {'N' if kind == 'neuron' else 'H'}{rest[-1]}{where}"


def verifications_needed(ranking, true_top):
    """How many exact patches, verifying in `ranking` order, until every node of true_top is verified."""
    position = {node: i for i, node in enumerate(ranking)}
    return max(position[n] for n in true_top) + 1


def bound_result(verified, effects, rest, alpha, theta, statistics=None, bound=None):
    """The dict the diagnostic returns. statistics: (c_ss, se, df) on the unverified nodes; bound: the Welch
    bound's (theta*, index of the worst node, p-value). None when nothing is left: then theta* = 0 (p = 0)."""
    result = dict(verified=verified, verified_effects=effects.mean(1), unverified=rest, theta=theta,
                  alpha=alpha)
    if bound is None:  # everything verified: nothing can hide
        return dict(result, theta_star=0.0, worst_node=None, p_value=None if theta is None else 0.0,
                    c_ss=torch.zeros(0), se=torch.zeros(0), df=torch.zeros(0))
    (c_ss, se, df), (theta_star, worst, p_value) = statistics, bound
    return dict(result, theta_star=theta_star, worst_node=rest[worst], p_value=p_value, c_ss=c_ss, se=se,
                df=df)


# --- input checks

def check_inputs(model, clean, noise, kinds, positions="each"):
    """Check the model protocol, the token tensors and the node kinds; returns kinds as a tuple."""
    cfg = getattr(model, "config", None)
    missing = [f"config.{f}" for f in ("n_layer", "n_head", "d_head", "d_mlp", "vocab_size", "n_positions")
               if not isinstance(getattr(cfg, f, None), numbers.Integral)]
    missing += [] if callable(getattr(model, "attention_scale", None)) else ["attention_scale"]
    if missing:
        raise TypeError(f"the model lacks {', '.join(missing)}: see 'The model protocol' at the top of "
                        "atp_minimal.py")
    if cfg.n_head % n_units(model, "k"):
        raise ValueError(f"n_head = {cfg.n_head} is not a multiple of n_kv_head = {n_units(model, 'k')}")
    device = next(model.parameters()).device
    for name, x in (("clean", clean), ("noise", noise)):
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"{name} must be a tensor of token ids, shape (B, T); got {got}")
        if x.device != device:
            raise ValueError(f"{name} tokens are on {x.device} but the model is on {device}; "
                             f"move them with .to({str(device)!r})")
    if clean.shape != noise.shape:
        raise ValueError(f"clean and noise must have the same shape (B, T); got {tuple(clean.shape)} and "
                         f"{tuple(noise.shape)}")
    if clean.shape[0] == 0 or not 1 <= clean.shape[1] <= cfg.n_positions:
        raise ValueError(f"need at least one prompt pair and 1 <= T <= n_positions = {cfg.n_positions}; "
                         f"got (B, T) = {tuple(clean.shape)}")
    for name, x in (("clean", clean), ("noise", noise)):
        if x.min() < 0 or x.max() >= cfg.vocab_size:
            raise ValueError(f"{name} token ids must lie in [0, {cfg.vocab_size}); got min {int(x.min())}, "
                             f"max {int(x.max())}")
    kinds = (kinds,) if isinstance(kinds, str) else kinds  # one kind by its name: kinds="neuron"
    unknown = [k for k in kinds if k not in KINDS]
    kinds = tuple(k for k in KINDS if k in kinds) if isinstance(kinds, (set, frozenset)) else tuple(kinds)
    if unknown or not kinds or len(set(kinds)) != len(kinds):
        raise ValueError(f"kinds must name each node kind once, from {KINDS}; got {kinds}"
                         + (f", unknown: {unknown}" if unknown else ""))
    if positions not in ("each", "all"):
        raise ValueError(f"positions must be 'each' (a node per position) or 'all', got {positions!r}")
    return kinds


def reads_last_position_only(metric):
    """Does the metric read the last position's logits alone? Part I's metrics at position -1 say so
    (metric.position); a metric of your own can set metric.position = -1 (or last_position_only = True)."""
    return getattr(metric, "position", None) == -1 or getattr(metric, "last_position_only", False) is True


def check_metric(metric, logits, B):
    """The metric on the clean run, checked: (B,) finite floats; row b depends on row b of the logits
    alone (moving the first or the last row moves no other value); if it says it reads the last position
    alone, it does."""
    values = check_metric_values(metric(logits), B, "the clean run")
    with torch.no_grad():
        V = logits.shape[-1]
        ramp = torch.linspace(0.5, 1.0, V, dtype=logits.dtype, device=logits.device) ** 2  # (V,), none 0
        far = lambda moved_values: ((moved_values - values).abs() > 1e-5 * (1.0 + values.abs()))  # (B,)
        for row in sorted({0, B - 1}) if B > 1 else []:
            moved = logits.clone()
            moved[row] += ramp
            others = far(metric(moved))
            others[row] = False
            if others.any():
                raise ValueError(f"the metric is not row-wise: changing prompt pair {row}'s logits changed "
                                 "other pairs' values (e.g. x - x.mean()); value b must depend on row b "
                                 "alone")
        if reads_last_position_only(metric) and logits.shape[1] > 1:
            if far(metric(torch.cat([logits[:, :-1] + ramp, logits[:, -1:]], 1))).any():
                raise ValueError("the metric says it reads the last position only (position = -1 or "
                                 "last_position_only = True) but reads other positions; read logits[:, -1] "
                                 "only")
    return values


def check_metric_values(values, B, what):
    if not isinstance(values, torch.Tensor) or values.shape != (B,):
        got = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(f"metric must return one value per prompt pair, shape ({B},); got {got} on {what}")
    if not values.is_floating_point():
        raise TypeError(f"metric must return floating-point values (AtP differentiates it); got "
                        f"{values.dtype}")
    if not torch.isfinite(values).all():
        raise ValueError(f"metric returned non-finite values on {what}: {values.tolist()}")
    return values


def check_grad_drop_depth(number_of_units):
    if number_of_units < 2:
        raise ValueError("GradDrop divides by the number of dropped units - 1 and needs a model with at "
                         "least 2 layers")


def check_count(value, name, low, high=None):
    """An integer argument in [low, high] (high: the number of nodes given, or None for no limit)."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        limit = f"at least {low}" if high is None else f"between {low} and the number of nodes given ({high})"
        raise ValueError(f"{name} must be {limit}; got {value}")
    return int(value)


def check_alpha(alpha):
    if not 0 < alpha < 0.5:
        raise ValueError(f"alpha must lie strictly between 0 and 0.5 (a one-sided upper bound), got {alpha}")


def check_scores(scores):
    average = "average over the pairs first, e.g. {k: s.mean(0) for k, s in scores.items()}"
    if isinstance(scores, PerPair) or not isinstance(scores, dict) or not scores:
        per_pair = "it got per-pair results (B, ...): " if isinstance(scores, PerPair) else ""
        raise ValueError("rank_nodes needs one value per node, a non-empty dict kind -> (L, T, U) or (L, U); "
                         + per_pair + average)
    for k, s in scores.items():
        if k not in KINDS or not isinstance(s, torch.Tensor) or s.dim() not in (2, 3):
            got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
            raise ValueError(f"rank_nodes needs one value per node, kind -> (L, T, U) or (L, U), kinds from "
                             f"{KINDS}; got {k!r}: {got}. Per-pair scores (B, L, T, U): {average}")
        if not torch.isfinite(s).all():
            raise ValueError(f"scores for {k!r} hold {int((~torch.isfinite(s)).sum())} NaN or infinite "
                             "values")


def check_ranking(ranking):
    if isinstance(ranking, tuple) and len(ranking) == 2 and isinstance(ranking[1], torch.Tensor):
        raise TypeError("pass the node list: rank_nodes returns (nodes, values), so use rank_nodes(...)[0]")
    return ranking


def check_nodes(model, T, nodes):
    """Nodes must be (kind, layer, pos, unit) or (kind, layer, unit) tuples, all alike, in range, distinct."""
    nodes = [tuple(n) for n in check_ranking(nodes)]
    for node in nodes:
        ok = len(node) in (3, 4) and node[0] in KINDS and len(node) == len(nodes[0]) and all(
            isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in node[1:])
        units = n_units(model, node[0]) if ok else 0
        limits = (model.config.n_layer,) + ((T,) if len(node) == 4 else ()) + (units,)
        if not ok or not all(0 <= i < n for i, n in zip(node[1:], limits)):
            raise ValueError(f"bad node {node}: nodes are (kind, layer, pos, unit) or (kind, layer, unit), "
                             f"all of one form, integer indices below (layer, pos, unit) = {limits}, kind"
                             f" from {KINDS}")
    if len(set(nodes)) != len(nodes):
        raise ValueError(f"node {next(n for n in nodes if nodes.count(n) > 1)} is listed more than once")
    return nodes


def token_ids(ids, name):
    ids = torch.as_tensor(ids)
    if ids.is_floating_point() or ids.dtype == torch.bool or ids.dim() > 1 or (ids.numel() and ids.min() < 0):
        raise ValueError(f"{name} must be one token id or one per prompt pair (non-negative integers); "
                         f"got {ids.tolist()}")
    return ids.long()  # gather takes int64 indices


def check_position(position):
    if not isinstance(position, numbers.Integral) or isinstance(position, bool):
        raise TypeError(f"position must be an integer index into the sequence, got {position!r}")
    return int(position)


def at_position(logits, position, name):
    """logits (B, T, V) -> (B, V) at `position`, in float32 or better (bf16/fp16 models)."""
    if not -logits.shape[1] <= position < logits.shape[1]:
        raise ValueError(f"{name}: position {position} is outside the sequence of length {logits.shape[1]}")
    at = logits[:, position, :]
    return at.to(torch.promote_types(at.dtype, torch.float32))


def fit_ids(ids, logits, name):
    """Token ids (one, or one per prompt pair) -> (B,) on the logits' device, checked against (B, V)."""
    B, V = logits.shape
    if ids.numel() not in (1, B) or (ids.numel() and ids.max() >= V):
        raise ValueError(f"{name}: need one token id or one per prompt pair ({B}), each below the vocabulary "
                         f"size {V}; got {ids.tolist()}")
    return ids.to(logits.device).reshape(-1).expand(B)


# --- Student's t distribution, self-contained (survival function via the regularized incomplete beta)

def _betacf(a, b, x, iters=300, eps=1e-15):
    """Continued fraction for the regularized incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, iters + 1):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def _betainc(a, b, x):
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def student_t_sf(t, df):
    """P(T > t) for Student's t with df degrees of freedom (df = inf: the normal distribution)."""
    if math.isinf(df):
        return 0.5 * math.erfc(t / math.sqrt(2.0))
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return tail if t >= 0 else 1.0 - tail


def student_t_quantile(q, df):
    """The t with P(T <= t) = q, by bisection on student_t_sf (accurate to ~1e-12)."""
    lo, hi = -1e3, 1e3
    while 1.0 - student_t_sf(hi, df) < q:  # heavy tails (df near 1, tiny alpha): widen the bracket
        lo, hi = hi, 10 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if 1.0 - student_t_sf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return 0.5 * (lo + hi)


if __name__ == "__main__":
    print("atp_minimal.py is the library: import it (see the docstring at its top). "
          "The worked example is `python demo.py`.")
