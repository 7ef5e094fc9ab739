"""
AtP* in one file: exhaustive activation patching (the ground truth), AtP, the QK fix, GradDrop, AtP*,
and the statistical bound on the false negatives that remain, in the order of the paper:

  J. Kramar, T. Lieberum, R. Shah, N. Nanda (2024). "AtP*: An efficient and scalable method for
  localizing LLM behaviour to components." https://arxiv.org/abs/2403.00745

Conventions (the paper's, everywhere): run on the CLEAN prompt, patch in the NOISE value, take the
gradient at the clean activation, Delta = noise - clean, |.| per prompt pair before averaging.

Dimension legend: B prompt pairs, L layers, T query position, S key position, H heads, Dh d_head,
M MLP neurons, U units of a site (H for q/k/v/z, M for neurons), E features per unit (Dh, or 1).

Nodes (paper §1.1): kind in KINDS, at (layer, position, head or neuron). Every function returns a dict
kind -> tensor (B, L, T, U); with positions="all" a node is a unit at every position at once and the
T axis disappears: (B, L, U).

    import atp_minimal as atp
    effects = atp.activation_patching(model, clean, noise, metric)        # I(n) per pair, exact
    scores  = atp.atp_star(model, clean, noise, metric)                    # per pair, >= 0
    ranking = atp.rank_nodes({k: s.mean(0) for k, s in scores.items()})   # c_hat(n), best first

Run `python atp_minimal.py` for the worked example on the shipped toy IOI model.
"""

import math
from contextlib import contextmanager

import torch

KINDS = ("q", "k", "v", "z", "neuron")
SITES = {"q": "attn.hook_q", "k": "attn.hook_k", "v": "attn.hook_v", "z": "attn.hook_z",
         "neuron": "mlp.hook_post"}


# --------------------------------------------------------------------------------------------------
# --- metrics: one scalar per prompt pair (§1.2)
#
# A metric maps logits (B, T, V) to (B,), and value b must depend on row b alone: AtP differentiates the
# sum over pairs, and patched runs stack copies of the B pairs. (A metric like x - x.mean() breaks both.)

def logit_diff(answer, wrong, position=-1):
    """metric(logits (B, T, V)) -> (B,): logit of `answer` minus logit of `wrong` at `position`.
    answer/wrong: a token id or one id per prompt pair."""
    def metric(logits):
        last = logits[:, position, :]  # (B, V)
        last = last.to(torch.promote_types(last.dtype, torch.float32))  # float32 or better under bf16/fp16
        a = torch.as_tensor(answer, device=logits.device).expand(last.shape[0])
        w = torch.as_tensor(wrong, device=logits.device).expand(last.shape[0])
        return last.gather(1, a[:, None])[:, 0] - last.gather(1, w[:, None])[:, 0]  # (B,)
    metric.last_position_only = position == -1  # lets patched runs skip the other positions' logits
    return metric


def neg_log_prob(target, position=-1):
    """metric(logits (B, T, V)) -> (B,): -log p(target) at `position`."""
    def metric(logits):
        last = logits[:, position, :]
        logp = torch.log_softmax(last.to(torch.promote_types(last.dtype, torch.float32)), dim=-1)  # (B, V)
        t = torch.as_tensor(target, device=logits.device).expand(logp.shape[0])
        return -logp.gather(1, t[:, None])[:, 0]  # (B,)
    metric.last_position_only = position == -1
    return metric


# --------------------------------------------------------------------------------------------------
# --- plumbing: input checks, eval mode, caching sites

def check_inputs(model, clean, noise, kinds, positions="each"):
    if not isinstance(clean, torch.Tensor) or not isinstance(noise, torch.Tensor) or clean.shape != noise.shape:
        raise ValueError(f"clean and noise must be token tensors of the same shape (B, T); got "
                         f"{getattr(clean, 'shape', type(clean))} and {getattr(noise, 'shape', type(noise))}")
    model.check_tokens(clean)
    model.check_tokens(noise)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"unknown node kinds {unknown}; choose from {KINDS}")
    if positions not in ("each", "all"):
        raise ValueError(f"positions must be 'each' (a node per position) or 'all', got {positions!r}")


def check_metric(values, B, what):
    if not isinstance(values, torch.Tensor) or values.shape != (B,):
        got = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(f"metric must return one value per prompt pair, shape ({B},); got {got} on {what}")
    if not torch.isfinite(values).all():
        raise ValueError(f"metric returned non-finite values on {what}: {values.tolist()}")
    return values


