"""
AtP* on TransformerLens models: present a `HookedTransformer` through the model protocol of
atp_minimal.py, so that every public function there (exact patching, AtP, the QK fix, GradDrop,
AtP*, verify, the false-negative bound) runs on it unchanged. Nothing is copied or edited: the
adapter holds the user's model and runs it through TransformerLens's own hooks.

    import tl_adapter, atp_minimal as atp
    model = tl_adapter.adapt(hooked_transformer)
    scores = atp.atp_star(model, clean, noise, metric)

References:
1) the AtP* paper: Kramar, Lieberum, Shah, Nanda (2024), https://arxiv.org/abs/2403.00745
2) TransformerLens, https://github.com/TransformerLensOrg/TransformerLens: HookedTransformer.forward
   (start_at_layer, past_kv_cache), components/abstract_attention.py (hook_rot_q, attn_scale)

TransformerLens versions: 3.9 (tested in CI) and 2.18 (its tests pass there too), the last lines that
have HookedTransformer (4.x replaced it with TransformerBridge). Others are refused with a clear error.

Sites (ours -> TransformerLens). Our names are TransformerLens's, with one exception: our q and k
are the vectors whose dot product IS the attention score, so on rotary models (Pythia, GPT-NeoX)
they are the rotated ones.
  blocks.{l}.attn.hook_q, hook_k   -> attn.hook_q, hook_k (learned positions, GPT-2)
                                      attn.hook_rot_q, hook_rot_k (rotary)
  blocks.{l}.attn.hook_q_unrotated -> attn.hook_q (rotary only; likewise hook_k_unrotated)
  any other TransformerLens hook   -> itself (hook_resid_pre, attn.hook_v, hook_z, hook_pattern,
                                      mlp.hook_post, hook_attn_out, hook_mlp_out, hook_resid_post, ...)
Rotary embedding is a fixed linear map per position, so patching a query or key before or after it
is the same intervention: a node "query of head h at position t" means the same thing either way.

GradDrop's "layer l's residual write" is hook_attn_out + hook_mlp_out of block l, for sequential
(GPT-2) and parallel (Pythia) blocks alike: resid_post = resid_pre + attn_out + mlp_out in both.

Dimension legend: B batch, T query position, S key position, P cached earlier positions,
H heads, Dh d_head, D d_model, M d_mlp, V vocab, L layers.
"""

from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import torch

SUPPORTED_VERSIONS = ("2.18", "3.9")  # major.minor of transformer-lens releases with HookedTransformer


@dataclass
class AdaptedConfig:
    """The config fields atp_minimal reads, in its names (TransformerLens's in the comments)."""
    n_layer: int  # n_layers
    n_head: int  # n_heads
    d_head: int  # d_head
    d_mlp: int  # d_mlp
    vocab_size: int  # d_vocab: token ids lie in [0, vocab_size)
    n_positions: int  # n_ctx


def adapt(model):
    """Wrap a TransformerLens HookedTransformer for atp_minimal. Raises a clear error for a
    TransformerLens version or an architecture the adapter cannot handle correctly."""
    return HookedTransformerAdapter(model)


