"""
AtP* on Hugging Face models: present a `transformers` causal LM through the model protocol of
atp_minimal.py, so that every public function there (exact patching, AtP, the QK fix, GradDrop,
AtP*, verify, the false-negative bound) runs on it unchanged. Nothing is copied: the adapter holds
the user's model and reads and writes its activations with hooks that live only for one call.

    import hf_adapter, atp_minimal as atp
    model = hf_adapter.adapt(hf_model)          # e.g. GPTNeoXForCausalLM.from_pretrained(...)
    scores = atp.atp_star(model, clean, noise, metric)

References:
1) the AtP* paper: Kramar, Lieberum, Shah, Nanda (2024), https://arxiv.org/abs/2403.00745
2) transformers, https://github.com/huggingface/transformers: models/{gpt2,gpt_neox,llama,qwen2,
   mistral}/modeling_*.py (eager_attention_forward, repeat_kv), and the attention interface
   https://huggingface.co/docs/transformers/en/attention_interface

Models: GPT2LMHeadModel, GPTNeoXForCausalLM (Pythia), LlamaForCausalLM (grouped-query attention
included), Qwen2ForCausalLM and MistralForCausalLM (the last without a sliding window).
transformers versions: 5.24 (tested) and later 5.x releases; others are refused with a clear error.

How the sites are read. Attention runs through one function registered with transformers'
AttentionInterface and selected only for the duration of each call; transformers hands it q and k
after the rotary embedding, so our q and k are the vectors whose dot product IS the score, with the
module's own scaling. Everything else comes from PyTorch module hooks registered for the call and
removed after it:
  blocks.{l}.hook_resid_pre          (B, T, D)        forward pre-hook on decoder layer l
  blocks.{l}.attn.hook_q             (B, T, H, Dh)    after rotary (the attention function)
  blocks.{l}.attn.hook_k, hook_v     (B, T, G, Dh)    after rotary, before the grouped-query repeat
  blocks.{l}.attn.hook_attn_scores   (B, H, T, S)     q . k * scale, -inf above the diagonal
  blocks.{l}.attn.hook_pattern       (B, H, T, S)     softmax over keys
  blocks.{l}.attn.hook_z             (B, T, H, Dh)    pattern @ v: what the output projection reads
  blocks.{l}.mlp.hook_post           (B, T, M)        forward pre-hook on the down projection (GPT-2
                                                      mlp.c_proj, NeoX mlp.dense_4h_to_h, Llama, Qwen2
                                                      and Mistral mlp.down_proj): act(gate) * up there
  blocks.{l}.hook_attn_out           (B, T, D)        the attention module's output[0]
  blocks.{l}.hook_mlp_out            (B, T, D)        the MLP's output
  blocks.{l}.hook_resid_post         (B, T, D)        the layer's output = resid_pre + attn_out + mlp_out,
                                                      for sequential and parallel (NeoX) blocks alike
With grouped-query attention (G = n_kv_head < n_head) query head h reads key/value head
h // (n_head // n_kv_head), as transformers' repeat_kv does; k and v nodes are key/value heads.

Resuming. forward_from runs the decoder layers itself from a layer and a position: rotary models get
the positions P.. as the model's own forward would make them, and the attention function puts the
cached clean keys and values of positions :P (resume_sites: the post-rotary k and v) in front of the
new ones. No transformers cache object is involved. Tested equal to the full forward (float64).

Numerics. The registered attention computes the softmax in the model's dtype, or in float32 for
16-bit models (HF's eager attention runs it in float32 even in float64 NeoX and Llama models), so a
float64 model stays float64 there. HF's rotary cos/sin and Llama/Qwen2 RMSNorm work in float32 in
every model: the adapter leaves them alone (a float64 Llama or Qwen2 is float32-accurate at its
norms; every comparison in the tests still holds to 1e-10). bf16/fp16 models run as they are; site
tensors are in the model's dtype, and atp_minimal's metrics and estimates promote to float32, so
effects and scores come back in float32 (with bf16-sized rounding in the forward passes themselves).

Devices. Hooks and tensors follow each module's device, so a model spread with accelerate's
device_map runs as it is; the token ids go to the device of the input embedding. Tested on CPU only:
a model dispatched by accelerate with one layer offloaded to disk gives the plain model's results.

Refused, with the feature named: sliding-window attention, ALiBi, attention or logit soft-capping,
mixture-of-experts MLPs, cross-attention, rotary scalings other than default/linear/llama3, padding
masks (an attention_mask), gradient checkpointing in training mode, and architectures not listed
above.

Dimension legend: B batch, T query position, S key position, P cached earlier positions, H query
heads, G key/value heads (H without grouped-query attention), Dh d_head, D d_model, M d_mlp, V vocab,
L layers.
"""