@contextmanager
def eval_mode(model):
    """Run in eval mode (paper pitfall 8: no dropout anywhere), then restore the caller's mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def site(kind, layer):
    return f"blocks.{layer}.{SITES[kind]}"


def as_units(t):
    """Site tensor -> (B, T, U, E): q/k/v/z are (B, T, H, Dh) already; neurons (B, T, M) get E = 1."""
    return t if t.dim() == 4 else t.unsqueeze(-1)


def run_with_cache(model, idx, names, hooks=None):
    """Forward on idx, keeping the tensors at the named sites (the very objects the forward consumed,
    so torch.autograd.grad can differentiate with respect to them)."""
    cache = {}
    hooks = dict(hooks or {})
    for name in names:
        hooks[name] = lambda t, name=name: cache.__setitem__(name, t)
    logits = model(idx, hooks=hooks)
    return logits, cache


def empty_scores(model, kinds, B, T, positions, dtype, device):
    cfg = model.config
    shape = lambda k: (B, cfg.n_layer) + ((T,) if positions == "each" else ()) + (
        (cfg.d_mlp,) if k == "neuron" else (cfg.n_head,))
    return {k: torch.zeros(shape(k), dtype=dtype, device=device) for k in kinds}


# --------------------------------------------------------------------------------------------------
# --- activation patching: the ground truth (§1.2-1.3)

def activation_patching(model, clean, noise, metric, kinds=KINDS, positions="each", chunk_size=256,
                        progress=None):
    """Exact signed effect per pair: I(n) = metric(clean | do(n <- n(noise))) - metric(clean).
    Returns kind -> (B, L, T, U) (or (B, L, U) with positions="all"). c(n) = effects[k].mean(0).

    One patched copy of all B pairs per node; many nodes share one forward of at most `chunk_size` rows,
    which only recomputes what the patch can change (see resume_patched). A metric with the attribute
    `last_position_only = True` (logit_diff and neg_log_prob at position -1 set it) is given the logits
    of the last position only, (B, 1, V), in patched runs: set it only on a metric that reads position -1
    and nothing else."""
    check_inputs(model, clean, noise, kinds, positions)
    B, T = clean.shape
    with eval_mode(model), torch.no_grad():
        clean_logits, clean_cache, noise_cache, base = clean_and_noise_runs(model, clean, noise, metric, kinds)
        last_only = getattr(metric, "last_position_only", False)  # set by logit_diff / neg_log_prob
        effects = empty_scores(model, kinds, B, T, positions, base.dtype, base.device)
        per_chunk = max(1, chunk_size // B)
        jobs = []  # (kind, layer, position or None, units): nodes that share a layer and a position
        for k in kinds:
            for l in range(model.config.n_layer):
                # A node whose noise value equals its clean value in every pair has I(n) = 0 exactly.
                changed = moved(clean_cache, noise_cache, k, l)  # (T, U)
                for pos in (range(T) if positions == "each" else [None]):
                    units = (changed[pos] if pos is not None else changed.any(0)).nonzero()[:, 0]  # (N,)
                    jobs += [(k, l, pos, units[i:i + per_chunk]) for i in range(0, len(units), per_chunk)]
        for k, l, pos, units in _progress(jobs, progress, "activation patching"):
            n, start = len(units), pos or 0
            noise_act = as_units(noise_cache[site(k, l)])[:, start:]  # (B, T', U, E), T' = T - start
            row = torch.arange(n, device=clean.device)

            def patch(t):  # t: (n*B, T', M) or (n*B, T', H, Dh); node i is patched in rows i*B..i*B+B-1
                patched = as_units(t).clone().view((n, B) + noise_act.shape[1:])  # (n, B, T', U, E)
                if pos is not None:  # the node sits at `pos`, the first position of the resumed run
                    patched[row, :, 0, units] = noise_act[:, 0, units].transpose(0, 1)  # (n, B, E)
                else:  # the unit at every position
                    patched[row, :, :, units] = noise_act[:, :, units].permute(2, 0, 1, 3)  # (n, B, T, E)
                return patched.view(t.shape)

            logits = resume_patched(model, clean_cache, clean_logits, l, start, n, {site(k, l): patch}, last_only)
            for i in range(n):
                value = check_metric(metric(logits[i * B:(i + 1) * B]), B, f"a patched run ({k}, layer {l})")
                index = (slice(None), l) + ((pos,) if pos is not None else ()) + (int(units[i]),)
                effects[k][index] = value - base
    return effects


def clean_and_noise_runs(model, clean, noise, metric, kinds):
    """The two cached runs every patching sweep starts from: node sites (both runs), and on the clean run
    also every layer's residual stream, keys and values (to resume from) and the clean metric (B,)."""
    L = model.config.n_layer
    sites = [site(k, l) for k in kinds for l in range(L)]
    resume = [f"blocks.{l}.{name}" for l in range(L) for name in ("hook_resid_pre", "attn.hook_k", "attn.hook_v")]
    _, noise_cache = run_with_cache(model, noise, sites)
    clean_logits, clean_cache = run_with_cache(model, clean, sites + resume)
    base = check_metric(metric(clean_logits), clean.shape[0], "the clean run")
    return clean_logits, clean_cache, noise_cache, base


def moved(clean_cache, noise_cache, kind, layer):
    """(T, U) bool: does the noise prompt change this node in any prompt pair?"""
    delta = as_units(noise_cache[site(kind, layer)]) - as_units(clean_cache[site(kind, layer)])  # (B, T, U, E)
    return (delta != 0).any(-1).any(0)


def resume_patched(model, clean_cache, clean_logits, layer, start, n, hooks, last_position_only=False):
    """Logits (n*B, T, V) of n patched copies of the B clean prompts, when every patch sits at a layer
    >= `layer` and a position >= `start`. Nothing before that can change, so run only layers layer..L-1
    on positions start..T-1: from the cached clean residual stream, with the cached clean keys and values
    of the earlier positions (attention is causal); earlier positions keep their clean logits.
    The hooks see tensors of positions start..T-1 only. last_position_only: return (n*B, 1, V)."""
    repeat = lambda t: t.repeat((n,) + (1,) * (t.dim() - 1))  # (B, ...) -> (n*B, ...), copy i = rows i*B..
    resid = repeat(clean_cache[f"blocks.{layer}.hook_resid_pre"][:, start:])  # (n*B, T - start, D)
    past = None
    if start > 0:
        past = [(repeat(clean_cache[f"blocks.{l}.attn.hook_k"][:, :start]),  # (n*B, start, H, Dh)
                 repeat(clean_cache[f"blocks.{l}.attn.hook_v"][:, :start])) for l in range(layer, model.config.n_layer)]
    suffix = model.forward_from(layer, resid, hooks, past, last_position_only)  # (n*B, T - start, V)
    if last_position_only:
        return suffix  # (n*B, 1, V)
    return torch.cat([repeat(clean_logits[:, :start]), suffix], dim=1)  # (n*B, T, V)