class HookedTransformerAdapter(torch.nn.Module):
    """A HookedTransformer seen through atp_minimal's model protocol. The wrapped model is a submodule,
    so parameters(), eval() and train() are the user's model's own."""

    def __init__(self, model):
        super().__init__()
        check_version()
        check_architecture(model)
        self.model = model
        self.train(model.training)  # the adapter's mode is the user's model's (eval_mode restores it)
        cfg = model.cfg
        self.config = AdaptedConfig(n_layer=cfg.n_layers, n_head=cfg.n_heads, d_head=cfg.d_head,
                                    d_mlp=cfg.d_mlp, vocab_size=cfg.d_vocab, n_positions=cfg.n_ctx)
        self.rotary = cfg.positional_embedding_type == "rotary"
        # Our site name -> TransformerLens's, where they differ (see the module docstring).
        renamed = {"hook_q": "hook_rot_q", "hook_k": "hook_rot_k", "hook_q_unrotated": "hook_q",
                   "hook_k_unrotated": "hook_k"} if self.rotary else {}
        self.renamed = {f"blocks.{l}.attn.{ours}": f"blocks.{l}.attn.{theirs}"
                        for l in range(cfg.n_layers) for ours, theirs in renamed.items()}
        # The clean values forward_from takes as `past`: TransformerLens caches keys BEFORE rotating
        # them (it rotates the whole key sequence again at every step), so rotary models need those.
        self.resume_sites = ("attn.hook_k_unrotated" if self.rotary else "attn.hook_k", "attn.hook_v")
        check_site_identities(self)

    def attention_scale(self, layer):
        """The multiplier of q.k in the scores: TransformerLens divides by attn.attn_scale, which is
        sqrt(d_head) by default and includes any per-layer factor."""
        return 1.0 / float(self.model.blocks[layer].attn.attn_scale)

    def forward(self, idx, hooks=None):
        """idx (B, T) token ids -> logits (B, T, V). hooks: our site name -> fn(tensor) -> None or a
        replacement. A hook is given the very tensor that the rest of the forward consumes."""
        # padding_side="right": with a left-padding tokenizer, TransformerLens would build an attention
        # mask from the pad token (often BOS's id too); our prompts are token tensors, never padded.
        return self.model.run_with_hooks(idx, fwd_hooks=self.tl_hooks(hooks), padding_side="right")

    def forward_from(self, layer, resid, hooks=None, past=None, last_position_only=False):
        """Run blocks layer..L-1 and the unembedding on resid (n, T', D), the clean residual stream
        entering block `layer` at positions P..P+T'-1, where past holds, per layer layer..L-1, the
        clean values at self.resume_sites of positions :P, each (n, P, H, Dh) (P = 0 if past is None).
        TransformerLens's own start_at_layer and key-value cache do the work. Returns (n, T', V),
        or (n, 1, V) with last_position_only. Hooks see positions P.. only."""
        L = self.config.n_layer
        P = 0
        cache = None
        if past is not None:
            if len(past) != L - layer:
                raise ValueError(f"past needs one entry per layer from {layer} on, got {len(past)}")
            P = past[0][0].shape[1]
            cache = kv_cache(past, layer, P)
        with self.model.hooks(fwd_hooks=self.tl_hooks(hooks, P)):
            if not last_position_only:
                return self.model(resid, start_at_layer=layer, past_kv_cache=cache)  # (n, T', V)
            x = self.model(resid, start_at_layer=layer, stop_at_layer=L, past_kv_cache=cache)  # (n, T', D)
            # The tail of HookedTransformer.forward, unembedding the last position only (the tests
            # check it against the full forward): final norm, unembed, optional logit soft cap.
            if self.model.cfg.normalization_type is not None:
                x = self.model.ln_final(x)
            logits = self.model.unembed(x[:, -1:])  # (n, 1, V)
            cap = self.model.cfg.output_logits_soft_cap
            return cap * torch.tanh(logits / cap) if cap is not None and cap > 0 else logits

    def tl_name(self, name):
        """Our site name -> the TransformerLens hook name; KeyError for a name that is neither."""
        tl = self.renamed.get(name, name)
        if tl not in self.model.hook_dict:
            raise KeyError(f"unknown hook site {name!r}; sites are TransformerLens's hook names "
                           f"(model.hook_dict), plus attn.hook_q_unrotated/hook_k_unrotated on rotary models")
        return tl

    def tl_hooks(self, hooks, past=0):
        """Our hooks -> TransformerLens fwd_hooks [(name, fn(tensor, hook))]. On a resumed run (past
        P > 0) the rotated keys hold the cached positions too, (n, P + T', H, Dh): the hook sees only
        positions P.. like every other site, and the cached ones are put back in front."""
        out = []
        for name, fn in (hooks or {}).items():
            tl = self.tl_name(name)
            cut = past if self.rotary and tl.endswith("attn.hook_rot_k") else 0
            out.append((tl, tl_hook(name, fn, cut)))
        return out