import contextvars
from contextlib import contextmanager
from dataclasses import dataclass

import torch

ATTENTION = "atp_minimal"  # the name the adapter's attention function is registered under
SUPPORTED_VERSIONS = ((5, 24), (6, 0))  # transformers >= 5.24, < 6


@dataclass
class AdaptedConfig:
    """The config fields atp_minimal reads, in its names (Hugging Face's in the comments)."""
    n_layer: int  # num_hidden_layers
    n_head: int  # num_attention_heads: query heads
    n_kv_head: int  # num_key_value_heads: = n_head without grouped-query attention
    d_head: int  # the attention module's head_dim
    d_mlp: int  # the down projection's input width (intermediate_size, n_inner)
    d_model: int  # hidden_size
    vocab_size: int  # token ids lie in [0, vocab_size)
    n_positions: int  # max_position_embeddings


@dataclass
class Family:
    """Where the parts of one architecture live, as attribute paths from the CausalLM."""
    layers: str  # the decoder layers, an nn.ModuleList
    attn: str  # attention module, inside a layer
    mlp: str  # MLP module, inside a layer
    down: str  # the MLP's output projection, inside a layer: its input are the neurons
    final_norm: str  # the norm before the unembedding
    rotary: str = None  # the rotary-embedding module (cos, sin per position), if any


LLAMA_LIKE = Family("model.layers", "self_attn", "mlp", "mlp.down_proj", "model.norm", "model.rotary_emb")
FAMILIES = {
    "GPT2LMHeadModel": Family("transformer.h", "attn", "mlp", "mlp.c_proj", "transformer.ln_f"),
    "GPTNeoXForCausalLM": Family("gpt_neox.layers", "attention", "mlp", "mlp.dense_4h_to_h",
                                 "gpt_neox.final_layer_norm", "gpt_neox.rotary_emb"),
    "LlamaForCausalLM": LLAMA_LIKE,
    "Qwen2ForCausalLM": LLAMA_LIKE,
    "MistralForCausalLM": LLAMA_LIKE,
}
# Architectures that are refused by name, with the feature that stops them.
KNOWN_UNSUPPORTED = {
    "BloomForCausalLM": "ALiBi position biases (scores are not q . k * scale)",
    "MptForCausalLM": "ALiBi position biases (scores are not q . k * scale)",
    "FalconForCausalLM": "ALiBi position biases in some configs, and fused parallel attention",
    "Gemma2ForCausalLM": "attention logit soft-capping (scores are not q . k * scale) and sliding windows",
    "Gemma3ForCausalLM": "sliding-window attention and query/key norms",
    "MixtralForCausalLM": "mixture-of-experts MLPs (neurons are per expert, routed per token)",
    "Qwen2MoeForCausalLM": "mixture-of-experts MLPs (neurons are per expert, routed per token)",
    "OlmoeForCausalLM": "mixture-of-experts MLPs (neurons are per expert, routed per token)",
}
ROPE_TYPES = ("default", "linear", "llama3")  # fixed frequencies per position
RESID_SITES = ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post", "mlp.hook_post")
ATTN_SITES = ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_attn_scores", "attn.hook_pattern",
              "attn.hook_z")


def adapt(hf_model):
    """Wrap a transformers causal LM for atp_minimal, without copying its weights. Raises a clear
    error for a transformers version, an architecture or a feature the adapter cannot handle."""
    return HFAdapter(hf_model)


