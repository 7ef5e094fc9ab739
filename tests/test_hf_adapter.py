"""hf_adapter.py: atp_minimal on Hugging Face transformers models, checked the way model.GPT is.

Small random-weight models of five families, built from a config (no downloads), in float64:
  gpt2:  GPT2LMHeadModel, learned positions, attention then MLP
  neox:  GPTNeoXForCausalLM (Pythia), rotary on a quarter of each head, attention and MLP in parallel
  llama: LlamaForCausalLM with 4 query heads and 2 key/value heads (grouped-query attention)
  qwen2: Qwen2ForCausalLM (biased q/k/v projections, RMSNorm, gated MLP)
  mistral: MistralForCausalLM without a sliding window, 4 query and 2 key/value heads
Claims checked:
  - the sites have the protocol's shapes and are the tensors the forward consumes; forward_from's
    suffix logits equal the full forward's;
  - exact patching equals a plain loop of PyTorch hooks on the HF modules themselves, and patching a
    query or key before the rotary embedding (the projection's output) equals patching it after;
  - the fast forms equal the reference forms (patching, AtP, the QK fix, AtP*, verify);
  - a key/value head of grouped-query attention is its query heads' keys (values) together;
  - one GPT-2's weights give the same results through model.GPT and through the adapter;
  - what the adapter cannot handle is refused, naming the feature; the user's model is left as it was;
  - a bf16 model runs; a model dispatched by accelerate (one layer offloaded to disk) gives the same results.

(docs/huggingface.md runs in tests/test_tutorial.py, with every other page.)

    pytest -q -s tests/test_hf_adapter.py     # -s prints every max difference
"""

import copy
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="hf_adapter's tests need transformers")

import atp_minimal as atp  # noqa: E402
import hf_adapter  # noqa: E402
from model import GPT  # noqa: E402
from helpers import max_diff, prompt_pair  # noqa: E402

try:
    hf_adapter.check_version()
except ImportError as e:
    pytest.skip(str(e), allow_module_level=True)

TOL = 1e-10  # float64: every comparison is a different order of the same float64 operations
FAMILIES = ("gpt2", "neox", "llama", "qwen2", "mistral")
L, T, B, VOCAB, H, DH, M = 3, 6, 2, 50, 4, 8, 24


# --- models and prompts