def tl_hook(name, fn, cut=0):
    """Our hook fn(tensor) -> None | tensor as a TransformerLens hook fn(tensor, hook). cut: leading
    positions the hook does not see (they are kept as they are)."""
    def hook(t, hook):
        seen = t[:, cut:] if cut else t
        out = fn(seen)
        if out is None:  # a reading hook: TransformerLens keeps t
            return None
        if not isinstance(out, torch.Tensor) or out.shape != seen.shape or out.dtype != seen.dtype:
            got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"hook for {name} must return None or a tensor of shape {tuple(seen.shape)} "
                             f"and dtype {seen.dtype}, got {got}")
        return torch.cat([t[:, :cut], out], dim=1) if cut else out
    return hook


def kv_cache(past, layer, P):
    """A frozen TransformerLens key-value cache: the given (k, v), each (n, P, H, Dh), for layers
    layer..L-1; empty entries before (never read, as the run starts at `layer`)."""
    try:  # 3.x
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache as Cache
        from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry as Entry
    except ImportError:  # 2.x
        from transformer_lens.past_key_value_caching import HookedTransformerKeyValueCache as Cache
        from transformer_lens.past_key_value_caching import HookedTransformerKeyValueCacheEntry as Entry
    k0, _ = past[0]
    empty = k0[:, :0]  # (n, 0, H, Dh)
    entries = [Entry(empty, empty, frozen=True) for _ in range(layer)]
    entries += [Entry(k, v, frozen=True) for k, v in past]
    mask = torch.ones(k0.shape[0], P, dtype=torch.int, device=k0.device)  # (n, P): no padding
    return Cache(entries=entries, previous_attention_mask=mask, frozen=True)


# --- what the adapter supports, and why


def check_version():
    try:
        installed = version("transformer-lens")
    except PackageNotFoundError:
        raise ImportError("tl_adapter needs TransformerLens: pip install transformer-lens==3.9.0") from None
    if not any(installed == v or installed.startswith(v + ".") for v in SUPPORTED_VERSIONS):
        raise ImportError(f"tl_adapter supports transformer-lens {' and '.join(v + '.x' for v in SUPPORTED_VERSIONS)} "
                          f"(HookedTransformer; 4.x replaced it with TransformerBridge), found {installed}: "
                          f"pip install transformer-lens==3.9.0")


# cfg field -> (the value we need, why): each changes what a site means or how scores are formed
REQUIRED = {
    "attn_only": (False, "an attention-only model has no MLP neurons"),
    "n_key_value_heads": (None, "grouped-query attention: a key/value head serves several query heads, "
                                "so a key node is no single head's"),
    "attention_dir": ("causal", "atp_minimal assumes causal attention"),
    "attn_types": (None, "local (windowed) attention masks keys the QK fix would count as visible"),
    "use_attention_sinks": (False, "attention sinks: pattern rows do not sum to 1"),
    "use_logn_attn": (False, "log-n scaling multiplies queries after hook_q/hook_rot_q"),
    "use_qk_norm": (False, "QK normalisation changes queries and keys after hook_q/hook_k"),
    "clip_qkv": (None, "clipping changes queries and keys after hook_q/hook_k"),
    "use_split_qkv_input": (False, "separate q/k/v inputs per head are untested with the adapter"),
    "use_attn_in": (False, "per-head attention inputs are untested with the adapter"),
    "load_in_4bit": (False, "4-bit weights"),
    "n_devices": (1, "models split across devices"),
}