class HFAdapter(torch.nn.Module):
    """A transformers causal LM seen through atp_minimal's model protocol. The wrapped model is a
    submodule, so parameters(), eval() and train() are the user's model's own; the adapter's
    `training` is the wrapped model's."""

    def __init__(self, hf_model):
        super().__init__()
        check_version()
        self.family = check_architecture(hf_model)
        self.model = hf_model
        register_attention()
        cfg = hf_model.config
        layers = get(hf_model, self.family.layers)
        attn, down = get(layers[0], self.family.attn), get(layers[0], self.family.down)
        d_head = getattr(attn, "head_dim", None) or attn.head_size  # NeoX calls it head_size
        n_head = cfg.num_attention_heads
        self.config = AdaptedConfig(
            n_layer=len(layers), n_head=n_head,
            n_kv_head=getattr(cfg, "num_key_value_heads", None) or n_head, d_head=d_head,
            d_mlp=down.weight.shape[0] if type(down).__name__ == "Conv1D" else down.in_features,
            d_model=cfg.hidden_size, vocab_size=min(hf_model.get_input_embeddings().num_embeddings,
                                                    hf_model.get_output_embeddings().out_features),
            n_positions=cfg.max_position_embeddings)
        self.resume_sites = ("attn.hook_k", "attn.hook_v")  # post-rotary: resuming never re-rotates
        # The configs whose attention implementation a call switches (and restores): the model's, and any
        # submodel's that is not the same object.
        configs = {id(m.config): m.config for m in hf_model.modules()
                   if hasattr(getattr(m, "config", None), "_attn_implementation_internal")}
        self.configs = list(configs.values())
        self.sites = set(self.site_names())
        check_site_identities(self)

    # --- the protocol

    @property
    def training(self):
        return self.model.training if "model" in self._modules else False

    @training.setter
    def training(self, mode):
        pass  # nn.Module.train() sets it, then recurses into the wrapped model, which holds the mode

    def attention_scale(self, layer):
        """The multiplier of q . k in the scores: the attention module's own `scaling` (1/sqrt(Dh),
        and for GPT-2 with scale_attn_by_inverse_layer_idx also 1/(layer + 1))."""
        return float(get(self.layers[layer], self.family.attn).scaling)

    @property
    def layers(self):
        return get(self.model, self.family.layers)

    def forward(self, idx, hooks=None, attention_mask=None):
        """idx (B, T) token ids -> logits (B, T, V), through the model's own forward. hooks: site name ->
        fn(tensor) -> None or a replacement of the same shape and dtype, given the very tensor the rest
        of the forward consumes. attention_mask: refused unless None or all ones (no padding)."""
        self.check_tokens(idx)
        if attention_mask is not None and not bool((attention_mask == 1).all()):
            raise ValueError("hf_adapter does not support padding masks (an attention_mask with zeros): "
                             "atp_minimal compares prompts position by position; "
                             "use unpadded prompts of one length")
        with self.running(hooks, n_layers=self.config.n_layer):
            out = self.model(input_ids=idx, use_cache=False, return_dict=True)
        return out.logits

    def forward_from(self, layer, resid, hooks=None, past=None, last_position_only=False):
        """Run decoder layers layer..L-1, the final norm and the unembedding on resid (n, T', D), the
        clean residual stream entering layer `layer` at positions P..P+T'-1, where past holds, per
        layer layer..L-1, the clean (k, v) at self.resume_sites of positions :P, each (n, P, G, Dh)
        (P = 0 if past is None). Rotary models get the positions P..P+T'-1. Returns (n, T', V), or
        (n, 1, V) with last_position_only. Hooks see positions P.. only."""
        L, cfg = self.config.n_layer, self.config
        if not 0 <= layer <= L:
            raise ValueError(f"layer must be in [0, {L}], got {layer}")
        if resid.dim() != 3 or resid.shape[-1] != cfg.d_model:
            raise ValueError(f"resid must be (n, T', {cfg.d_model}), got {tuple(resid.shape)}")
        P = 0
        if past is not None:
            if len(past) != L - layer:
                raise ValueError(f"past needs one (k, v) pair per layer from {layer} on, got {len(past)}")
            P = past[0][0].shape[1] if past else 0
            want = (resid.shape[0], P, cfg.n_kv_head, cfg.d_head)
            if any(tuple(t.shape) != want for kv in past for t in kv):
                raise ValueError(f"each past k and v must be {want} (n, P, n_kv_head, d_head)")
        if P + resid.shape[1] > cfg.n_positions:
            raise ValueError(f"positions {P}..{P + resid.shape[1] - 1} exceed n_positions={cfg.n_positions}")
        past = {layer + i: kv for i, kv in enumerate(past or [])}
        with self.running(hooks, past=past, n_layers=L - layer):
            x = resid
            positions = torch.arange(P, P + x.shape[1], device=x.device)[None]  # (1, T')
            kwargs = dict(attention_mask=None, position_ids=positions)
            # cos, sin (1, T', rotary dims), as the model's forward makes them
            if self.family.rotary is not None:
                kwargs["position_embeddings"] = get(self.model, self.family.rotary)(x, positions)
            for l in range(layer, L):
                x = self.layers[l](x, **kwargs)
                x = x[0] if isinstance(x, tuple) else x  # (n, T', D)
            x = get(self.model, self.family.final_norm)(x)
            if last_position_only:
                x = x[:, -1:]  # (n, 1, D)
            return self.model.get_output_embeddings()(x)  # (n, T', V)

    # --- hooks for one call

    def site_names(self):
        """Every hookable site, in forward order."""
        return [f"blocks.{l}.{s}" for l in range(self.config.n_layer)
                for s in ("hook_resid_pre",) + ATTN_SITES + ("hook_attn_out", "mlp.hook_post", "hook_mlp_out",
                                                              "hook_resid_post")]

    @contextmanager
    def running(self, hooks, past=None, n_layers=None):
        """For one call: select the adapter's attention function, put the module hooks in place and
        make hooks and past visible to the attention function; afterwards remove the hooks and restore
        the model's attention implementation exactly, even if the call fails."""
        hooks = self.check_hooks(hooks)
        checkpointing = getattr(self.model, "is_activation_checkpointing", None)
        if checkpointing is None:  # its name before transformers 5 deprecated it
            checkpointing = getattr(self.model, "is_gradient_checkpointing", False)
        if self.model.training and checkpointing:
            raise ValueError("hf_adapter does not support gradient checkpointing in training mode "
                             "(the checkpointed layers would rerun the hooks in the backward pass); "
                             "call model.eval() first")
        call = Call(hooks, past or {})
        saved = [c._attn_implementation_internal for c in self.configs]
        handles = []
        token = ACTIVE.set(call)
        try:
            if self.model.config._attn_implementation != ATTENTION:
                self.model.set_attn_implementation(ATTENTION)
            for name, fn in hooks.items():
                handles.append(self.module_hook(name, fn))
            yield call
            if n_layers is not None and len(call.ran) != n_layers:
                raise RuntimeError(f"the adapter's attention function ran in {len(call.ran)} of {n_layers} "
                                   "layers: this model does not route its attention through transformers' "
                                   "AttentionInterface")
        finally:
            for h in handles:
                if h is not None:
                    h.remove()
            for c, implementation in zip(self.configs, saved):
                c._attn_implementation_internal = implementation
            ACTIVE.reset(token)

    def module_hook(self, name, fn):
        """Put one site hook on its module; None for the attention sites, which attention() runs."""
        _, l, site = name.split(".", 2)
        layer = self.layers[int(l)]
        if site in ("hook_resid_pre", "mlp.hook_post"):  # the input of the layer, of the down projection
            module = layer if site == "hook_resid_pre" else get(layer, self.family.down)
            return module.register_forward_pre_hook(input_hook(name, fn), with_kwargs=True)
        if site in ("hook_attn_out", "hook_mlp_out", "hook_resid_post"):  # the output of a module
            module = {"hook_attn_out": lambda: get(layer, self.family.attn), "hook_resid_post": lambda: layer,
                      "hook_mlp_out": lambda: get(layer, self.family.mlp)}[site]()
            return module.register_forward_hook(output_hook(name, fn))
        return None

    def check_hooks(self, hooks):
        if hooks is None:
            return {}
        if not isinstance(hooks, dict):
            raise TypeError(f"hooks must be a dict {{site name: fn(tensor) -> tensor or None}}, "
                            f"got {type(hooks).__name__}")
        unknown = sorted(set(hooks) - self.sites)
        if unknown:
            raise KeyError(f"unknown hook site(s) {unknown}; model.site_names() lists the valid ones")
        not_callable = sorted(n for n, fn in hooks.items() if not callable(fn))
        if not_callable:
            raise TypeError(f"the hooks for {not_callable} are not callable: "
                            f"each must be fn(tensor) -> tensor or None")
        return hooks

    def check_tokens(self, idx):
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype not in (torch.long, torch.int):
            raise ValueError("token ids must be an integer tensor of shape (B, T)")
        if not 1 <= idx.shape[1] <= self.config.n_positions:
            raise ValueError(f"sequence length {idx.shape[1]} must be between 1 and "
                             f"n_positions={self.config.n_positions}")
        if idx.min() < 0 or idx.max() >= self.config.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}); "
                             f"got min {int(idx.min())}, max {int(idx.max())}")