def patch_node_sets(model, clean, noise, metric, masks, chunk_size=256, progress=None):
    """Patch a SET of nodes jointly, for each of S sets: masks is kind -> bool (S, L, T, U) (or
    (S, L, U) for whole-position nodes). Returns (S, B): metric(clean | do(set <- noise)) - metric(clean).
    Used to verify single nodes (a set of one), and by the subset sampling of §5."""
    kinds = tuple(masks)
    check_inputs(model, clean, noise, kinds)
    B, T = clean.shape
    L = model.config.n_layer
    S = next(iter(masks.values())).shape[0]
    with eval_mode(model), torch.no_grad():
        clean_logits, clean_cache, noise_cache, base = clean_and_noise_runs(model, clean, noise, metric, kinds)
        last_only = getattr(metric, "last_position_only", False)
        # Which nodes each set really moves, per (kind, layer): (S, T, U). Patching an unmoved node is a no-op.
        patched = {}
        for k, m in masks.items():
            for l in range(L):
                m_l = m[:, l].to(clean.device)  # (S, T, U) or (S, U)
                if m_l.dim() == 2:  # a unit at every position
                    m_l = m_l[:, None, :].expand(S, T, m_l.shape[-1])
                m_l = m_l & moved(clean_cache, noise_cache, k, l)
                if m_l.any():
                    patched[k, l] = m_l
        # Where each set's first patch sits; sets that start alike share resumed forwards (resume_patched).
        first_layer = torch.full((S,), L, device=clean.device)
        first_pos = torch.full((S,), T, device=clean.device)
        for (k, l), m_l in patched.items():
            at = m_l.any(-1)  # (S, T)
            first_layer = torch.where(at.any(-1), torch.clamp(first_layer, max=l), first_layer)
            first_pos = torch.minimum(first_pos, torch.where(at.any(-1), at.int().argmax(-1), T))
        groups = {}  # (first layer, first position) -> sets; sets that move nothing have effect exactly 0
        for i in range(S):
            if first_layer[i] < L:
                groups.setdefault((int(first_layer[i]), int(first_pos[i])), []).append(i)
        per_chunk = max(1, chunk_size // B)
        chunks = [(key, ids[c:c + per_chunk]) for key, ids in sorted(groups.items())
                  for c in range(0, len(ids), per_chunk)]
        out = torch.zeros(S, B, dtype=base.dtype, device=base.device)
        for (layer, start), ids in _progress(chunks, progress, "patching node sets"):
            sets = torch.tensor(ids, device=clean.device)
            n = len(sets)
            hooks = {}
            for (k, l), m_l in patched.items():
                if l < layer or not m_l[sets].any():
                    continue
                def patch(t, m=m_l[sets][:, None, start:, :, None], nz=as_units(noise_cache[site(k, l)])[:, start:]):
                    units = as_units(t).view((n, B) + nz.shape[1:])  # (n, B, T', U, E)
                    return torch.where(m, nz, units).reshape(t.shape)  # m: (n, 1, T', U, 1)
                hooks[site(k, l)] = patch
            logits = resume_patched(model, clean_cache, clean_logits, layer, start, n, hooks, last_only)
            for i, s in enumerate(sets.tolist()):
                value = check_metric(metric(logits[i * B:(i + 1) * B]), B, "a jointly patched run")
                out[s] = value - base
    return out


def _progress(items, progress, desc):
    """A tqdm bar on long sweeps (progress=None: only when there are many steps)."""
    if progress is None:
        progress = len(items) > 50
    if not progress:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, leave=False)


# --------------------------------------------------------------------------------------------------
# --- AtP (§2), the QK fix (§3), GradDrop (§4), AtP* (= all three)

def attribution_patching(model, clean, noise, metric, kinds=KINDS, qk_fix=False, grad_drop=False,
                         positions="each"):
    """First-order estimates of I(n), one backward pass on the clean run for all nodes.
    grad_drop=False: signed per-pair estimate I_hat(n) (kind -> (B, L, T, U)); score = |.|.mean(0).
    grad_drop=True:  per-pair sum_l |I_hat_l(n)| / (L-1), >= 0 (§4.2).
    qk_fix=True: q and k nodes use the exact-softmax estimates of §3.2-3.3."""
    check_inputs(model, clean, noise, kinds, positions)
    if torch.is_inference_mode_enabled():
        raise RuntimeError("attribution_patching needs gradients: call it outside torch.inference_mode()")
    B, T = clean.shape
    L = model.config.n_layer
    if grad_drop and L < 2:
        raise ValueError("GradDrop divides by L-1 and needs a model with at least 2 layers")
    use_qk = qk_fix and any(k in ("q", "k") for k in kinds)
    node_sites = [site(k, l) for k in kinds for l in range(L)]
    qk_sites = [f"blocks.{l}.attn.{s}" for l in range(L) for s in ("hook_q", "hook_k")] if use_qk else []
    pattern_sites = [f"blocks.{l}.attn.hook_pattern" for l in range(L)] if use_qk else []
    resid_sites = [f"blocks.{l}.hook_resid_post" for l in range(L)] if grad_drop else []
    with eval_mode(model):
        with torch.no_grad():  # forward 1: the noise run, for n(x_noise)
            _, noise_cache = run_with_cache(model, noise, node_sites + qk_sites)
        with torch.enable_grad():  # forward 2 + backward: the clean run, for n(x_clean) and dL/dn
            # Gradients are taken with respect to activations only: start the graph at the embedding, so
            # a model with frozen parameters works too (and no parameter gradient is ever computed).
            start_graph = {"hook_embed": lambda t: t.detach().requires_grad_(True)}
            clean_logits, clean_cache = run_with_cache(model, clean, node_sites + qk_sites + pattern_sites
                                                       + resid_sites, hooks=start_graph)
            values = check_metric(metric(clean_logits), B, "the clean run")
            wrt = node_sites + pattern_sites + resid_sites
            grads = dict(zip(wrt, torch.autograd.grad(values.sum(), [clean_cache[n] for n in wrt],
                                                      retain_graph=grad_drop, allow_unused=True)))
            estimator = NodeEstimator(model, clean_cache, noise_cache, kinds, qk_fix, positions)
            plain = estimator(grads, layers=range(L))  # kind -> (B, L, T, U), signed
            if not grad_drop:
                return plain
            # §4.2: sum over dropped layers l of |I_hat_l(n)|. For a node in layer m:
            #   l < m: the gradient at n is unchanged, so the term is |I_hat(n)|   (m such terms)
            #   l = m: no gradient reaches inside a dropped block, so the term is 0
            #   l > m: backprop from resid_pre_l with the gradient of resid_post_l, i.e. the skip path
            #          only: layer l's write (attn_out + mlp_out) is stopped; the forward is unchanged.
            layer_index = torch.arange(L, device=clean.device, dtype=plain[kinds[0]].dtype)
            total = {k: plain[k].abs() * layer_index.view(1, L, *([1] * (plain[k].dim() - 2))) for k in kinds}
            for l in range(1, L):
                below = [n for n in node_sites + pattern_sites if int(n.split(".")[1]) < l]
                resid_pre = clean_cache[f"blocks.{l - 1}.hook_resid_post"]  # the same tensor as resid_pre_l
                dropped = torch.autograd.grad(resid_pre, [clean_cache[n] for n in below],
                                              grad_outputs=grads[f"blocks.{l}.hook_resid_post"],
                                              retain_graph=l < L - 1, allow_unused=True)
                estimate = estimator(dict(zip(below, dropped)), layers=range(l))
                for k in kinds:
                    total[k][:, :l] += estimate[k][:, :l].abs()
            return {k: v / (L - 1) for k, v in total.items()}


