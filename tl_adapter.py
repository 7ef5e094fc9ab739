"""
AtP* on TransformerLens models: present a `HookedTransformer` or a `TransformerBridge` through the
model protocol of atp_minimal.py, so that every public function there (exact patching, AtP, the QK
fix, GradDrop, AtP*, verify, the false-negative bound) runs on it unchanged. Nothing is copied or
edited: the adapter holds the user's model and runs it through TransformerLens's own hooks.

    import tl_adapter, atp_minimal as atp
    model = tl_adapter.adapt(tl_model)  # a HookedTransformer (2.18, 3.9) or a TransformerBridge (4.x)
    scores = atp.atp_star(model, clean, noise, metric)

References:
1) the AtP* paper: Kramar, Lieberum, Shah, Nanda (2024), https://arxiv.org/abs/2403.00745
2) TransformerLens, https://github.com/TransformerLensOrg/TransformerLens. 3.x: HookedTransformer.forward
   (start_at_layer, past_kv_cache), components/abstract_attention.py (hook_rot_q, attn_scale).
   4.x: model_bridge/generalized_components/ joint_qkv_attention.py (GPT-2),
   joint_qkv_position_embeddings_attention.py (GPT-NeoX), position_embeddings_attention.py (Llama, Qwen2)

TransformerLens versions, and what the adapter takes from each:
  HookedTransformer  2.18 and 3.9, the last lines that have it (3.9 tested in CI; 2.18's tests pass too)
  TransformerBridge  4.x (4.3 tested in CI), booted from GPT-2, GPT-NeoX (Pythia), Llama or Qwen2
                     (grouped-query attention), with or without enable_compatibility_mode()
Anything else (another version, a 3.x TransformerBridge, another architecture) is refused with a clear error.

Sites (ours -> TransformerLens). Our names are TransformerLens's, with one exception: our q and k are
the vectors whose dot product, times attention_scale(layer), IS the attention score, so on rotary models
they are the rotated ones.
  blocks.{l}.attn.hook_q, hook_k   -> attn.hook_q, hook_k (learned positions: GPT-2)
                                      attn.hook_rot_q, hook_rot_k (rotary HookedTransformers, and
                                      Llama and Qwen2 bridges)
                                      attn.hook_q, hook_k rotated by the adapter (GPT-NeoX bridges, below)
  blocks.{l}.attn.hook_q_unrotated -> attn.hook_q (rotary only; likewise hook_k_unrotated)
  any other TransformerLens hook   -> itself (hook_resid_pre, attn.hook_v, hook_z, hook_pattern,
                                      mlp.hook_post, hook_attn_out, hook_mlp_out, hook_resid_post, ...)
Rotary embedding is a fixed linear map per position, so patching a query or key before or after it
is the same intervention: a node "query of head h at position t" means the same thing either way.
With grouped-query attention k and v hold one entry per key-value head, (B, T, G, Dh), and
config.n_kv_head = G; q and z stay per query head.

Bridges, three things to know:
  - A bridge hands q, k, v and z to a hook reshaped into heads, and puts back only what the hook
    returns. The adapter's bridge hooks therefore always return a tensor (the one they were given,
    for a reading hook), so that the tensor a hook sees is the one the forward consumes.
  - A GPT-NeoX bridge fires hook_q and hook_k BEFORE its rotary embedding only (it registers
    hook_rot_q/k but never fires them). The adapter rotates them itself, with the cos and sin the
    bridge made in the same forward (rotary_emb.hook_cos/hook_sin), hands the rotated tensor to the
    hook, and gives the bridge the exact inverse rotation of what the hook returns, which the bridge
    then rotates again. (HF computes cos and sin in float32, so cos^2 + sin^2 is not exactly 1 in a
    float64 model: the inverse divides by it.)
  - forward_from (resuming a patched run at the patch's layer and position) only for GPT-NeoX, whose
    bridge's resumed logits equal its full forward's (tested). GPT-2 and Llama bridges ignore the
    key-value cache (with transformers 5.x), so their adapters have no forward_from and a patched run
    is a full forward: atp_minimal's protocol allows that, and the numbers are the same. The bridge's
    start_at_layer still runs the blocks below it, so resuming saves positions, not layers.

GradDrop's "layer l's residual write" is hook_attn_out + hook_mlp_out of block l, for sequential
(GPT-2, Llama) and parallel (Pythia) blocks alike: resid_post = resid_pre + attn_out + mlp_out in all.
Every adapter runs one short probe when it is made and refuses a model on which that identity, or
pattern = softmax(q.k * attention_scale + causal mask), or z = pattern @ v, fails.

Dimension legend: B batch, T query position, S key position, P cached earlier positions, H query heads,
G key-value heads, Dh d_head, R rotary features of a head, D d_model, M d_mlp, V vocab, L layers.
"""