# --- the attention function: q, k, v, scores, pattern and z as sites

ACTIVE = contextvars.ContextVar("hf_adapter_call", default=None)


class Call:
    """What the attention function needs during one adapter call."""

    def __init__(self, hooks, past):
        self.hooks, self.past = hooks, past
        self.ran = []  # the layers whose attention went through attention()


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention interface: query (B, H, T, Dh) after rotary, key and value
    (B, G, T, Dh) after rotary and before the grouped-query repeat. Returns z (B, T, H, Dh), what
    the output projection reads, and the pattern (B, H, T, S). With a resumed run's past, the cached
    clean keys and values of positions :P go in front of this call's (hooks see positions P.. only)."""
    call = ACTIVE.get()
    if call is None:
        raise RuntimeError(f"the {ATTENTION!r} attention implementation only runs inside hf_adapter calls; "
                           "select another one with model.set_attn_implementation('eager')")
    if attention_mask is not None:
        raise ValueError("hf_adapter does not support attention masks (padding): "
                         "its attention applies the causal mask itself")
    if kwargs.get("sliding_window") is not None:
        raise ValueError("hf_adapter does not support sliding-window attention")
    l, hooks = module.layer_idx, call.hooks
    call.ran.append(l)
    p = f"blocks.{l}.attn."
    q = run_hook(p + "hook_q", query.transpose(1, 2), hooks)  # (B, T, H, Dh)
    k = run_hook(p + "hook_k", key.transpose(1, 2), hooks)  # (B, T, G, Dh)
    v = run_hook(p + "hook_v", value.transpose(1, 2), hooks)  # (B, T, G, Dh)
    if l in call.past:  # a resumed run: clean keys and values of the P earlier positions
        k_past, v_past = call.past[l]
        k = torch.cat([k_past.to(k.device), k], dim=1)  # (B, S, G, Dh), S = P + T
        v = torch.cat([v_past.to(v.device), v], dim=1)
    group = q.shape[2] // k.shape[2]  # query heads per key/value head: head h reads kv head h // group
    if group > 1:  # as repeat_kv: (B, S, G, Dh) -> (B, S, H, Dh)
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    T, S = q.shape[1], k.shape[1]
    scale = module.scaling if scaling is None else scaling
    scores = (q.transpose(1, 2) @ k.permute(0, 2, 3, 1)) * scale  # (B, H, T, S)
    causal = torch.ones(T, S, dtype=torch.bool, device=scores.device).tril(S - T)  # key s <= query t
    scores = run_hook(p + "hook_attn_scores", scores.masked_fill(~causal, float("-inf")), hooks)
    # Softmax in the model's dtype (float32 for 16-bit models), never below float32: HF's eager NeoX and
    # Llama attention would round a float64 model's pattern to float32 here.
    softmax_dtype = torch.promote_types(scores.dtype, torch.float32)
    pattern = torch.softmax(scores, dim=-1, dtype=softmax_dtype).to(value.dtype)
    pattern = run_hook(p + "hook_pattern", pattern, hooks)  # (B, H, T, S)
    weights = torch.nn.functional.dropout(pattern, p=dropout, training=module.training)  # none in eval mode
    z = (weights @ v.transpose(1, 2)).transpose(1, 2)  # (B, T, H, Dh): per-head output before W_O
    return run_hook(p + "hook_z", z, hooks), pattern