def small_model(family, seed=0, dtype=torch.float64, **overrides):
    """A random 3-layer model of a family, in eval mode. Weights are drawn with std 0.25 (HF's 0.02
    would give near-zero effects), and every norm weight and bias gets noise too."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, initializer_range=0.25)
    sizes = dict(num_hidden_layers=L, num_attention_heads=H, hidden_size=H * DH, intermediate_size=M,
                 max_position_embeddings=16)
    if family == "gpt2":
        cfg = transformers.GPT2Config(n_layer=L, n_head=H, n_embd=H * DH, n_inner=M, n_positions=16,
                                      bos_token_id=0, eos_token_id=0, **common, **overrides)
        model = transformers.GPT2LMHeadModel(cfg)
    elif family == "neox":  # Pythia's choices: rotary_pct 0.25, parallel attention and MLP
        cfg = transformers.GPTNeoXConfig(**sizes, rotary_pct=0.25, use_parallel_residual=True, **common,
                                         **overrides)
        model = transformers.GPTNeoXForCausalLM(cfg)
    elif family == "llama":
        cfg = transformers.LlamaConfig(**sizes, num_key_value_heads=2, **common, **overrides)
        model = transformers.LlamaForCausalLM(cfg)
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(**sizes, num_key_value_heads=H, **common, **overrides)
        model = transformers.Qwen2ForCausalLM(cfg)
    elif family == "mistral":  # Mistral v0.2 on: no sliding window
        cfg = transformers.MistralConfig(**sizes, num_key_value_heads=2, sliding_window=None, **common,
                                         **overrides)
        model = transformers.MistralForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # biases, LayerNorm and RMSNorm weights
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.to(dtype).eval()


# --- the HF modules' own view: plain PyTorch hooks, no adapter


def hf_slot(hf, family, kind, layer):
    """Where a node lives on the HF modules themselves: (module, "input" or "output", view), where
    view(t) shows the module's tensor as (B, T, U, E) units (a view: writing into it writes t). q and k
    are the projection's output, BEFORE the rotary embedding."""
    if family == "gpt2":
        block = hf.transformer.h[layer]
        attn, out, down = block.attn, block.attn.c_proj, block.mlp.c_proj
    elif family == "neox":
        block = hf.gpt_neox.layers[layer]
        attn, out, down = block.attention, block.attention.dense, block.mlp.dense_4h_to_h
    else:
        block = hf.model.layers[layer]
        attn, out, down = block.self_attn, block.self_attn.o_proj, block.mlp.down_proj
    heads = lambda t: t.view(*t.shape[:2], -1, DH)  # (B, T, X) -> (B, T, X / Dh, Dh)
    if kind == "neuron":
        return down, "input", lambda t: t.unsqueeze(-1)
    if kind == "z":
        return out, "input", heads
    which = "qkv".index(kind)
    if family == "gpt2":  # c_attn's output is [q | k | v], each (B, T, H * Dh)
        return attn.c_attn, "output", lambda t: heads(t[..., which * H * DH:(which + 1) * H * DH])
    if family == "neox":  # query_key_value's output is, per head, [q | k | v], each Dh wide
        per_head = lambda t: t.view(*t.shape[:2], H, 3 * DH)  # (B, T, H, 3 Dh)
        return attn.query_key_value, "output", lambda t: per_head(t)[..., which * DH:(which + 1) * DH]
    return getattr(attn, f"{kind}_proj"), "output", heads


def hf_forward(hf, idx, family, kind, layer, fn):
    """HF's own forward with one plain hook fn(tensor) -> tensor or None on a node's module."""
    module, where, _ = hf_slot(hf, family, kind, layer)
    if where == "input":
        handle = module.register_forward_pre_hook(
            lambda m, args: None if (out := fn(args[0])) is None else (out,))
    else:
        handle = module.register_forward_hook(lambda m, args, output: fn(output))
    try:
        with torch.no_grad():
            return hf(input_ids=idx, use_cache=False).logits
    finally:
        handle.remove()


def hf_patch_effect(hf, family, clean, noise, metric, kind, layer, pos, unit, noise_value):
    """metric(clean | do(node <- noise)) - metric(clean) with the patch done on the HF module."""
    _, _, view = hf_slot(hf, family, kind, layer)

    def patch(t):
        t = t.clone()
        view(t)[:, pos, unit] = view(noise_value)[:, pos, unit]
        return t
    with torch.no_grad():
        base = metric(hf(input_ids=clean, use_cache=False).logits)
    return metric(hf_forward(hf, clean, family, kind, layer, patch)) - base


def hf_noise_values(hf, family, idx, kind, layer):
    """The tensor of a node's HF module (its input or output) on the prompt idx."""
    saved = {}

    def keep(t):
        saved["t"] = t.clone()
    hf_forward(hf, idx, family, kind, layer, keep)
    return saved["t"]


# --- 1. the sites mean what atp_minimal needs