from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import torch

HOOKED_VERSIONS = ("2.18", "3.9")  # major.minor of transformer-lens releases with HookedTransformer
BRIDGE_MAJOR = "4"  # transformer-lens 4.x: TransformerBridge (tested: 4.3)


@dataclass
class AdaptedConfig:
    """The config fields atp_minimal reads, in its names (TransformerLens's in the comments)."""
    n_layer: int  # n_layers
    n_head: int  # n_heads
    d_head: int  # d_head
    d_mlp: int  # d_mlp
    vocab_size: int  # d_vocab: token ids lie in [0, vocab_size)
    n_positions: int  # n_ctx
    n_kv_head: int  # n_key_value_heads, or n_heads without grouped-query attention


def adapt(model):
    """Wrap a TransformerLens HookedTransformer (2.18, 3.9) or TransformerBridge (4.x) for atp_minimal.
    Raises a clear error for a version or an architecture the adapter cannot handle correctly."""
    if is_a(model, "TransformerBridge"):
        family = BRIDGE_ARCHITECTURES.get(getattr(model.cfg, "architecture", None), (None,))[0]
        return (ResumableBridgeAdapter if family == "neox" else TransformerBridgeAdapter)(model)
    if is_a(model, "HookedTransformer"):
        return HookedTransformerAdapter(model)
    raise TypeError(f"tl_adapter.adapt needs a transformer_lens HookedTransformer "
                    f"(transformer-lens 2.18, 3.9) or TransformerBridge (4.x), got {type(model).__name__}")


def is_a(model, class_name):
    """Is model an instance of TransformerLens's class of that name? (By name: TransformerLens 4.x has
    no HookedTransformer to import, and 3.x has a TransformerBridge of its own.)"""
    return any(c.__name__ == class_name and c.__module__.startswith("transformer_lens")
               for c in type(model).__mro__)


# ==================================================================================================
# HookedTransformer (TransformerLens 2.18 and 3.9)
# ==================================================================================================

class HookedTransformerAdapter(torch.nn.Module):
    """A HookedTransformer seen through atp_minimal's model protocol. The wrapped model is a submodule,
    so parameters(), eval() and train() are the user's model's own."""

    def __init__(self, model):
        super().__init__()
        check_hooked_version()
        check_architecture(model)
        self.model = model
        self.train(model.training)  # the adapter's mode is the user's model's (eval_mode restores it)
        cfg = model.cfg
        self.config = AdaptedConfig(n_layer=cfg.n_layers, n_head=cfg.n_heads, d_head=cfg.d_head,
                                    d_mlp=cfg.d_mlp, vocab_size=cfg.d_vocab, n_positions=cfg.n_ctx,
                                    n_kv_head=cfg.n_heads)
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
            raise KeyError(unknown_site(name))
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
        out = checked_replacement(name, out, seen)
        return torch.cat([t[:, :cut], out], dim=1) if cut else out
    return hook


def checked_replacement(name, out, seen):
    """What a hook returned, if it is a tensor of the shape and dtype it was given; else a clear error."""
    if not isinstance(out, torch.Tensor) or out.shape != seen.shape or out.dtype != seen.dtype:
        got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"hook for {name} must return None or a tensor of shape {tuple(seen.shape)} "
                         f"and dtype {seen.dtype}, got {got}")
    return out


def unknown_site(name):
    return (f"unknown hook site {name!r}; sites are TransformerLens's hook names (model.hook_dict), "
            f"plus attn.hook_q_unrotated/hook_k_unrotated on rotary models")


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


# --- what the HookedTransformer adapter supports, and why


def installed_version():
    try:
        return version("transformer-lens")
    except PackageNotFoundError:
        raise ImportError("tl_adapter needs TransformerLens: pip install transformer-lens==3.9.0 "
                          "(HookedTransformer) or transformer-lens==4.3.0 (TransformerBridge)") from None


def check_hooked_version():
    installed = installed_version()
    if not any(installed == v or installed.startswith(v + ".") for v in HOOKED_VERSIONS):
        raise ImportError(f"tl_adapter adapts a HookedTransformer from transformer-lens "
                          f"{' and '.join(v + '.x' for v in HOOKED_VERSIONS)}, found {installed} "
                          f"(4.x replaced HookedTransformer with TransformerBridge, which the adapter "
                          f"takes from 4.x): pip install transformer-lens==3.9.0")