def register_attention():
    from transformers import AttentionInterface
    AttentionInterface.register(ATTENTION, attention)


# --- PyTorch module hooks as site hooks

def run_hook(name, t, hooks):
    """Apply the site hook `name` to t: None keeps t, a tensor (same shape, dtype, device) replaces it."""
    fn = hooks.get(name)
    if fn is None:
        return t
    out = fn(t)
    if out is None:
        return t
    if (not isinstance(out, torch.Tensor) or out.shape != t.shape or out.dtype != t.dtype
            or out.device != t.device):
        got = (f"{tuple(out.shape)} {out.dtype} on {out.device}" if isinstance(out, torch.Tensor)
               else type(out).__name__)
        raise ValueError(f"hook for {name} must return None or a tensor of shape {tuple(t.shape)}, "
                         f"dtype {t.dtype} on {t.device}; got {got}")
    return out


def input_hook(name, fn):
    """A forward pre-hook that runs the site hook on the module's first input (positional or
    hidden_states=)."""
    def hook(module, args, kwargs):
        if args:
            new = run_hook(name, args[0], {name: fn})
            return None if new is args[0] else ((new,) + tuple(args[1:]), kwargs)
        new = run_hook(name, kwargs["hidden_states"], {name: fn})
        return None if new is kwargs["hidden_states"] else (args, dict(kwargs, hidden_states=new))
    return hook