def atp_star(model, clean, noise, metric, kinds=KINDS, positions="each"):
    """AtP* = AtP + QK fix + GradDrop (paper §3-4). Per-pair scores >= 0, kind -> (B, L, T, U)."""
    return attribution_patching(model, clean, noise, metric, kinds, qk_fix=True, grad_drop=True,
                                positions=positions)


class NodeEstimator:
    """Turns gradients from one backward pass into per-node estimates, for the layers asked for.
    Holds the clean and noise activations so each GradDrop pass reuses them."""

    def __init__(self, model, clean_cache, noise_cache, kinds, qk_fix, positions):
        self.model, self.kinds, self.qk_fix, self.positions = model, kinds, qk_fix, positions
        # Detached copies: the estimates are plain numbers, and must not keep the forward graph alive.
        self.clean = {name: t.detach() for name, t in clean_cache.items()}
        self.noise = {name: t.detach() for name, t in noise_cache.items()}
        # Estimates in float32 or better, even when the model runs in bf16/fp16 (pitfall 6).
        self.dtype = torch.promote_types(next(model.parameters()).dtype, torch.float32)

    def __call__(self, grads, layers):
        B, T = next(iter(self.clean.values())).shape[:2]
        first = as_units(self.clean[site(self.kinds[0], 0)])
        out = empty_scores(self.model, self.kinds, B, T, self.positions, self.dtype, first.device)
        for k in self.kinds:
            for l in layers:
                if self.qk_fix and k in ("q", "k"):
                    G = grads.get(f"blocks.{l}.attn.hook_pattern")
                    est = self.qk_estimate(k, l, G)  # (B, T, H) or (B, H)
                else:
                    g = grads.get(site(k, l))
                    if g is None:  # no path from this node to the metric
                        continue
                    c = as_units(self.clean[site(k, l)]).to(self.dtype)
                    n = as_units(self.noise[site(k, l)]).to(self.dtype)
                    # AtP (§2): I_hat(n) = (n(x_noise) - n(x_clean)) . dL/dn at the clean run
                    est = ((n - c) * as_units(g).to(self.dtype)).sum(-1)  # (B, T, U)
                    if self.positions == "all":
                        est = est.sum(1)  # (B, U): linear in the node, so the group sums its members
                out[k][:, l] = est
        return out

    def qk_estimate(self, kind, layer, G):
        if G is None:
            return 0.0
        p = f"blocks.{layer}.attn."
        get = lambda cache, s: cache[p + s].to(self.dtype)
        q, k = get(self.clean, "hook_q"), get(self.clean, "hook_k")  # (B, T, H, Dh)
        G = G.to(self.dtype)  # (B, H, T, S): dL/dpattern
        scale = self.model.transformer.h[layer].attn.scale
        # The clean scores, recomputed as the model computes them but in the estimate's dtype, so that
        # clean and patched softmaxes round alike (under bf16 a query the noise does not move gets 0).
        T = q.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()  # (T, S)
        scores = ((q.transpose(1, 2) @ k.permute(0, 2, 3, 1)) * scale).masked_fill(~causal, float("-inf"))
        if kind == "q":
            return query_fix(q, get(self.noise, "hook_q"), k, scores, G, scale, self.positions)
        return key_fix(q, k, get(self.noise, "hook_k"), scores, G, scale, self.positions)


# --- the QK fix (§3.2): recompute the attention softmax exactly, linearise only what comes after it