@pytest.mark.parametrize("family", FAMILIES)
def test_adapted_sites_have_the_protocol_shapes_and_are_the_tensors_the_forward_consumes(family):
    hf = small_model(family)
    model = hf_adapter.adapt(hf)
    clean, _, metric = prompt_pair(B, T, VOCAB)
    Hkv = 2 if family in ("llama", "mistral") else H
    assert (model.config.n_head, model.config.n_kv_head, model.config.d_head,
            model.config.d_mlp) == (H, Hkv, DH, M)
    D = H * DH
    shapes = {"hook_resid_pre": (B, T, D), "attn.hook_q": (B, T, H, DH), "attn.hook_k": (B, T, Hkv, DH),
              "attn.hook_v": (B, T, Hkv, DH), "attn.hook_attn_scores": (B, H, T, T),
              "attn.hook_pattern": (B, H, T, T), "attn.hook_z": (B, T, H, DH), "mlp.hook_post": (B, T, M),
              "hook_attn_out": (B, T, D), "hook_mlp_out": (B, T, D), "hook_resid_post": (B, T, D)}
    names = [f"blocks.{l}.{s}" for l in range(L) for s in shapes]
    with torch.no_grad():
        logits, cache = atp.run_with_cache(model, clean, names)
        own = hf(input_ids=clean).logits  # HF's own forward, its own (sdpa) attention
    for name in names:
        assert tuple(cache[name].shape) == shapes[name.split(".", 2)[2]], name
        assert cache[name].dtype == torch.float64
    for l in range(L - 1):  # GradDrop's fast path: resid_pre of layer l+1 is resid_post of layer l itself
        assert cache[f"blocks.{l + 1}.hook_resid_pre"] is cache[f"blocks.{l}.hook_resid_post"]
    diff = max_diff(logits, own)
    assert diff <= TOL
    # the neurons and z are what the down and output projections read: the HF modules' inputs themselves
    neuron_diff = max(max_diff(cache[f"blocks.{l}.mlp.hook_post"],
                               hf_noise_values(hf, family, clean, "neuron", l))
                      for l in range(L))
    z_diff = max(max_diff(cache[f"blocks.{l}.attn.hook_z"],
                          hf_slot(hf, family, "z", l)[2](hf_noise_values(hf, family, clean, "z", l)))
                 for l in range(L))
    assert neuron_diff <= TOL and z_diff <= TOL
    # A reading hook's tensor is the very one consumed: the gradient with respect to the cached neurons
    # equals the gradient with respect to a leaf that a plain hook puts in the down projection's input.
    start = {"blocks.0.hook_resid_pre": lambda t: t.detach().requires_grad_(True)}
    leaf = {}
    down, _, _ = hf_slot(hf, family, "neuron", 1)
    handle = down.register_forward_pre_hook(
        lambda m, args: (leaf.setdefault("t", args[0].detach().requires_grad_()),))
    with torch.enable_grad():
        logits, c = atp.run_with_cache(model, clean, ["blocks.1.mlp.hook_post"], hooks=start)
        g_ours, = torch.autograd.grad(metric(logits).sum(), [c["blocks.1.mlp.hook_post"]])
        try:
            hf_logits = hf(input_ids=clean, use_cache=False).logits
        finally:
            handle.remove()
        g_hf, = torch.autograd.grad(metric(hf_logits).sum(), [leaf["t"]])
    grad_diff = max_diff(g_ours, g_hf)
    assert g_hf.abs().max() > 1e-3 and grad_diff <= TOL
    assert hf.config._attn_implementation == "sdpa"
    print(f"\n  {family}: every site has the protocol shape in float64 (k, v: {Hkv} key/value heads); "
          f"logits equal HF's own forward to {diff:.1e}; neurons and z equal the projections' inputs to "
          f"{max(neuron_diff, z_diff):.1e}; "
          f"d metric / d cached neurons equals a plain-hook leaf's to {grad_diff:.1e}")


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_from_gives_the_full_forwards_logits_at_every_layer_and_start_position(family):
    model = hf_adapter.adapt(small_model(family))
    clean, _, _ = prompt_pair(B, T, VOCAB)
    names = [f"blocks.{l}.{s}" for l in range(L) for s in ("hook_resid_pre",) + model.resume_sites]
    with torch.no_grad():
        logits, cache = atp.run_with_cache(model, clean, names + [f"blocks.{L - 1}.hook_resid_post"])
        worst = 0.0
        for layer in range(L + 1):
            for start in range(T):
                past = [tuple(cache[f"blocks.{l}.{s}"][:, :start] for s in model.resume_sites)
                        for l in range(layer, L)]
                resid = cache[f"blocks.{layer}.hook_resid_pre"] if layer < L else None
                if resid is None:  # layer = L: only the final norm and the unembedding
                    resid = cache[f"blocks.{L - 1}.hook_resid_post"]
                past = past if start else None
                suffix = model.forward_from(layer, resid[:, start:], past=past)
                last = model.forward_from(layer, resid[:, start:], past=past, last_position_only=True)
                worst = max(worst, max_diff(suffix, logits[:, start:]), max_diff(last, logits[:, -1:]))
    assert worst <= TOL
    print(f"\n  {family}: forward_from(layer, positions start..) equals the full forward for every layer "
          f"and start (max diff {worst:.1e})")