def output_hook(name, fn):
    """A forward hook that runs the site hook on the module's output (or output[0] for a tuple)."""
    def hook(module, args, output):
        first = output[0] if isinstance(output, tuple) else output
        new = run_hook(name, first, {name: fn})
        if new is first:
            return None
        return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new
    return hook


def get(obj, path):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


# --- what the adapter supports, and why

def check_version():
    try:
        import transformers
    except ImportError:
        raise ImportError("hf_adapter needs transformers: pip install 'transformers>=5.24,<6'") from None
    installed = transformers.__version__
    try:
        have = tuple(int(x) for x in installed.split(".")[:2])
    except ValueError:
        have = None
    low, high = SUPPORTED_VERSIONS
    if have is None or not low <= have < high:
        raise ImportError(f"hf_adapter supports transformers >= {low[0]}.{low[1]} and < {high[0]} "
                          f"(it relies on that line's AttentionInterface and decoder-layer calls), "
                          f"found {installed}: pip install 'transformers>=5.24,<6'")


def check_architecture(hf_model):
    """Refuse, naming the feature, every model the adapter cannot handle correctly; return its Family."""
    name = type(hf_model).__name__
    if name in KNOWN_UNSUPPORTED:
        raise ValueError(f"hf_adapter cannot handle {name}: {KNOWN_UNSUPPORTED[name]}")
    if name not in FAMILIES or not type(hf_model).__module__.startswith("transformers."):
        raise ValueError(f"hf_adapter does not know the architecture {name} "
                         f"(supported: {', '.join(FAMILIES)}; "
                         f"a subclass or another model may read its sites differently)")
    cfg, problems = hf_model.config, []
    layer_types = sorted(set(getattr(cfg, "layer_types", None) or ["full_attention"]))
    if layer_types != ["full_attention"] or (name == "MistralForCausalLM" and cfg.sliding_window is not None):
        fix = "sliding_window=None" if name == "MistralForCausalLM" else "use_sliding_window=False"
        problems.append(f"sliding-window attention (sliding_window={cfg.sliding_window}, "
                        f"layer types {layer_types}: keys outside the window are masked, "
                        f"which the causal mask and the QK fix do not know); "
                        f"set {fix} only if your prompts are shorter than the window")
    for field in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(cfg, field, None):
            problems.append(f"logit soft-capping ({field}={getattr(cfg, field)})")
    if getattr(cfg, "alibi", False) or getattr(cfg, "position_embedding_type", None) == "alibi":
        problems.append("ALiBi position biases (scores are not q . k * scale)")
    for field in ("num_local_experts", "num_experts"):
        if getattr(cfg, field, None):
            problems.append(f"mixture-of-experts MLPs ({field}={getattr(cfg, field)})")
    if getattr(cfg, "add_cross_attention", False):
        problems.append("cross-attention (add_cross_attention=True): "
                        "only decoder-only self-attention is supported")
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") not in ROPE_TYPES:
        problems.append(f"rotary scaling rope_type={rope['rope_type']!r} "
                        f"(supported: {', '.join(ROPE_TYPES)}, "
                        f"whose frequencies do not depend on the sequence length)")
    if getattr(cfg, "is_encoder_decoder", False):
        problems.append("encoder-decoder models")
    if problems:
        raise ValueError(f"hf_adapter cannot handle this {name} correctly:\n  " + "\n  ".join(problems))
    return FAMILIES[name]