def query_fix(q_clean, q_noise, k_clean, scores, G, scale, positions="each"):
    """I_hat_Q(q_t) = sum_s (softmax_s(q_t(noise).k_s(clean) * scale + mask) - a_ts) * G_ts.
    q, k: (B, T, H, Dh); scores, G: (B, H, T, S). Returns (B, T, H), or (B, H) for positions="all"
    (every query row recomputed; rows do not interact inside the softmax, so this is their sum)."""
    a = torch.softmax(scores, dim=-1)  # (B, H, T, S)
    new_scores = (q_noise.transpose(1, 2) @ k_clean.permute(0, 2, 3, 1)) * scale  # (B, H, T, S)
    new_scores = new_scores.masked_fill(torch.isinf(scores), float("-inf"))
    per_row = ((torch.softmax(new_scores, dim=-1) - a) * G).sum(-1)  # (B, H, T)
    return per_row.sum(-1) if positions == "all" else per_row.transpose(1, 2)


def key_fix(q_clean, k_clean, k_noise, scores, G, scale, positions="each"):
    """I_hat_K(k_s) = sum_{t >= s} sum_s' (a~(s)_ts' - a_ts') G_ts', where a~(s)_t is row t with only
    logit s moved to q_t(clean).k_s(noise). Closed form, O(T^2) per head (paper-notes §3.3):
        a~_ts - a_ts = sigmoid(logit(a_ts) + d_ts) - a_ts,   d_ts = q_t.(k_s(noise) - k_s(clean)) * scale
        the rest of row t rescales by (1 - a~_ts)/(1 - a_ts), so
        dI_t(k_s) = (a~_ts - a_ts) * (G_ts - G_bar_t,-s),  G_bar_t,-s = sum_{s'!=s} a_ts' G_ts' / (1 - a_ts)
    Returns (B, S, H), or (B, H) for positions="all" (all keys patched at once: each row recomputed
    exactly with every key moved, then summed over rows)."""
    masked = torch.isinf(scores)  # (B, H, T, S): keys a query cannot see
    if positions == "all":
        new_scores = (q_clean.transpose(1, 2) @ k_noise.permute(0, 2, 3, 1)) * scale  # (B, H, T, S)
        new_scores = new_scores.masked_fill(masked, float("-inf"))
        diff = torch.softmax(new_scores, dim=-1) - torch.softmax(scores, dim=-1)
        return (diff * G).sum((-1, -2))  # (B, H)
    d = (q_clean.transpose(1, 2) @ (k_noise - k_clean).permute(0, 2, 3, 1)) * scale  # (B, H, T, S)
    log_a = torch.log_softmax(scores, dim=-1)  # (B, H, T, S): from the scores, so no probability underflows
    a = log_a.exp()
    # logit(a) = log a - log(1 - a). Only the largest entry of a row can exceed 1/2; for it, log(1 - a)
    # is the log-sum-exp of the OTHER scores, taken directly (no cancellation when a -> 1).
    top = scores.argmax(-1, keepdim=True)  # (B, H, T, 1)
    is_top = torch.zeros_like(masked).scatter_(-1, top, True)
    others = scores.masked_fill(is_top, float("-inf"))  # the row without its top key
    lse_others = torch.logsumexp(others, dim=-1, keepdim=True)  # (B, H, T, 1); -inf if one key is visible
    only_key = torch.isinf(lse_others)  # row sees a single key: patching its logit changes nothing
    logit_a = torch.where(is_top, scores - lse_others, log_a - torch.log1p(-a))
    a_new = torch.sigmoid(logit_a + d)  # (B, H, T, S): the patched key's new probability
    # Mean gradient of the other keys. For the top key, average G under softmax(others) directly.
    aG = (a * G).sum(-1, keepdim=True)  # (B, H, T, 1)
    G_bar = (aG - a * G) / (1 - a)  # valid where a <= 1/2
    G_bar_top = (torch.softmax(others.masked_fill(only_key, 0.0), dim=-1) * G).sum(-1, keepdim=True)
    G_bar = torch.where(is_top, G_bar_top, G_bar)
    # d = 0 means the patch leaves logit s where it was: the change is exactly 0 (sigmoid(logit(a)) is
    # only a to rounding, and a node the noise prompt does not move must score exactly 0).
    per_query = torch.where(d == 0, 0.0, a_new - a) * (G - G_bar)  # (B, H, T, S): dI_t(k_s)
    per_query = per_query.masked_fill(masked | only_key, 0.0)  # t < s (causal) and one-key rows
    return per_query.sum(2).transpose(1, 2)  # (B, S, H): sum over the queries t >= s that see key s


# --------------------------------------------------------------------------------------------------
# --- rankings

def rank_nodes(scores, descending=True):
    """scores: kind -> (L, T, U) or (L, U) (one value per node). Returns the node list sorted by score:
    [(kind, layer, pos, unit) or (kind, layer, unit), ...] and the sorted scores."""
    nodes, values = [], []
    for k, s in scores.items():
        idx = torch.nonzero(torch.ones_like(s, dtype=torch.bool))  # every node, in index order
        nodes += [(k,) + tuple(i.tolist()) for i in idx]
        values.append(s.reshape(-1))
    values = torch.cat(values)
    order = torch.sort(values, descending=descending, stable=True).indices
    return [nodes[i] for i in order.tolist()], values[order]


def node_label(node):
    """('k', 2, 7, 3) -> 'k L2 H3 @7'; ('neuron', 1, 4, 99) -> 'neuron L1 N99 @4'."""
    kind, layer, *rest = node
    unit = rest[-1]
    where = f" @{rest[0]}" if len(rest) == 2 else ""
    return f"{kind} L{layer} {'N' if kind == 'neuron' else 'H'}{unit}{where}"