# --- 2. exact patching equals plain hooks on the HF modules


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_patching_equals_a_plain_hook_loop_on_the_hf_modules(family):
    """Every q, k, v, z node and a sample of neurons, patched on the HF modules by hooks written here
    (q, k, v at the projections' outputs, z and neurons at the output and down projections' inputs)."""
    hf = small_model(family)
    clean, noise, metric = prompt_pair(B, T, VOCAB)
    kinds = atp.KINDS
    effects = atp.activation_patching(hf_adapter.adapt(hf), clean, noise, metric, kinds=kinds, progress=False)
    worst, count = 0.0, 0
    for kind in kinds:
        for layer in range(L):
            noise_value = hf_noise_values(hf, family, noise, kind, layer)
            units = range(effects[kind].shape[-1]) if kind != "neuron" else range(0, M, 5)
            for pos in (range(T) if kind != "neuron" else (1, 3, T - 1)):
                for unit in units:
                    theirs = hf_patch_effect(hf, family, clean, noise, metric, kind, layer, pos, unit,
                                             noise_value)
                    worst = max(worst, max_diff(effects[kind][:, layer, pos, unit], theirs))
                    count += 1
    top = max(effects[k].abs().max().item() for k in kinds)
    assert worst <= TOL and top > 0.1
    print(f"\n  {family}: {count} nodes of {kinds}, activation_patching vs hooks on the HF modules: max diff "
          f"{worst:.1e} (largest effect {top:.2f})")


@pytest.mark.parametrize("family", FAMILIES)
def test_patching_a_query_or_key_before_the_rotary_embedding_equals_patching_it_after(family):
    """The adapter's q and k are the rotated vectors; HF's projections' outputs are not rotated yet.
    Rotary is a fixed linear map per position, so patching either is the same intervention: equal logits
    for every q and k node (k nodes are key/value heads, 2 of them in the grouped-query Llama)."""
    hf = small_model(family)
    model = hf_adapter.adapt(hf)
    clean, noise, _ = prompt_pair(B, T, VOCAB)
    worst, moved = 0.0, 0.0
    with torch.no_grad():
        clean_logits = model(clean)
        _, noise_sites = atp.run_with_cache(model, noise,
                                            [f"blocks.{l}.attn.hook_{x}" for l in range(L) for x in "qk"])
        for kind in ("q", "k"):
            for layer in range(L):
                noise_value = hf_noise_values(hf, family, noise, kind, layer)
                site = f"blocks.{layer}.attn.hook_{kind}"
                for pos in range(T):
                    for unit in range(noise_sites[site].shape[2]):
                        def after(t):
                            t = t.clone()
                            t[:, pos, unit] = noise_sites[site][:, pos, unit]
                            return t

                        def before(t):
                            t = t.clone()
                            hf_slot(hf, family, kind, layer)[2](t)[:, pos, unit] = \
                                hf_slot(hf, family, kind, layer)[2](noise_value)[:, pos, unit]
                            return t
                        ours = model(clean, hooks={site: after})
                        theirs = hf_forward(hf, clean, family, kind, layer, before)
                        worst = max(worst, max_diff(ours, theirs))
                        moved = max(moved, max_diff(ours, clean_logits))
    assert worst <= TOL and moved > 0.1
    print(f"\n  {family}: patching q/k after rotary (the adapter) vs before (HF's projections): "
          f"max logit diff {worst:.1e} (patches move logits by up to {moved:.2f})")