def check_architecture(model):
    """Refuse, with the reason, every HookedTransformer the adapter cannot handle correctly."""
    from transformer_lens import HookedTransformer
    if not isinstance(model, HookedTransformer):
        raise TypeError(f"tl_adapter.adapt needs a transformer_lens.HookedTransformer, got {type(model).__name__}")
    cfg = model.cfg
    problems = []
    if cfg.positional_embedding_type not in ("standard", "rotary"):
        problems.append(f"positional_embedding_type={cfg.positional_embedding_type!r} (the QK fix recomputes "
                        f"scores as q.k * scale; only 'standard' and 'rotary' have nothing else in them)")
    soft_cap = getattr(cfg, "attn_scores_soft_cap", -1.0)
    if soft_cap is not None and soft_cap > 0:
        problems.append(f"attn_scores_soft_cap={soft_cap} (scores are not q.k * scale)")
    for field, (want, why) in REQUIRED.items():
        have = getattr(cfg, field, want)
        if field == "attn_types" and have is not None and all(t == "global" for t in have):
            continue
        if have != want:
            problems.append(f"{field}={have!r} ({why})")
    for l, block in enumerate(model.blocks):
        if type(block.attn).__name__ != "Attention":
            problems.append(f"block {l} attention is {type(block.attn).__name__}, not Attention")
        if type(getattr(block, "mlp", None)).__name__ != "MLP":
            problems.append(f"block {l} MLP is {type(getattr(block, 'mlp', None)).__name__}, not MLP (neurons are "
                            f"mlp.hook_post of a dense, ungated MLP; gated and mixture-of-experts MLPs are untested)")
    if problems:
        raise ValueError("tl_adapter cannot handle this HookedTransformer correctly:\n  " + "\n  ".join(problems))


def check_site_identities(adapted, T=4):
    """Run one short probe and check what atp_minimal relies on, per layer (a backstop for
    architecture features the config checks do not know):
      pattern = softmax(q.k * attention_scale + causal mask), z = pattern @ v,
      resid_post = resid_pre + attn_out + mlp_out, and block l+1 consumes block l's resid_post itself."""
    cfg = adapted.config
    T = min(T, cfg.n_positions)
    idx = (torch.arange(T, device=next(adapted.parameters()).device) * 7 % cfg.vocab_size)[None]  # (1, T)
    L = cfg.n_layer
    names = [f"blocks.{l}.{s}" for l in range(L) for s in ("attn.hook_q", "attn.hook_k", "attn.hook_v",
             "attn.hook_pattern", "attn.hook_z", "hook_resid_pre", "hook_attn_out", "hook_mlp_out",
             "hook_resid_post")]
    cache = {}
    with torch.no_grad():
        adapted(idx, hooks={n: (lambda t, n=n: cache.__setitem__(n, t)) for n in names})
    dtype = cache[names[0]].dtype
    tol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 2e-2)  # relative to each tensor's size
    causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()  # (T, S)
    for l in range(L):
        c = {n.split(".", 2)[2]: cache[n].double() for n in names if n.startswith(f"blocks.{l}.")}
        q, k, v = c["attn.hook_q"].transpose(1, 2), c["attn.hook_k"].transpose(1, 2), c["attn.hook_v"].transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)) * adapted.attention_scale(l)  # (1, H, T, S)
        pattern = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        checks = {"pattern = softmax(q.k * attention_scale(l), causal)": (c["attn.hook_pattern"], pattern),
                  "z = pattern @ v": (c["attn.hook_z"], (c["attn.hook_pattern"] @ v).transpose(1, 2)),
                  "resid_post = resid_pre + attn_out + mlp_out":
                      (c["hook_resid_post"], c["hook_resid_pre"] + c["hook_attn_out"] + c["hook_mlp_out"])}
        for what, (got, want) in checks.items():
            err = (got - want).abs().max().item()
            if not err <= tol * max(1.0, want.abs().max().item()):
                raise ValueError(f"tl_adapter cannot handle this HookedTransformer: in layer {l}, {what} "
                                 f"fails by {err:.3g} on a probe input")
        if l + 1 < L and cache[f"blocks.{l + 1}.hook_resid_pre"] is not cache[f"blocks.{l}.hook_resid_post"]:
            raise ValueError(f"tl_adapter cannot handle this HookedTransformer: block {l + 1} does not consume "
                             f"block {l}'s hook_resid_post tensor itself (GradDrop relies on it)")