def node_masks(model, T, nodes, member):
    """Sets of nodes as patch masks: member (S, N) bool says which of `nodes` are in set i.
    Returns kind -> bool (S, L, T, U), or (S, L, U) when the nodes are whole-position (kind, layer, unit)."""
    cfg = model.config
    S = member.shape[0]
    out = {}
    for j, node in enumerate(nodes):
        kind = node[0]
        if kind not in KINDS:
            raise ValueError(f"unknown node kind in {node}; choose from {KINDS}")
        if kind not in out:
            U = cfg.d_mlp if kind == "neuron" else cfg.n_head
            shape = (S, cfg.n_layer) + ((T,) if len(node) == 4 else ()) + (U,)
            out[kind] = torch.zeros(shape, dtype=torch.bool)
        out[kind][(slice(None),) + tuple(node[1:])] = member[:, j]
    return out


# --------------------------------------------------------------------------------------------------
# --- verify in ranked order, then bound what is left (§5, §8 "practical recipe")

def verify(model, clean, noise, metric, ranking, budget, chunk_size=256, progress=None):
    """Exact activation patching of the first `budget` nodes of `ranking` (a list of node tuples, e.g.
    from rank_nodes). Returns (nodes, effects (budget, B)): the signed per-pair effects I(n);
    c(n) = effects.mean(1). Verification removes false positives; it never finds what it is not shown."""
    if budget < 0 or budget > len(ranking):
        raise ValueError(f"budget must be between 0 and the number of ranked nodes ({len(ranking)}), got {budget}")
    nodes = list(ranking[:budget])
    if not nodes:
        return nodes, torch.zeros(0, clean.shape[0])
    masks = node_masks(model, clean.shape[1], nodes, torch.eye(len(nodes), dtype=torch.bool))
    return nodes, patch_node_sets(model, clean, noise, metric, masks, chunk_size, progress)


def subset_sampling(model, clean, noise, metric, nodes, p, n_samples, seed=0, chunk_size=256, progress=None):
    """Algorithm 1 (§5.1): n_samples random subsets of `nodes`, each node included with probability p,
    each subset patched jointly in one forward. Returns (member (n_samples, N) bool, y (n_samples,)),
    y = mean over prompt pairs of metric(clean | do(subset <- noise)) - metric(clean)."""
    member = draw_subsets(n_samples, len(nodes), p, seed)  # (S, N)
    masks = node_masks(model, clean.shape[1], nodes, member)
    y = patch_node_sets(model, clean, noise, metric, masks, chunk_size, progress).mean(1)  # (S,)
    return member, y


def draw_subsets(n_samples, n_nodes, p, seed=0):
    """The random subsets of Algorithm 1: member (n_samples, n_nodes) bool, each entry True w.p. p (seeded)."""
    if not 0 < p < 1:
        raise ValueError(f"inclusion probability p must lie strictly between 0 and 1, got {p}")
    return torch.rand(n_samples, n_nodes, generator=torch.Generator().manual_seed(seed)) < p


def subset_statistics(member, y):
    """Per-node split of the samples into 'in the subset' (+) and 'not in it' (-) (§5.1).
    member (S, N) bool, y (S,). Returns c_ss = mean+ - mean- (N,), its Welch standard error se (N,)
    and Welch-Satterthwaite degrees of freedom df (N,). Needs every node in >= 2 and out of >= 2 samples."""
    inc = member.double()  # (S, N)
    exc = 1.0 - inc
    y = y.double()[:, None]  # (S, 1)
    n_in, n_out = inc.sum(0), exc.sum(0)  # (N,)
    if n_in.min() < 2 or n_out.min() < 2:
        raise ValueError(f"too few samples for a variance: some node was included {int(n_in.min())} times or "
                         f"left out {int(n_out.min())} times (each needs >= 2); raise n_samples or move p toward 0.5")
    mean_in, mean_out = (inc * y).sum(0) / n_in, (exc * y).sum(0) / n_out
    var_in = (inc * (y - mean_in) ** 2).sum(0) / (n_in - 1)  # unbiased sample variances
    var_out = (exc * (y - mean_out) ** 2).sum(0) / (n_out - 1)
    v_in, v_out = var_in / n_in, var_out / n_out
    se = (v_in + v_out).sqrt()
    df = (v_in + v_out) ** 2 / (v_in ** 2 / (n_in - 1) + v_out ** 2 / (n_out - 1))
    df = torch.where(se > 0, df, torch.full_like(df, math.inf))  # constant y: no uncertainty at all
    return mean_in - mean_out, se, df


def false_negative_bound(model, clean, noise, metric, ranking, K, p=0.1, n_samples=200, alpha=0.05,
                         theta=None, seed=0, chunk_size=256, progress=None):
    """The §5.2 diagnostic. Verify the top K nodes of `ranking` (which should list every node) exactly;
    on the unverified rest R run subset sampling (inclusion probability p, n_samples joint patches)
    and a one-sided Welch t-test per node against H0: |c(n)| >= theta. Returns a dict:
      verified, verified_effects  the top K nodes and their exact c(n) (mean over prompt pairs)
      theta_star                  level-(1-alpha) upper confidence bound on max_{n in R} |c(n)|
                                  = max_n |c_ss(n)| + t_{1-alpha, df_n} * se_n
      worst_node                  the unverified node that sets theta_star
      p_value                     for the given theta: max_n P(T_df > (theta - |c_ss(n)|)/se_n)
                                  (intersection-union test: no multiple-testing correction needed)
      c_ss, se, df, unverified    per-node statistics on R, in the order of `unverified`
    Assumes approximate additivity of node effects, as the paper does; interactions bias c_ss by O(p)."""
    if not 0 < alpha < 0.5:
        raise ValueError(f"alpha must lie strictly between 0 and 0.5 (a one-sided upper bound), got {alpha}")
    if K < 0 or K > len(ranking):
        raise ValueError(f"K={K} must be between 0 and the number of ranked nodes ({len(ranking)})")
    verified, effects = verify(model, clean, noise, metric, ranking, K, chunk_size, progress)
    rest = list(ranking[K:])
    result = dict(verified=verified, verified_effects=effects.mean(1), unverified=rest, theta=theta, alpha=alpha)
    if not rest:  # everything verified: nothing can hide
        return dict(result, theta_star=0.0, worst_node=None, p_value=0.0 if theta is not None else None,
                    c_ss=torch.zeros(0), se=torch.zeros(0), df=torch.zeros(0))
    member, y = subset_sampling(model, clean, noise, metric, rest, p, n_samples, seed, chunk_size, progress)
    c_ss, se, df = subset_statistics(member, y)
    theta_star, worst, p_value = welch_bound(c_ss, se, df, alpha, theta)
    return dict(result, theta_star=theta_star, worst_node=rest[worst], p_value=p_value, c_ss=c_ss, se=se, df=df)