# --- 3. the fast forms equal the reference forms


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_forms_equal_reference_forms(family):
    model = hf_adapter.adapt(small_model(family))
    clean, noise, metric = prompt_pair(B, T, VOCAB)
    kinds = atp.KINDS
    rows = {"activation_patching": (atp.activation_patching(model, clean, noise, metric, kinds,
                                                            progress=False),
                                    atp.activation_patching_reference(model, clean, noise, metric, kinds)),
            "atp_estimates": (atp.atp_estimates(model, clean, noise, metric, kinds),
                              atp.atp_estimates_reference(model, clean, noise, metric, kinds))}
    rows["atp_estimates qk_fix"] = (atp.atp_estimates(model, clean, noise, metric, kinds, qk_fix=True),
                                    atp.atp_qk_fix_reference(model, clean, noise, metric, kinds))
    rows["atp_star"] = (atp.atp_star(model, clean, noise, metric, kinds),
                        atp.atp_star_reference(model, clean, noise, metric, kinds))
    ranking, _ = atp.rank_nodes({k: s.mean(0) for k, s in rows["atp_star"][0].items()})
    rows["verify"] = (atp.verify(model, clean, noise, metric, ranking, 30, progress=False),
                      atp.verify_reference(model, clean, noise, metric, ranking, 30))
    print(f"\n  {family}:")
    for name, (fast, reference) in rows.items():
        d = max_diff(fast, reference)
        print(f"    {name:22s} fast vs reference: max diff {d:.1e}")
        assert d <= TOL, name
    assert rows["activation_patching"][0]["z"].abs().max() > 0.1


# --- 4. the same GPT-2 through model.GPT and through the adapter


def test_a_gpt2_gives_model_gpt_results_through_the_adapter_for_every_public_function(tmp_path):
    hf = small_model("gpt2", seed=3)
    hf.save_pretrained(str(tmp_path))
    gpt = GPT.from_pretrained(str(tmp_path)).double()
    model = hf_adapter.adapt(hf)
    clean, noise, metric = prompt_pair(B, T, VOCAB)

    def every_function(m):
        out = {"activation_patching": atp.activation_patching(m, clean, noise, metric, progress=False),
               "activation_patching positions=all":
                   atp.activation_patching(m, clean, noise, metric, positions="all", progress=False),
               "atp_estimates": atp.atp_estimates(m, clean, noise, metric),
               "atp_estimates qk_fix": atp.atp_estimates(m, clean, noise, metric, qk_fix=True),
               "atp_star": atp.atp_star(m, clean, noise, metric),
               "grad_drop_scores sublayer": atp.grad_drop_scores(m, clean, noise, metric, unit="sublayer")}
        ranking, _ = atp.rank_nodes({k: s.mean(0) for k, s in out["atp_star"].items()})
        out["verify"] = atp.verify(m, clean, noise, metric, ranking, 30, progress=False)
        return out
    with torch.no_grad():
        logits_diff = max_diff(gpt(clean), model(clean))
    ours, theirs = every_function(gpt), every_function(model)
    print(f"\n  logits: max diff {logits_diff:.1e}")
    assert logits_diff <= TOL
    for name in ours:
        d = max_diff(ours[name], theirs[name])
        print(f"  {name:36s} model.GPT vs adapter: max diff {d:.1e}")
        assert d <= TOL, name
    assert ours["atp_star"]["k"].max() > 0.05, "the comparison must not be between near-zero scores"


# --- 5. grouped-query attention


