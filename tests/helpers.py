"""Small helpers shared by the test files: a random GPT-2 with large weights, and the largest difference
between two results. Imported as `from helpers import ...`: conftest.py puts tests/ on sys.path."""

import torch

from model import GPT, GPTConfig


def random_gpt(seed, n_layer=2, n_head=2, n_embd=16, vocab_size=20, n_positions=8, n_inner=24, std=0.4,
               embedding_std=1.0):
    """A float64 GPT-2 whose every weight is re-drawn large, so attention is often saturated, GELUs are
    curved and every node has a non-trivial effect: layer-norm gains 1 + 0.2 N(0, 1), biases and
    layer-norm shifts 0.3 N(0, 1), embeddings embedding_std N(0, 1), every other matrix std N(0, 1).
    The draws come in named_parameters() order, one randn_like per parameter."""
    torch.manual_seed(seed)
    cfg = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab_size,
                    n_positions=n_positions, n_inner=n_inner)
    model = GPT(cfg).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(1 + 0.2 * torch.randn_like(p))  # layer-norm gains near 1
            elif p.dim() == 1:
                p.copy_(0.3 * torch.randn_like(p))  # biases and layer-norm shifts
            elif "wte" in name or "wpe" in name:
                p.copy_(embedding_std * torch.randn_like(p))  # token and position embeddings
            else:
                p.copy_(std * torch.randn_like(p))
    return model.eval()


def max_diff(a, b):
    """Largest absolute difference between two results: tensors (compared in float64), or dicts, lists or
    tuples of them (same keys, same lengths, same shapes), or plain numbers."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), f"{sorted(a)} != {sorted(b)}"
        return max(max_diff(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        return max([max_diff(x, y) for x, y in zip(a, b)], default=0.0)
    if isinstance(a, torch.Tensor):
        assert a.shape == b.shape, f"{a.shape} != {b.shape}"
        return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    if isinstance(a, float):
        return abs(a - b)
    assert a == b, f"{a} != {b}"
    return 0.0


def fast_and_reference(model, clean, noise, metric, nodes, exact_kinds=None):
    """name -> (Part II result, its Part I reference) for every method on one model: exact patching (of
    exact_kinds, default all), AtP, the QK fix, GradDrop per layer and per sub-layer, AtP*, and on `nodes`
    verify and subset sampling. The twin pairs every model adapter is checked on."""
    import atp_minimal as atp
    kinds = exact_kinds or atp.KINDS
    return {
        "exact patching": (atp.activation_patching(model, clean, noise, metric, kinds=kinds, progress=False),
                           atp.activation_patching_reference(model, clean, noise, metric, kinds=kinds)),
        "AtP": (atp.atp_estimates(model, clean, noise, metric),
                atp.atp_estimates_reference(model, clean, noise, metric)),
        "AtP + QK fix": (atp.atp_estimates(model, clean, noise, metric, qk_fix=True),
                         atp.atp_qk_fix_reference(model, clean, noise, metric)),
        "GradDrop": (atp.grad_drop_scores(model, clean, noise, metric),
                     atp.grad_drop_scores_reference(model, clean, noise, metric)),
        "GradDrop, sub-layers": (atp.grad_drop_scores(model, clean, noise, metric, unit="sublayer"),
                                 atp.grad_drop_scores_reference(model, clean, noise, metric,
                                                                unit="sublayer")),
        "AtP*": (atp.atp_star(model, clean, noise, metric),
                 atp.atp_star_reference(model, clean, noise, metric)),
        "verify": (atp.verify(model, clean, noise, metric, nodes, len(nodes), progress=False)[1],
                   atp.verify_reference(model, clean, noise, metric, nodes, len(nodes))[1]),
        "subset sampling": (atp.subset_sampling(model, clean, noise, metric, nodes, 0.3, 10,
                                                progress=False)[1],
                            atp.subset_sampling_reference(model, clean, noise, metric, nodes, 0.3, 10)[1]),
    }


def resumed_vs_full(model, clean, splits):
    """How far model.forward_from(layer, the clean residual stream of positions P.., the cached resume sites
    of positions :P) is from the full forward's logits (from P on, and the last position alone), the
    largest over every layer and every P in splits; and the full logits (B, T, V)."""
    import atp_minimal as atp
    L = model.config.n_layer
    names = [f"blocks.{l}.{s}" for l in range(L) for s in ("hook_resid_pre",) + tuple(model.resume_sites)]
    worst = 0.0
    with torch.no_grad():
        full, cache = atp.run_with_cache(model, clean, names)
        for layer in range(L):
            for P in splits:
                past = None if P == 0 else [tuple(cache[f"blocks.{l}.{s}"][:, :P] for s in model.resume_sites)
                                            for l in range(layer, L)]
                resid = cache[f"blocks.{layer}.hook_resid_pre"][:, P:]
                worst = max(worst, max_diff(model.forward_from(layer, resid, None, past), full[:, P:]),
                            max_diff(model.forward_from(layer, resid, None, past, True), full[:, -1:]))
    return worst, full


def prompt_pair(B, T, vocab, seed=1, per_pair=True):
    """B clean/noise pairs of length T that differ at positions 1 and 3, and a logit-difference metric
    (answer and wrong tokens per pair, or the same for every pair). The adapters' tests share it."""
    import atp_minimal as atp
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, vocab, (B, T), generator=g)
    noise = clean.clone()
    noise[:, 1] = (clean[:, 1] + 11) % vocab
    noise[:, 3] = (clean[:, 3] + 23) % vocab
    ids = (torch.tensor([3, 4]), torch.tensor([5, 6])) if per_pair else (3, 5)
    return clean, noise, atp.logit_diff(*ids)


def protocol_site_cache(model, clean, H, Hkv, Dh, M, D):
    """Run the model and check every protocol site of every layer: the shape the protocol gives it, float64,
    and resid_pre of block l+1 the very tensor resid_post of block l is (GradDrop's fast form needs that).
    Returns {site name: tensor}."""
    import atp_minimal as atp
    B, T, L = clean.shape[0], clean.shape[1], model.config.n_layer
    shapes = {"hook_resid_pre": (B, T, D), "attn.hook_q": (B, T, H, Dh), "attn.hook_k": (B, T, Hkv, Dh),
              "attn.hook_v": (B, T, Hkv, Dh), "attn.hook_z": (B, T, H, Dh), "attn.hook_pattern": (B, H, T, T),
              "mlp.hook_post": (B, T, M), "hook_attn_out": (B, T, D), "hook_mlp_out": (B, T, D),
              "hook_resid_post": (B, T, D)}
    names = [f"blocks.{l}.{s}" for l in range(L) for s in shapes]
    _, cache = atp.run_with_cache(model, clean, names)
    for name in names:
        assert tuple(cache[name].shape) == shapes[name.split(".", 2)[2]], name
        assert cache[name].dtype == torch.float64
    for l in range(L - 1):
        assert cache[f"blocks.{l + 1}.hook_resid_pre"] is cache[f"blocks.{l}.hook_resid_post"]
    return cache