def welch_bound(c_ss, se, df, alpha=0.05, theta=None):
    """From per-node (c_ss, se, df): theta* = max_n |c_ss(n)| + t_{1-alpha, df_n} se_n, the index of the
    node that sets it, and (if theta is given) the p-value of H0 "some node has |c(n)| >= theta":
    max_n P(T_df > (theta - |c_ss(n)|) / se_n), the least favourable null being c(n) = theta sign(c_ss(n)).
    0 < alpha < 0.5."""
    if not 0 < alpha < 0.5:
        raise ValueError(f"alpha must lie strictly between 0 and 0.5 (a one-sided upper bound), got {alpha}")
    # The t quantile falls as df grows, between the normal's (df = inf) and the one at the smallest df.
    # Bracket every node's bound with those two, then compute the exact t quantile only for the nodes
    # whose bracket reaches the best lower bound (usually a handful out of thousands).
    q_low, q_high = student_t_quantile(1 - alpha, math.inf), student_t_quantile(1 - alpha, df.min().item())
    low, high = c_ss.abs() + q_low * se, c_ss.abs() + q_high * se  # (N,)
    candidates = (high >= low.max()).nonzero()[:, 0].tolist()
    upper = {i: abs(c_ss[i].item()) + student_t_quantile(1 - alpha, df[i].item()) * se[i].item() for i in candidates}
    worst = max(upper, key=upper.get)
    p_value = None
    if theta is not None:
        # Same bracketing for P(T_df > t): for t >= 0 the tail grows as df falls, for t < 0 it shrinks.
        t = (theta - c_ss.abs()) / se  # large t: |c(n)| is clearly below theta
        normal = 0.5 * torch.erfc(t / math.sqrt(2.0))
        heavy = torch.tensor([student_t_sf(ti, df.min().item()) for ti in t.tolist()], dtype=t.dtype)
        low_p, high_p = torch.minimum(normal, heavy), torch.maximum(normal, heavy)
        # se = 0 (y never moved with the node): |c_ss| is exact, so H0 stands (p = 1) iff |c_ss| >= theta.
        exact_se0 = (c_ss.abs() >= theta).to(t.dtype)
        low_p, high_p = torch.where(se > 0, low_p, exact_se0), torch.where(se > 0, high_p, exact_se0)
        candidates = (high_p >= low_p.max()).nonzero()[:, 0].tolist()
        p_value = max(student_t_sf(t[i].item(), df[i].item()) if se[i] > 0 else exact_se0[i].item()
                      for i in candidates)
    return upper[worst], worst, p_value


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
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if 1.0 - student_t_sf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return 0.5 * (lo + hi)


# --------------------------------------------------------------------------------------------------
# --- the worked example: `python atp_minimal.py` (toy IOI model) or `--model DIR` (a real GPT-2)

def verifications_needed(ranking, true_top):
    """How many exact patches, verifying in `ranking` order, until every node of true_top is verified."""
    position = {node: i for i, node in enumerate(ranking)}
    return max(position[n] for n in true_top) + 1


def gpt2_ioi_pairs(n, seed=0):
    """IOI prompt pairs for a real GPT-2, tokenized with tiktoken, built with the toy task's scheme:
    the noise prompt swaps the second-clause subject for the other name, so the answer flips."""
    import random
    from model import get_tokenizer
    enc = get_tokenizer()
    names = [w for w in ["Mary", "John", "Tom", "James", "Dan", "Sid", "Martin", "Amy", "Kate", "Paul",
                         "Lisa", "Mark", "Sarah", "David", "Emma", "Peter", "Laura", "Sam", "Max", "Rose"]
             if len(enc.encode(" " + w)) == 1]  # single-token names keep every prompt the same length
    rng = random.Random(seed)
    template = "When {a} and {b} went to the store, {s} gave a drink to"
    clean, noise, answer, wrong = [], [], [], []
    for _ in range(n):
        io, s = rng.sample(names, 2)
        a, b = (io, s) if rng.random() < 0.5 else (s, io)
        clean.append(enc.encode(template.format(a=a, b=b, s=s)))
        noise.append(enc.encode(template.format(a=a, b=b, s=io)))
        answer.append(enc.encode(" " + io)[0])
        wrong.append(enc.encode(" " + s)[0])
    t = lambda x: torch.tensor(x, dtype=torch.long)
    return t(clean), t(noise), t(answer), t(wrong), enc.decode(clean[0]), enc.decode(noise[0])