# cfg field -> (the value we need, why): each changes what a site means or how scores are formed
REQUIRED = {
    "attn_only": (False, "an attention-only model has no MLP neurons"),
    "n_key_value_heads": (None, "grouped-query attention in a HookedTransformer is untested with the adapter "
                                "(a TransformerBridge of a Llama or Qwen2 model is supported)"),
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
            problems.append(f"block {l} MLP is {type(getattr(block, 'mlp', None)).__name__}, not MLP "
                            f"(neurons are mlp.hook_post of a dense, ungated MLP; gated and "
                            f"mixture-of-experts MLPs are untested)")
    if problems:
        raise ValueError("tl_adapter cannot handle this HookedTransformer correctly:\n  "
                         + "\n  ".join(problems))


# ==================================================================================================
# TransformerBridge (TransformerLens 4.x)
# ==================================================================================================

# Hugging Face architecture -> (family, the bridge's attention and MLP components, by class name)
BRIDGE_ARCHITECTURES = {
    "GPT2LMHeadModel": ("gpt2", "JointQKVAttentionBridge", "MLPBridge"),
    "GPTNeoXForCausalLM": ("neox", "JointQKVPositionEmbeddingsAttentionBridge", "MLPBridge"),
    "LlamaForCausalLM": ("llama", "PositionEmbeddingsAttentionBridge", "GatedMLPBridge"),
    "Qwen2ForCausalLM": ("llama", "PositionEmbeddingsAttentionBridge", "GatedMLPBridge"),
}

# TransformerBridge cfg switches that reroute the attention or the MLP input: (the value we need, why)
BRIDGE_REQUIRED = {
    "use_split_qkv_input": (False, "separate q/k/v inputs per head are untested with the adapter: "
                                   "set_use_split_qkv_input(False)"),
    "use_attn_in": (False, "per-head attention inputs are untested with the adapter: set_use_attn_in(False)"),
    "use_attn_result": (False, "per-head results are untested with the adapter: set_use_attn_result(False)"),
    "attention_dir": ("causal", "atp_minimal assumes causal attention"),
    "load_in_4bit": (False, "4-bit weights"),
    "n_devices": (1, "models split across devices"),
}

# Hugging Face config fields that change how scores, the mask or the pattern are formed:
# field -> (the values that are fine, why)
HF_REQUIRED = {
    "use_sliding_window": ((None, False), "a sliding window masks keys the QK fix would count as visible"),
    "attn_logit_softcapping": ((None,), "scores are soft-capped, not q.k * scale"),
    "final_logit_softcapping": ((None,), "logits are soft-capped (untested)"),
    "add_cross_attention": ((None, False), "cross-attention"),
    "scale_attn_weights": ((None, True), "GPT-2 without score scaling (the bridge scales anyway)"),
    "reorder_and_upcast_attn": ((None, False), "GPT-2 scores upcast to float32 (untested)"),
}


class TransformerBridgeAdapter(torch.nn.Module):
    """A TransformerBridge (TransformerLens 4.x) seen through atp_minimal's model protocol. The wrapped
    bridge is a submodule, so parameters(), eval() and train() are the user's bridge's own."""

    def __init__(self, model):
        super().__init__()
        check_bridge_version()
        self.family = check_bridge_architecture(model)
        self.model = model
        self.train(model.training)  # the adapter's mode is the user's model's (eval_mode restores it)
        cfg = model.cfg
        self.config = AdaptedConfig(n_layer=cfg.n_layers, n_head=cfg.n_heads, d_head=cfg.d_head,
                                    d_mlp=cfg.d_mlp, vocab_size=cfg.d_vocab, n_positions=cfg.n_ctx,
                                    n_kv_head=cfg.n_key_value_heads or cfg.n_heads)
        # Our site name -> TransformerLens's, where they differ (see the module docstring). On NeoX our
        # q and k ARE at TransformerLens's hook_q/hook_k, rotated by the adapter (self.rotated).
        renamed = {"llama": {"hook_q": "hook_rot_q", "hook_k": "hook_rot_k", "hook_q_unrotated": "hook_q",
                             "hook_k_unrotated": "hook_k"},
                   "neox": {"hook_q_unrotated": "hook_q", "hook_k_unrotated": "hook_k"}}.get(self.family, {})
        L = cfg.n_layers
        self.renamed = {f"blocks.{l}.attn.{ours}": f"blocks.{l}.attn.{theirs}"
                        for l in range(L) for ours, theirs in renamed.items()}
        self.rotated = {f"blocks.{l}.attn.hook_{x}" for l in range(L) for x in "qk"
                        } if self.family == "neox" else set()
        # The bridge's softmax runs in float32 on Llama and Qwen2, also in a float64 model (as HF's does):
        # its pattern then matches q.k only to float32 precision.
        self.softmax_dtype = torch.float32 if self.family == "llama" else None
        check_site_identities(self)

    def attention_scale(self, layer):
        """The multiplier of q.k in the scores, as the bridge's attention computes it: HF's own
        attn.scaling on Llama and Qwen2; d_head^-1/2 on GPT-NeoX; on GPT-2 also divided by
        (layer + 1) with scale_attn_by_inverse_layer_idx."""
        attn = self.model.blocks[layer].attn
        scale = self.config.d_head ** -0.5
        if self.family == "llama":
            return float(getattr(attn.original_component, "scaling", scale))
        if self.family == "gpt2" and getattr(self.model.cfg, "scale_attn_by_inverse_layer_idx", False):
            return scale / float(attn._layer_idx + 1)
        return scale

    def forward(self, idx, hooks=None):
        """idx (B, T) token ids -> logits (B, T, V). hooks: our site name -> fn(tensor) -> None or a
        replacement. A hook is given the very tensor that the rest of the forward consumes."""
        return self.model.run_with_hooks(idx, fwd_hooks=self.tl_hooks(hooks))

    def tl_hooks(self, hooks):
        """Our hooks -> the bridge's fwd_hooks [(name, fn(tensor, hook))]. With a hook on a site the
        adapter rotates, two more that catch this forward's cos and sin, each (1 or B, T, R): rotary_emb
        runs once, before block 0, and every block rotates with what it returns."""
        rotary = {}
        out = []
        if any(name in self.rotated for name in hooks or {}):
            out += [(f"rotary_emb.hook_{x}", lambda t, hook, x=x: rotary.__setitem__(x, t))
                    for x in ("cos", "sin")]
        hook_points = self.model.hook_dict  # built anew at each access: once per forward
        for name, fn in (hooks or {}).items():
            rotated = rotary if name in self.rotated else None
            out.append((self.tl_name(name, hook_points), bridge_hook(name, fn, rotated)))
        return out

    def tl_name(self, name, hook_points=None):
        """Our site name -> the bridge's own name of that hook point; KeyError for a name that is neither.
        (The canonical name, not an alias: in compatibility mode a hook added under an alias runs once
        per name of its hook point.)"""
        tl = self.renamed.get(name, name)
        hook_point = (self.model.hook_dict if hook_points is None else hook_points).get(tl)
        if hook_point is None:
            raise KeyError(unknown_site(name))
        return hook_point.name or tl


class ResumableBridgeAdapter(TransformerBridgeAdapter):
    """A GPT-NeoX (Pythia) bridge, which also resumes a forward (forward_from): its Hugging Face model
    takes a key-value cache and derives the positions of the new tokens from it, and the tests check
    that the resumed logits equal the full forward's. (GPT-2 and Llama bridges ignore the cache.)"""

    resume_sites = ("attn.hook_k", "attn.hook_v")  # our k is rotated, as Hugging Face caches keys

    def forward_from(self, layer, resid, hooks=None, past=None, last_position_only=False):
        """Run the bridge from block `layer` on resid (n, T', D), the clean residual stream entering it at
        positions P..P+T'-1, where past holds, per layer layer..L-1, the clean (k, v) of positions :P,
        each (n, P, G, Dh) (P = 0 if past is None). Returns (n, T', V), or (n, 1, V) with
        last_position_only. Hooks see positions P.. only. The bridge's start_at_layer still runs the
        blocks below `layer` (on resid, and discards them): they get zero keys and values."""
        from transformers import DynamicCache
        cache = None
        if past is not None:
            if len(past) != self.config.n_layer - layer:
                raise ValueError(f"past needs one entry per layer from {layer} on, got {len(past)}")
            cache = DynamicCache()
            unused = torch.zeros_like(past[0][0]).transpose(1, 2)  # (n, G, P, Dh)
            for l in range(self.config.n_layer):
                k, v = (unused, unused) if l < layer else (t.transpose(1, 2) for t in past[l - layer])
                cache.update(k, v, l)  # Hugging Face's layout: (n, G, P, Dh)
        logits = self.model.run_with_hooks(resid, fwd_hooks=self.tl_hooks(hooks), start_at_layer=layer,
                                           past_key_values=cache)  # (n, T', V)
        return logits[:, -1:] if last_position_only else logits


def bridge_hook(name, fn, rotary=None):
    """Our hook fn(tensor) -> None | tensor as a bridge hook fn(tensor, hook) that always returns a tensor
    (a bridge uses only what a hook returns). rotary: None, or the dict that receives this forward's
    cos and sin; then the hook sees the rotated tensor, and the bridge gets back its exact inverse."""
    def hook(t, hook):
        seen = t if rotary is None else rotate(t, rotary["cos"], rotary["sin"])
        out = fn(seen)
        out = seen if out is None else checked_replacement(name, out, seen)
        return out if rotary is None else unrotate(out, rotary["cos"], rotary["sin"])
    return hook


def rotate(x, cos, sin):
    """GPT-NeoX's rotary embedding (HF's rotate-half form) of x (B, T, H, Dh), on its first R = cos.shape[-1]
    features: feature pairs (i, i + R/2) go (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin). cos, sin:
    (1 or B, T, R). The same operations in the same order as the bridge, so the same numbers."""
    R = cos.shape[-1]
    cos, sin = cos[:, :, None], sin[:, :, None]  # (., T, 1, R): the same for every head
    x_rot, x_pass = x[..., :R], x[..., R:]  # (B, T, H, R), (B, T, H, Dh - R)
    half = torch.cat((-x_rot[..., R // 2:], x_rot[..., :R // 2]), dim=-1)  # rotate_half(x_rot)
    return torch.cat([x_rot * cos + half * sin, x_pass], dim=-1)  # (B, T, H, Dh)


def unrotate(y, cos, sin):
    """The inverse of rotate. Per pair the map is [[c1, -s1], [s2, c2]] (c1 = cos[:R/2], c2 = cos[R/2:],
    likewise s), whose inverse is [[c2, s1], [-s2, c1]] / (c1 c2 + s1 s2); the determinant is 1 only to
    the precision of cos and sin (HF computes them in float32), so divide by it."""
    R = cos.shape[-1]
    c1, c2 = cos[:, :, None, :R // 2], cos[:, :, None, R // 2:]  # (., T, 1, R/2) each
    s1, s2 = sin[:, :, None, :R // 2], sin[:, :, None, R // 2:]
    y1, y2 = y[..., :R // 2], y[..., R // 2:R]  # (B, T, H, R/2) each
    det = c1 * c2 + s1 * s2
    x1, x2 = (c2 * y1 + s1 * y2) / det, (c1 * y2 - s2 * y1) / det  # (B, T, H, R/2) each
    return torch.cat([x1, x2, y[..., R:]], dim=-1)  # (B, T, H, Dh)


# --- what the TransformerBridge adapter supports, and why


def check_bridge_version():
    installed = installed_version()
    if installed.split(".")[0] != BRIDGE_MAJOR:
        raise ImportError(f"tl_adapter adapts a TransformerBridge from transformer-lens {BRIDGE_MAJOR}.x "
                          f"(tested: 4.3), found {installed}; on {installed} adapt a HookedTransformer, "
                          f"or pip install transformer-lens==4.3.0")


def check_bridge_architecture(model):
    """Refuse, with the reason, every TransformerBridge the adapter cannot handle correctly. Returns the
    family: "gpt2", "neox" or "llama" (Llama and Qwen2)."""
    cfg = model.cfg
    architecture = getattr(cfg, "architecture", None)
    if architecture not in BRIDGE_ARCHITECTURES:
        raise ValueError(f"tl_adapter cannot handle a TransformerBridge of {architecture}: it handles "
                         f"{', '.join(BRIDGE_ARCHITECTURES)} (each has its own way of forming q, k and the "
                         f"scores, checked in tests/test_tl_adapter_bridge.py)")
    family, attention, mlp = BRIDGE_ARCHITECTURES[architecture]
    problems = []
    for field, (want, why) in BRIDGE_REQUIRED.items():
        have = getattr(cfg, field, want)
        if have != want:
            problems.append(f"{field}={have!r} ({why})")
    hf_config = model.original_model.config
    for field, (fine, why) in HF_REQUIRED.items():
        have = getattr(hf_config, field, None)
        if have not in fine:
            problems.append(f"{field}={have!r} ({why})")
    layer_types = getattr(hf_config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        problems.append(f"layer_types={layer_types} (only full attention: a sliding window masks keys "
                        f"the QK fix would count as visible)")
    for l, block in enumerate(model.blocks):
        have = type(block.attn).__name__, type(getattr(block, "mlp", None)).__name__
        if have != (attention, mlp):
            problems.append(f"block {l} has {have[0]} and {have[1]}, not {attention} and {mlp}")
        elif family == "llama":
            hf_attn = block.attn.original_component
            for part, why in (("q_norm", "QK normalisation"), ("sinks", "attention sinks"),
                              ("key_multiplier", "a key multiplier")):
                if getattr(hf_attn, part, None) is not None or part in block.attn.submodules:
                    problems.append(f"block {l} attention has {part} ({why}: untested)")
    if problems:
        raise ValueError(f"tl_adapter cannot handle this TransformerBridge ({architecture}) correctly:\n  "
                         + "\n  ".join(problems))
    return family


# ==================================================================================================
# Both: the probe every adapter runs when it is made
# ==================================================================================================

def check_site_identities(adapted, T=4):
    """Run one short probe and check what atp_minimal relies on, per layer (a backstop for
    architecture features the config checks do not know):
      pattern = softmax(q.k * attention_scale + causal mask), z = pattern @ v,
      resid_post = resid_pre + attn_out + mlp_out, and block l+1 consumes block l's resid_post itself."""
    cfg = adapted.config
    T = min(T, cfg.n_positions)
    idx = (torch.arange(T, device=next(adapted.parameters()).device) * 7 % cfg.vocab_size)[None]  # (1, T)
    L, what = cfg.n_layer, type(adapted.model).__name__
    names = [f"blocks.{l}.{s}" for l in range(L) for s in ("attn.hook_q", "attn.hook_k", "attn.hook_v",
             "attn.hook_pattern", "attn.hook_z", "hook_resid_pre", "hook_attn_out", "hook_mlp_out",
             "hook_resid_post")]
    cache = {}
    was_training = adapted.training
    adapted.eval()  # no dropout (a Hugging Face model built from a config has it)
    try:
        with torch.no_grad():
            adapted(idx, hooks={n: (lambda t, n=n: cache.__setitem__(n, t)) for n in names})
    finally:
        adapted.train(was_training)
    dtype = cache[names[0]].dtype
    tolerance = {torch.float64: 1e-9, torch.float32: 1e-4}
    tol = tolerance.get(dtype, 2e-2)  # relative to each tensor's size
    pattern_tol = max(tol, tolerance.get(getattr(adapted, "softmax_dtype", None) or dtype, 2e-2))
    causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()  # (T, S)
    H, G = cfg.n_head, cfg.n_kv_head
    for l in range(L):
        c = {n.split(".", 2)[2]: cache[n].double() for n in names if n.startswith(f"blocks.{l}.")}
        q = c["attn.hook_q"].transpose(1, 2)  # (1, H, T, Dh)
        k, v = (c[f"attn.hook_{x}"].transpose(1, 2).repeat_interleave(H // G, dim=1)
                for x in "kv")  # (1, H, S, Dh): key-value head g serves query heads g*H/G..
        scores = (q @ k.transpose(-1, -2)) * adapted.attention_scale(l)  # (1, H, T, S)
        pattern = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        checks = {"pattern = softmax(q.k * attention_scale(l), causal)":
                      (c["attn.hook_pattern"], pattern, pattern_tol),
                  "z = pattern @ v": (c["attn.hook_z"], (c["attn.hook_pattern"] @ v).transpose(1, 2), tol),
                  "resid_post = resid_pre + attn_out + mlp_out":
                      (c["hook_resid_post"],
                       c["hook_resid_pre"] + c["hook_attn_out"] + c["hook_mlp_out"], tol)}
        for claim, (got, want, tol_here) in checks.items():
            err = (got - want).abs().max().item()
            if not err <= tol_here * max(1.0, want.abs().max().item()):
                raise ValueError(f"tl_adapter cannot handle this {what}: in layer {l}, {claim} "
                                 f"fails by {err:.3g} on a probe input")
        if l + 1 < L and cache[f"blocks.{l + 1}.hook_resid_pre"] is not cache[f"blocks.{l}.hook_resid_post"]:
            raise ValueError(f"tl_adapter cannot handle this {what}: block {l + 1} does not consume "
                             f"block {l}'s hook_resid_post tensor itself (GradDrop relies on it)")