def check_site_identities(adapted, T=4):
    """Run one short probe (eval mode, no gradients; every module's mode is restored) and check what
    atp_minimal relies on, per layer:
      pattern = softmax(q . k * attention_scale + causal mask), z = pattern @ v (grouped heads repeated),
      resid_post = resid_pre + attn_out + mlp_out, layer l+1 consumes layer l's resid_post tensor itself,
      the logits equal those of the model's own attention implementation, and forward_from (from layer 0,
      and resumed at position T // 2) gives the full forward's logits."""
    cfg, model = adapted.config, adapted.model
    T = min(T, cfg.n_positions)
    device = model.get_input_embeddings().weight.device
    idx = (torch.arange(T, device=device) * 7 % cfg.vocab_size)[None]  # (1, T)
    L = cfg.n_layer
    names = [f"blocks.{l}.{s}" for l in range(L) for s in ("attn.hook_q", "attn.hook_k", "attn.hook_v",
             "attn.hook_pattern", "attn.hook_z", "hook_resid_pre", "hook_attn_out", "hook_mlp_out",
             "hook_resid_post")]
    modes = {m: m.training for m in model.modules()}
    cache = {}
    try:
        model.eval()
        with torch.no_grad():
            logits = adapted(idx, hooks={n: (lambda t, n=n: cache.__setitem__(n, t)) for n in names})
            own = None if model.config._attn_implementation == ATTENTION else \
                model(input_ids=idx, use_cache=False, return_dict=True).logits  # the user's own attention
            start = T // 2
            from_zero = adapted.forward_from(0, cache["blocks.0.hook_resid_pre"])
            past = [(cache[f"blocks.{l}.attn.hook_k"][:, :start], cache[f"blocks.{l}.attn.hook_v"][:, :start])
                    for l in range(1, L)]
            resumed = (adapted.forward_from(1, cache["blocks.1.hook_resid_pre"][:, start:], past=past)
                       if L > 1 else None)
    finally:
        for m, mode in modes.items():
            m.training = mode
    dtype = logits.dtype
    tol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 3e-2)  # relative to each tensor's size
    fail = lambda what, err: ValueError(f"hf_adapter cannot handle this {type(model).__name__}: "
                                        f"{what} fails by {err:.3g} on a probe input")
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()  # (T, S)
    for l in range(L):
        c = {n.split(".", 2)[2]: cache[n].double().to(device) for n in names if n.startswith(f"blocks.{l}.")}
        group = cfg.n_head // cfg.n_kv_head
        q = c["attn.hook_q"].transpose(1, 2)  # (1, H, T, Dh)
        k, v = (c[f"attn.hook_{x}"].repeat_interleave(group, dim=2).transpose(1, 2) for x in "kv")
        scores = (q @ k.transpose(-1, -2)) * adapted.attention_scale(l)  # (1, H, T, S)
        pattern = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        checks = {f"in layer {l}, pattern = softmax(q.k * attention_scale, causal)":
                      (c["attn.hook_pattern"], pattern),
                  f"in layer {l}, z = pattern @ v":
                      (c["attn.hook_z"], (c["attn.hook_pattern"] @ v).transpose(1, 2)),
                  f"in layer {l}, resid_post = resid_pre + attn_out + mlp_out":
                      (c["hook_resid_post"], c["hook_resid_pre"] + c["hook_attn_out"] + c["hook_mlp_out"])}
        for what, (got, want) in checks.items():
            err = (got - want).abs().max().item()
            if not err <= tol * max(1.0, want.abs().max().item()):
                raise fail(what, err)
        if l + 1 < L and cache[f"blocks.{l + 1}.hook_resid_pre"] is not cache[f"blocks.{l}.hook_resid_post"]:
            raise ValueError(f"hf_adapter cannot handle this {type(model).__name__}: "
                             f"layer {l + 1} does not consume layer {l}'s output tensor itself "
                             f"(GradDrop relies on it)")
    scale = max(1.0, logits.abs().max().item())
    # The model's own attention may round its softmax to float32 (eager) or use fused kernels: a loose check,
    # there to catch attention that is not q.k * scale with a causal mask at all.
    own_tol = 1e-4 if dtype in (torch.float64, torch.float32) else 0.1
    for what, got, want in (("the adapter's attention against the model's own", own, logits),
                            ("forward_from(0) against the full forward", from_zero, logits),
                            (f"forward_from(1) resumed at position {T // 2} against the full forward",
                             resumed, logits[:, T // 2:])):
        if got is None:
            continue
        err = (got.double() - want.double().to(got.device)).abs().max().item()
        if not err <= (own_tol if "own" in what else tol) * scale:
            raise fail(what, err)