def main(argv=None):
    import argparse
    import time
    parser = argparse.ArgumentParser(description="AtP* worked example: exact patching vs AtP, AtP+QK fix and "
                                     "AtP*, then verify-then-bound. Default: the shipped toy IOI model.")
    parser.add_argument("--model", default=None, help="a Hugging Face GPT-2 directory (config.json + weights); "
                        "default: the toy IOI model in toy_model/")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--seed", type=int, default=0, help="seed for the prompt pairs and the bound's subsets")
    parser.add_argument("--pairs", type=int, default=4, help="number of clean/noise prompt pairs")
    parser.add_argument("--top", type=int, default=10, help="K for top-K recall and the side-by-side table")
    parser.add_argument("--verify", type=int, default=20, help="nodes verified before the bound")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 for the "
                        "toy model, whose matrices are too small to gain from more; torch's default otherwise)")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    if args.threads or args.model is None:
        torch.set_num_threads(args.threads or 1)
    if args.model is None:
        import toy_ioi
        model = toy_ioi.load_toy_model()
        clean, noise, answer, wrong = toy_ioi.make_pairs(args.pairs, split="test", seed=args.seed)
        show = (toy_ioi.decode(clean[0]), toy_ioi.decode(noise[0]))
        label = "toy IOI model (toy_model/)"
    else:
        from model import GPT
        model = GPT.from_pretrained(args.model)
        clean, noise, answer, wrong, *show = gpt2_ioi_pairs(args.pairs, args.seed)
        label = args.model
    model.to(args.device)
    clean, noise, answer, wrong = (x.to(args.device) for x in (clean, noise, answer, wrong))
    metric = logit_diff(answer, wrong)  # logit(answer) - logit(other name), last position
    cfg = model.config
    print(f"model: {label}: {cfg.n_layer} layers, {cfg.n_head} heads, d_model {cfg.n_embd}, d_mlp {cfg.d_mlp}")
    print(f"prompt pair 0 of {args.pairs}:\n  clean: {show[0]!r}\n  noise: {show[1]!r}")
    with torch.no_grad():
        m_clean, m_noise = metric(model(clean)), metric(model(noise))
    print(f"metric = logit diff (answer - other name): clean {m_clean.mean():+.3f}, noise {m_noise.mean():+.3f}")

    timings, results = {}, {}
    methods = [("exact", lambda: activation_patching(model, clean, noise, metric)),
               ("AtP", lambda: attribution_patching(model, clean, noise, metric)),
               ("AtP+QK", lambda: attribution_patching(model, clean, noise, metric, qk_fix=True)),
               ("AtP*", lambda: atp_star(model, clean, noise, metric))]
    for name, run in methods:
        start = time.perf_counter()
        results[name] = run()
        timings[name] = time.perf_counter() - start
    print("time: " + ", ".join(f"{n} {t:.2f}s" for n, t in timings.items()))
    # c(n) = mean over pairs of the signed effect; estimates are |.| per pair, then the mean (§2)
    truth = {k: v.mean(0) for k, v in results["exact"].items()}
    scores = {name: {k: v.abs().mean(0) for k, v in results[name].items()} for name in ("AtP", "AtP+QK", "AtP*")}

    K = args.top
    for family, kinds in (("attention nodes (q, k, v, z)", ("q", "k", "v", "z")), ("MLP neurons", ("neuron",))):
        true_rank, true_vals = rank_nodes({k: truth[k].abs() for k in kinds})
        c_of = dict(zip(true_rank, [truth[n[0]][n[1:]].item() for n in true_rank]))
        ranks = {name: rank_nodes({k: s[k] for k in kinds})[0] for name, s in scores.items()}
        print(f"\n== {family}: {len(true_rank)} nodes; true top-{K} by |c(n)| ==")
        print(f"{'rank':>4}  {'exact c(n)':>22} " + " ".join(f"{name:>26}" for name in ranks))
        for i in range(K):
            row = f"{i + 1:>4}  {node_label(true_rank[i]):>13} {c_of[true_rank[i]]:+8.3f} "
            row += " ".join(f"{node_label(r[i]):>17} {c_of[r[i]]:+8.3f}" for r in ranks.values())
            print(row)
        top = set(true_rank[:K])
        print(f"recall of the true top-{K} in each method's top-{K}: " + ", ".join(
            f"{name} {len(top & set(r[:K])) / K:.0%}" for name, r in ranks.items()))
        print(f"exact patches to verify the true top-{K} in each method's order: " + ", ".join(
            f"{name} {verifications_needed(r, top)}" for name, r in ranks.items()) + f" (oracle {K})")
        position = {name: {n: i + 1 for i, n in enumerate(r)} for name, r in ranks.items()}
        missed = [n for n in true_rank[:K] if position["AtP"][n] > K]
        print(f"AtP false negatives (true top-{K}, outside AtP's top-{K}) and where each method ranks them:")
        for n in missed:
            print(f"  {node_label(n):>17}  c(n) {c_of[n]:+.3f}   " + "   ".join(
                f"{name} #{position[name][n]}" for name in ranks))
        if not missed:
            print("  none")

    # Verify-then-bound (§5): rank attention nodes by AtP*, verify the top, bound the unverified rest.
    kinds = ("q", "k", "v", "z")
    ranking, _ = rank_nodes({k: scores["AtP*"][k] for k in kinds})
    start = time.perf_counter()
    p, n_samples = 0.1, 200
    bound = false_negative_bound(model, clean, noise, metric, ranking, K=args.verify, p=p, n_samples=n_samples,
                                 seed=args.seed)
    elapsed = time.perf_counter() - start
    true_max = max(abs(truth[n[0]][n[1:]].item()) for n in bound["unverified"])
    print(f"\n== verify-then-bound on attention nodes: verified the AtP* top {args.verify}, then "
          f"{n_samples} random joint patches (p = {p}) of the other {len(bound['unverified'])} ({elapsed:.1f}s) ==")
    print(f"largest verified |c(n)|: {bound['verified_effects'].abs().max():.3f}")
    print(f"theta* (95% upper bound on any unverified |c(n)|): {bound['theta_star']:.3f} "
          f"(set by {node_label(bound['worst_node'])}); true largest unverified |c(n)|: {true_max:.3f}")


if __name__ == "__main__":
    main()