def llama_with_one_key_value_head_per_query_head(gqa):
    """The same Llama without grouped-query attention: n_kv_head = n_head, each key/value projection
    block repeated for the query heads of its group. Its head h is the grouped model's kv head h // group."""
    cfg = copy.deepcopy(gqa.config)
    cfg.num_key_value_heads = H
    twin = transformers.LlamaForCausalLM(cfg).to(torch.float64).eval()
    weights = gqa.state_dict()
    for name, w in weights.items():
        if name.endswith(("k_proj.weight", "v_proj.weight")):  # (G * Dh, D) -> (H * Dh, D)
            G = w.shape[0] // DH
            weights[name] = w.view(G, DH, -1).repeat_interleave(H // G, dim=0).reshape(H * DH, -1)
    twin.load_state_dict(weights)
    return twin


def test_a_key_value_head_of_grouped_query_attention_is_its_query_heads_keys_together():
    """HF's repeat_kv, seen through the adapter: patching key/value head g of the grouped Llama (2 kv
    heads for 4 query heads) is patching keys (values) of query heads 2g and 2g+1 together in the same
    model without grouping; AtP and the QK fix of a kv head are the sums over its query heads."""
    gqa = small_model("llama")
    grouped, plain = (hf_adapter.adapt(gqa),
                      hf_adapter.adapt(llama_with_one_key_value_head_per_query_head(gqa)))
    clean, noise, metric = prompt_pair(B, T, VOCAB)
    with torch.no_grad():
        logits_diff = max_diff(grouped(clean), plain(clean))
    effects = atp.activation_patching(grouped, clean, noise, metric, kinds=("k", "v"), progress=False)
    assert effects["k"].shape == effects["v"].shape == (B, L, T, 2)
    exact = 0.0
    for kind in ("k", "v"):
        for l in range(L):
            for t in (1, 3, T - 1):
                for g in range(2):
                    group = [(kind, l, t, 2 * g), (kind, l, t, 2 * g + 1)]
                    together = atp.patch_nodes(plain, clean, noise, metric, group)
                    exact = max(exact, max_diff(effects[kind][:, l, t, g], together))
    linear = 0.0
    for qk_fix in (False, True):
        ours = atp.atp_estimates(grouped, clean, noise, metric, kinds=("k", "v"), qk_fix=qk_fix)
        summed = atp.atp_estimates(plain, clean, noise, metric, kinds=("k", "v"), qk_fix=qk_fix)
        linear = max(linear, max_diff(ours, {k: v.view(B, L, T, 2, 2).sum(-1) for k, v in summed.items()}))
    assert logits_diff <= TOL and exact <= TOL and linear <= TOL
    assert effects["k"].abs().max() > 0.05
    print(f"\n  llama, 4 query / 2 kv heads vs its ungrouped twin: logits {logits_diff:.1e}; "
          f"exact patching of a kv head vs its 2 query heads' keys/values together {exact:.1e}; "
          f"AtP and QK fix vs sums over the group {linear:.1e}")


# --- 6. refusals, and the user's model left as it was


def tiny(cls_name, config_name, **fields):
    return lambda: getattr(transformers, cls_name)(
        getattr(transformers, config_name)(vocab_size=VOCAB, **fields))


LLAMA_SIZES = dict(hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4)
REFUSED = {
    "sliding window (Qwen2)": (lambda: small_model("qwen2", use_sliding_window=True, sliding_window=4,
                                                   max_window_layers=1), "sliding-window attention"),
    "sliding window (Mistral)": (tiny("MistralForCausalLM", "MistralConfig", sliding_window=4, **LLAMA_SIZES),
                                 "sliding-window attention"),
    "ALiBi (Bloom)": (tiny("BloomForCausalLM", "BloomConfig", hidden_size=32, n_layer=2, n_head=4), "ALiBi"),
    "logit soft-capping (Gemma2)": (tiny("Gemma2ForCausalLM", "Gemma2Config", head_dim=8, **LLAMA_SIZES),
                                    "soft-capping"),
    "mixture of experts (Mixtral)": (tiny("MixtralForCausalLM", "MixtralConfig", num_local_experts=2,
                                          **LLAMA_SIZES),
                                     "mixture-of-experts"),
    "unknown architecture (OPT)": (tiny("OPTForCausalLM", "OPTConfig", hidden_size=32, ffn_dim=24,
                                        num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32),
                                   "does not know the architecture"),
    "a subclass of a known class": (lambda: type("MyLlama", (transformers.LlamaForCausalLM,), {})(
        transformers.LlamaConfig(vocab_size=VOCAB, **LLAMA_SIZES)), "does not know the architecture MyLlama"),
    "cross-attention (GPT-2)": (lambda: small_model("gpt2", add_cross_attention=True), "cross-attention"),
    "length-dependent rotary scaling": (lambda: small_model("llama", rope_parameters=dict(
        rope_type="dynamic", factor=2.0, rope_theta=10000.0)), "rope_type='dynamic'"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_what_the_adapter_cannot_handle_is_refused_naming_the_feature(case):
    build, words = REFUSED[case]
    with pytest.raises(ValueError, match=words.replace("(", r"\(")) as info:
        hf_adapter.adapt(build())
    print(f"\n  {case}: {str(info.value).splitlines()[-1].strip()[:110]}")


def test_padding_masks_gradient_checkpointing_and_other_transformers_versions_are_refused(monkeypatch):
    hf = small_model("neox")
    model = hf_adapter.adapt(hf)
    clean, _, _ = prompt_pair(B, T, VOCAB)
    mask = torch.ones_like(clean)
    mask[:, 0] = 0
    with pytest.raises(ValueError, match="padding masks"):
        model(clean, attention_mask=mask)
    model(clean, attention_mask=torch.ones_like(clean))  # all ones: no padding, accepted
    (getattr(hf, "activation_checkpointing_enable", None) or hf.gradient_checkpointing_enable)()
    hf.train()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(clean)
    hf.eval()
    model(clean)  # eval mode: checkpointing is off, accepted
    # the module hf_adapter imports: transformers' lazy module can stand in sys.modules under another object
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.57.1")
    with pytest.raises(ImportError, match="transformers >= 5.24"):
        hf_adapter.adapt(small_model("neox"))


def module_state(hf):
    """Everything the adapter must leave as it found it: attention implementation, every module's mode
    and hooks, and every weight (with its storage: nothing is copied)."""
    return dict(attn=hf.config._attn_implementation, inner_attn=hf.gpt_neox.config._attn_implementation,
                modes=[m.training for m in hf.modules()],
                hooks=sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in hf.modules()),
                weights={k: v.clone() for k, v in hf.state_dict().items()},
                storage=[p.data_ptr() for p in hf.parameters()])


def test_the_users_model_is_left_as_it_was_after_adapt_calls_and_failures():
    hf = small_model("neox", attn_implementation="eager").train()  # a user's model in training mode
    hf.gpt_neox.layers[1].mlp.eval()  # with one submodule in another mode
    before = module_state(hf)
    model = hf_adapter.adapt(hf)
    assert model.model is hf and model.training
    clean, noise, metric = prompt_pair(B, T, VOCAB)
    states = {"adapt": module_state(hf)}
    with torch.no_grad():
        model(clean, hooks={"blocks.0.attn.hook_q": lambda t: None})
    states["a hooked forward"] = module_state(hf)
    with pytest.raises(ZeroDivisionError):  # a hook that fails halfway through a forward
        model(clean, hooks={"blocks.1.attn.hook_z": lambda t: 1 / 0, "blocks.0.hook_mlp_out": lambda t: None})
    states["a failed forward"] = module_state(hf)
    hf.gpt_neox.layers[1].mlp.train()  # atp_minimal's eval_mode restores one mode for the whole model
    before_atp = module_state(hf)
    atp.atp_star(model, clean, noise, metric)
    atp.activation_patching(model, clean, noise, metric, progress=False)
    states["atp_star and activation_patching"] = module_state(hf)
    for when, state in states.items():
        reference = before_atp if when.startswith("atp") else before
        for field in ("attn", "inner_attn", "modes", "hooks", "storage"):
            assert state[field] == reference[field], (when, field)
        assert max_diff(state["weights"], reference["weights"]) == 0.0, when
    assert before["attn"] == "eager" and model.training and hf.training
    print(f"\n  after {', '.join(states)}: attention implementation still "
          f"{hf.config._attn_implementation!r}, "
          f"every module's mode, no hooks left, weights and their storage unchanged")


# --- 7. 16-bit models and accelerate


def test_a_bf16_model_runs_and_its_results_come_back_in_float32():
    hf64 = small_model("qwen2")
    hf16 = copy.deepcopy(hf64).to(torch.bfloat16)
    clean, noise, metric = prompt_pair(B, T, VOCAB)
    results = {}
    for name, hf in (("float64", hf64), ("bfloat16", hf16)):
        model = hf_adapter.adapt(hf)
        star = atp.atp_star(model, clean, noise, metric)
        effects = atp.activation_patching(model, clean, noise, metric, kinds=("z",), progress=False)
        results[name] = (star, effects)
    star16, effects16 = results["bfloat16"]
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all()
               for v in list(star16.values()) + [effects16["z"]])
    star64, effects64 = results["float64"]
    rel = max_diff(effects16, effects64) / effects64["z"].abs().max().item()
    rank = torch.corrcoef(torch.stack([star16["z"].flatten().double(), star64["z"].flatten()]))[0, 1].item()
    assert rel < 0.2 and rank > 0.9
    print(f"\n  bf16 Qwen2: AtP* and exact patching run, results in float32; "
          f"exact z effects within {rel:.1%} of float64's largest, "
          f"AtP* z scores correlate {rank:.3f} with float64's")


def test_a_model_dispatched_by_accelerate_with_a_layer_on_disk_gives_the_same_results(tmp_path):
    """accelerate's device_map puts AlignDevicesHooks on every module; layer 1's weights live on disk
    and are loaded for each forward. The adapter's hooks and forward_from must go through them."""
    pytest.importorskip("accelerate", reason="device_map needs accelerate")
    hf = small_model("neox")
    hf.save_pretrained(str(tmp_path / "model"))
    device_map = {"gpt_neox.embed_in": "cpu", "gpt_neox.emb_dropout": "cpu", "gpt_neox.rotary_emb": "cpu",
                  "gpt_neox.layers.0": "cpu", "gpt_neox.layers.1": "disk", "gpt_neox.layers.2": "cpu",
                  "gpt_neox.final_layer_norm": "cpu", "lm_head": "cpu"}
    dispatched = transformers.GPTNeoXForCausalLM.from_pretrained(
        str(tmp_path / "model"), device_map=device_map, dtype=torch.float64,
        offload_folder=str(tmp_path / "offload"))
    dispatched.eval()
    assert dispatched.hf_device_map == device_map
    on_disk = dispatched.gpt_neox.layers[1]
    assert hasattr(on_disk, "_hf_hook") and on_disk.mlp.dense_4h_to_h.weight.is_meta  # loaded at each forward
    clean, noise, metric = prompt_pair(B, T, VOCAB)
    rows = {}
    for name, m in (("plain", hf), ("dispatched", dispatched)):
        model = hf_adapter.adapt(m)
        star = atp.atp_star(model, clean, noise, metric)
        ranking, _ = atp.rank_nodes({k: s.mean(0) for k, s in star.items()})
        rows[name] = dict(activation_patching=atp.activation_patching(model, clean, noise, metric,
                                                                      progress=False),
                          atp_star=star,
                          verify=atp.verify(model, clean, noise, metric, ranking, 20, progress=False))
    for name in rows["plain"]:
        d = max_diff(rows["plain"][name], rows["dispatched"][name])
        print(f"\n  {name:20s} plain vs dispatched (layer 1 on disk): max diff {d:.1e}", end="")
        assert d <= TOL, name
