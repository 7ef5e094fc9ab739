"""tl_adapter.py on TransformerLens 4.x TransformerBridges, checked against the bridge's own hooks and
TransformerLens's own attribution patching.

Small random-weight Hugging Face models, built from a config (no downloads) and booted offline into a
float64 TransformerBridge, one per architecture family the adapter handles:
  gpt2:   learned positions, fused q/k/v, attention then MLP
  pythia: GPT-NeoX, rotary on a quarter of each head (fired only BEFORE the rotation), parallel blocks
  llama:  rotary, grouped-query attention (4 query heads share 2 key-value heads), gated MLP, RMSNorm
Claims checked, per family:
  - every site has the protocol's shape (k and v per key-value head) and is the tensor the forward
    consumes; q and k are the rotated vectors whose dot product, times attention_scale, IS the score;
  - exact patching equals a plain loop over the bridge's own run_with_hooks, one forward per node;
  - AtP equals TransformerLens's attribution_patch (its denoising convention mapped onto ours);
  - atp_minimal's fast forms equal its reference forms on the adapter, with and without
    enable_compatibility_mode();
  - forward_from (resuming a patched run) on Pythia equals the full forward; GPT-2 and Llama bridges
    ignore a key-value cache, so their adapters have none (a patched run is a full forward);
  - bridges the adapter cannot handle are refused with the reason, the user's bridge is left as it was.

    pytest -q -s tests/test_tl_adapter_bridge.py     # -s prints every max difference
"""

import copy
from importlib.metadata import version

import pytest
import torch

tl = pytest.importorskip("transformer_lens", reason="TransformerLens is not installed "
                         "(pip install transformer-lens==4.3.0); the bridge tests need it")
if version("transformer-lens").split(".")[0] != "4":
    pytest.skip(f"TransformerBridge tests need transformer-lens 4.x, found {version('transformer-lens')} "
                "(tests/test_tl_adapter.py covers HookedTransformer)", allow_module_level=True)

import transformers  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformer_lens.model_bridge import TransformerBridge  # noqa: E402
from transformer_lens.tools.analysis.attribution_patching import attribution_patch  # noqa: E402
from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb  # noqa: E402

import atp_minimal as atp  # noqa: E402
import tl_adapter  # noqa: E402
from helpers import (fast_and_reference, max_diff, prompt_pair, protocol_site_cache,  # noqa: E402
                     resumed_vs_full)

TOL = 1e-10  # float64: a different order of the same float64 operations
FAMILIES = ("gpt2", "pythia", "llama")
L, T, B, VOCAB, H, G, DH, M, D = 3, 6, 2, 50, 4, 2, 8, 16, 32
KV_HEADS = {"gpt2": H, "pythia": H, "llama": G}


# --- models and prompts


def tokenizer():
    """A word-level tokenizer over VOCAB tokens, with no BOS token: TransformerLens reloads a tokenizer
    that has one by its name, which fails offline."""
    inner = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="t0", pad_token="t0",
                                                eos_token=f"t{VOCAB - 1}")


def hf_config(family, **overrides):
    if family == "gpt2":
        fields = dict(n_layer=L, n_head=H, n_embd=D, n_inner=M, vocab_size=VOCAB, n_positions=16)
        cls = transformers.GPT2Config
    elif family == "pythia":  # Pythia's choices: rotary on 25% of each head, parallel attention and MLP
        fields = dict(num_hidden_layers=L, num_attention_heads=H, hidden_size=D, intermediate_size=M,
                      vocab_size=VOCAB, max_position_embeddings=16, rotary_pct=0.25,
                      use_parallel_residual=True)
        cls = transformers.GPTNeoXConfig
    elif family == "llama":
        fields = dict(num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=G, hidden_size=D,
                      intermediate_size=M, vocab_size=VOCAB, max_position_embeddings=16)
        cls = transformers.LlamaConfig
    else:  # qwen2: Llama's layout plus q/k/v biases, and a sliding window to switch on
        fields = dict(num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=G, hidden_size=D,
                      intermediate_size=M, vocab_size=VOCAB, max_position_embeddings=16)
        cls = transformers.Qwen2Config
    fields.update(overrides)
    return cls(**fields)


def small_hf_model(family, seed=0, **overrides):
    """A random 3-layer Hugging Face model in float64. Weights are large enough that several heads
    saturate (the QK fix then matters); biases and norm weights are random too."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family, **overrides)).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if p.dim() == 2 and "emb" not in name and "wte" not in name and "wpe" not in name:
                attention_in = any(s in name for s in ("c_attn", "query_key_value", "q_proj", "k_proj"))
                p.copy_((1.2 if attention_in else 0.3) * noise)
            elif p.dim() == 2:  # embeddings
                p.copy_(noise)
            else:  # biases, norm weights (around 1) and biases
                p.add_(0.1 * noise)
    return model.eval()


def boot(hf_model, compat=False):
    """A float64 TransformerBridge of a copy of hf_model (the bridge replaces submodules in place)."""
    bridge = TransformerBridge.boot_transformers("local-model", hf_model=copy.deepcopy(hf_model),
                                                 device="cpu", dtype=torch.float64, tokenizer=tokenizer())
    if compat:
        bridge.enable_compatibility_mode(disable_warnings=True)
    return bridge.eval()


def small_bridge(family, compat=False, seed=0, **overrides):
    return boot(small_hf_model(family, seed, **overrides), compat)


def largest(result):
    if isinstance(result, dict):
        return max(v.abs().max().item() for v in result.values())
    return result.abs().max().item()


# --- the bridge's own view: its hook names, no adapter


def tl_site(family, kind, layer):
    """The bridge hook a node sits at: q and k where the scores read them (hook_rot_q/k on Llama) or,
    on GPT-NeoX, the only q and k it fires, before the rotation (patching there is the same
    intervention, rotary being a fixed linear map per position)."""
    name = {"q": "attn.hook_q", "k": "attn.hook_k", "v": "attn.hook_v", "z": "attn.hook_z",
            "neuron": "mlp.hook_post"}[kind]
    if family == "llama" and kind in ("q", "k"):
        name = f"attn.hook_rot_{kind}"
    return f"blocks.{layer}.{name}"


def tl_run(bridge, idx, names, extra_hooks=()):
    """Logits and {name: tensor} through the bridge's run_with_hooks. The hooks return their tensor:
    a bridge puts back only what a hook returns, so the cached tensor is the one consumed."""
    cache = {}

    def keep(t, hook):
        cache[hook.name] = t
        return t
    logits = bridge.run_with_hooks(idx, fwd_hooks=[(n, keep) for n in names] + list(extra_hooks))
    return logits, {n: cache[bridge.hook_dict[n].name] for n in names}


# --- 1. the sites mean what atp_minimal needs


@pytest.mark.parametrize("family", FAMILIES)
def test_adapted_sites_have_the_protocol_shapes_and_are_the_tensors_the_forward_consumes(family):
    bridge = small_bridge(family)
    adapted = tl_adapter.adapt(bridge)
    clean, _, metric = prompt_pair(B, T, VOCAB)
    Gk = KV_HEADS[family]
    assert (adapted.config.n_kv_head == Gk and atp.n_units(adapted, "k") == Gk
            and atp.n_units(adapted, "q") == H)
    cache = protocol_site_cache(adapted, clean, H, Gk, DH, M, D)
    # q and k: the bridge's own post-rotary hooks (Llama), its q and k (GPT-2), or on GPT-NeoX its
    # pre-rotary q and k rotated here by Hugging Face's apply_rotary_pos_emb with the bridge's cos and sin.
    native = [tl_site(family, x, l) for x in "qk" for l in range(L)]
    angles = ([f"blocks.{l}.attn.hook_{x}" for l in range(L) for x in ("cos", "sin")]
              if family == "pythia" else [])
    _, tl_cache = tl_run(bridge, clean, native + angles)
    diffs = []
    for l in range(L):
        q, k = tl_cache[tl_site(family, "q", l)], tl_cache[tl_site(family, "k", l)]
        if family == "pythia":
            q, k = apply_rotary_pos_emb(q, k, tl_cache[f"blocks.{l}.attn.hook_cos"],
                                        tl_cache[f"blocks.{l}.attn.hook_sin"], unsqueeze_dim=2)
        diffs.append(max(max_diff(cache[f"blocks.{l}.attn.hook_q"], q),
                         max_diff(cache[f"blocks.{l}.attn.hook_k"], k)))
    # Equal to the last bit, except after a GPT-NeoX layer whose q and k went through the adapter's rotation
    # and its inverse (rounding), which moves what later layers see by about 1e-16 of their size.
    assert diffs[0] == 0.0 and max(diffs) <= (TOL if family == "pythia" else 0.0)
    # A reading hook's tensor is the very one consumed: the gradient with respect to the cached q equals
    # the gradient with respect to a leaf that the bridge's own hook puts in q's place (on GPT-NeoX, a
    # leaf in place of the pre-rotary q, so the gradients differ by the rotation's transpose).
    start = {"blocks.0.hook_resid_pre": lambda t: t.detach().requires_grad_(True)}
    with torch.enable_grad():
        logits, c = atp.run_with_cache(adapted, clean, ["blocks.1.attn.hook_q"], hooks=start)
        g_ours, = torch.autograd.grad(metric(logits).sum(), [c["blocks.1.attn.hook_q"]])
        leaf = {}
        swap = (tl_site(family, "q", 1),
                lambda t, hook: leaf.setdefault("q", t.detach().clone().requires_grad_(True)))
        start_tl = ("blocks.0.hook_resid_pre", lambda t, hook: t.detach().requires_grad_(True))
        g_tl, = torch.autograd.grad(metric(tl_run(bridge, clean, [], [start_tl, swap])[0]).sum(), [leaf["q"]])
        if family == "pythia":  # d metric / d q_pre = (d q_rot / d q_pre)^T d metric / d q_rot
            x = leaf["q"].detach().requires_grad_(True)
            rotated, _ = apply_rotary_pos_emb(x, x, tl_cache["blocks.1.attn.hook_cos"],
                                              tl_cache["blocks.1.attn.hook_sin"], unsqueeze_dim=2)
            g_ours, = torch.autograd.grad(rotated, [x], grad_outputs=g_ours)
    grad_diff = max_diff(g_ours, g_tl)
    assert g_tl.abs().max() > 1e-3 and grad_diff <= TOL
    print(f"\n  {family}: every site has the protocol shape in float64 (k, v: {Gk} key-value heads); "
          f"q/k equal the bridge's rotated q/k "
          f"(max diff {diffs[0]:.1e} in layer 0, {max(diffs):.1e} in all); "
          f"d metric / d cached q matches a bridge leaf to {grad_diff:.1e}")


@pytest.mark.parametrize("compat", (False, True), ids=("plain", "compatibility mode"))
@pytest.mark.parametrize("family", FAMILIES)
def test_adapted_q_k_and_attention_scale_reproduce_the_bridges_attention_pattern(family, compat):
    """What the QK fix recomputes, from the adapter's q, k and attention_scale(l) alone, is the pattern the
    bridge computed. Llama's bridge (like Hugging Face's Llama) runs its softmax in float32 even in a
    float64 model, so there the agreement is float32's."""
    bridge = small_bridge(family, compat)
    adapted = tl_adapter.adapt(bridge)
    clean, _, _ = prompt_pair(B, T, VOCAB)
    _, ours = atp.run_with_cache(adapted, clean,
                                 [f"blocks.{l}.attn.hook_{x}" for l in range(L) for x in "qk"])
    _, theirs = tl_run(bridge, clean, [f"blocks.{l}.attn.hook_pattern" for l in range(L)])
    worst, saturated = 0.0, 0.0
    for l in range(L):
        a = torch.softmax(atp.causal_scores(ours[f"blocks.{l}.attn.hook_q"], ours[f"blocks.{l}.attn.hook_k"],
                                            adapted.attention_scale(l)), -1)  # (B, H, T, S)
        worst = max(worst, max_diff(a, theirs[f"blocks.{l}.attn.hook_pattern"]))
        saturated = max(saturated, a[:, :, 2:].max().item())
    tol = 1e-6 if family == "llama" else 1e-12
    print(f"\n  {family}{', compatibility mode' if compat else ''}: recomputed pattern vs the bridge's: "
          f"max diff {worst:.1e} (tolerance {tol:.0e}; "
          f"largest probability beyond position 1: {saturated:.4f})")
    assert worst <= tol and saturated > 0.99


def test_a_per_layer_attention_scale_is_the_bridges():
    """GPT-2's scale_attn_by_inverse_layer_idx divides layer l's scores by l + 1 as well."""
    bridge = small_bridge("gpt2", scale_attn_by_inverse_layer_idx=True)
    adapted = tl_adapter.adapt(bridge)  # the probe checks the pattern with these scales
    scales = [adapted.attention_scale(l) for l in range(L)]
    assert scales == pytest.approx([DH ** -0.5 / (l + 1) for l in range(L)], rel=1e-15)


# --- 2. exact patching equals a plain loop over the bridge's own hooks


def tl_patching_loop(bridge, family, clean, noise, metric, neuron_stride):
    """Exact patching with nothing but the bridge's run_with_hooks: for each node, one forward on the
    clean prompts with the node's entry overwritten by its value in a noise run. kind -> (B, L, T, U),
    neurons every neuron_stride-th."""
    sites = [tl_site(family, kind, l) for kind in atp.KINDS for l in range(L)]
    with torch.no_grad():
        _, noise_cache = tl_run(bridge, noise, sites)
        base = metric(bridge(clean))  # (B,)
        effects = {}
        for kind in atp.KINDS:
            heads = KV_HEADS[family] if kind in ("k", "v") else H
            units = range(0, M, neuron_stride) if kind == "neuron" else range(heads)
            effects[kind] = torch.zeros(B, L, T, len(units), dtype=torch.float64)
            for l in range(L):
                name = tl_site(family, kind, l)
                for t in range(T):
                    for i, u in enumerate(units):
                        def patch(act, hook, name=name, t=t, u=u):
                            act = act.clone()
                            act[:, t, u] = noise_cache[name][:, t, u]
                            return act
                        logits = bridge.run_with_hooks(clean, fwd_hooks=[(name, patch)])
                        effects[kind][:, l, t, i] = metric(logits) - base
    return effects


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_patching_equals_a_plain_loop_over_the_bridges_hooks(family):
    bridge = small_bridge(family)
    clean, noise, metric = prompt_pair(B, T, VOCAB)
    ours = atp.activation_patching(tl_adapter.adapt(bridge), clean, noise, metric, progress=False)
    stride = 3
    theirs = tl_patching_loop(bridge, family, clean, noise, metric, stride)
    ours["neuron"] = ours["neuron"][..., ::stride]
    print()
    for kind in atp.KINDS:
        d = max_diff(ours[kind], theirs[kind])
        print(f"  {family} {kind:6s}: max |effect| {largest(theirs[kind]):.3f}, max diff vs the bridge's own "
              f"hooks {d:.1e}")
        assert largest(theirs[kind]) > 0.05 and d <= TOL, kind


# --- 3. AtP equals TransformerLens's attribution_patch


@pytest.mark.parametrize("compat", (False, True), ids=("plain", "compatibility mode"))
@pytest.mark.parametrize("family", FAMILIES)
def test_atp_equals_transformer_lens_attribution_patch(family, compat):
    """TransformerLens's attribution_patch (node granularity) uses the denoising convention: gradient at
    its `corrupt` run, Delta = its clean - its corrupt. So its clean = our noise and its corrupt = our
    clean, and: its attn_head_out (hook_z) node = our z estimate, its mlp_out node = the sum of our
    neuron estimates at that position (mlp_out is linear in the neurons), both averaged over the pairs."""
    bridge = small_bridge(family, compat)
    clean, noise, metric = prompt_pair(B, T, VOCAB, per_pair=False)  # TL's metric sees one pair at a time
    ours = atp.atp_estimates(tl_adapter.adapt(bridge), clean, noise, metric, kinds=("z", "neuron"))
    theirs = attribution_patch(bridge, clean=noise, corrupt=clean,
                               metric_fn=lambda logits: metric(logits).sum())
    z, neurons = ours["z"].mean(0), ours["neuron"].sum(-1).mean(0)  # (L, T, H), (L, T)
    worst, size, count = 0.0, 0.0, 0
    for node, score in theirs.node_scores.items():
        if node.kind == "attn_head_out":
            mine = z[node.layer, node.position, node.head].item()
        elif node.kind == "mlp_out":
            mine = neurons[node.layer, node.position].item()
        else:  # the embedding: no node of ours
            continue
        worst, size, count = max(worst, abs(mine - score)), max(size, abs(score)), count + 1
    print(f"\n  {family}{', compatibility mode' if compat else ''}: {count} nodes, "
          f"largest |estimate| {size:.3f}, max diff vs attribution_patch {worst:.1e}")
    assert count == L * T * (H + 1) and size > 0.05 and worst <= 1e-12


# --- 4. the fast forms equal the reference forms


@pytest.mark.parametrize("compat", (False, True), ids=("plain", "compatibility mode"))
@pytest.mark.parametrize("family", FAMILIES)
def test_fast_forms_equal_the_reference_forms_on_adapted_bridges(family, compat):
    """atp_minimal's Part II (batched, one backward graph) against its Part I (literal: one forward per
    node, the O(T^3) key fix, one forward + backward per dropped unit) on the adapter. Exact patching
    of the neurons is compared through verify (every 7th neuron node), the rest in full.
    One exception, on Llama only: sub-layer GradDrop's fast form subtracts the gradient through a write
    from the full gradient, and Llama's bridge (like Hugging Face's Llama) computes its softmax and its
    RMSNorm in float32 even in a float64 model, so that difference carries float32 rounding: there the
    tolerance is 1e-5 of the largest score (measured: about 1e-6; 5e-14 with both made float64)."""
    adapted = tl_adapter.adapt(small_bridge(family, compat))
    clean, noise, metric = prompt_pair(B, T, VOCAB)
    nodes = atp.all_nodes(adapted, "k", T)[::3] + atp.all_nodes(adapted, "neuron", T)[::7]
    cases = fast_and_reference(adapted, clean, noise, metric, nodes, exact_kinds=("q", "k", "v", "z"))
    print()
    for name, (fast, ref) in cases.items():
        d = max_diff(fast, ref)
        tol = 1e-5 * largest(ref) if family == "llama" and name == "GradDrop, sub-layers" else TOL
        print(f"  {family}{' compat' if compat else ''} {name:22s}: largest value {largest(ref):6.3f}, "
              f"max |fast - reference| {d:.1e} (tolerance {tol:.0e})")
        assert largest(ref) > 0.05 and d <= tol, name
    # Not vacuous: the heads saturate enough that the QK fix moves the query and key estimates.
    qk_moves = max_diff({k: cases["AtP"][0][k] for k in "qk"}, {k: cases["AtP + QK fix"][0][k] for k in "qk"})
    print(f"  {family} the QK fix changes q/k estimates by up to {qk_moves:.3f}")
    assert qk_moves > 0.05


def test_compatibility_mode_moves_the_residual_stream_but_not_effects_on_a_logit_difference():
    """enable_compatibility_mode() folds the norms and centres the writing weights and the unembedding
    (in float32, also on a float64 bridge). Residual sites move by the mean they lose; what patching a
    node does to a logit difference does not, beyond that float32 rounding."""
    hf = small_hf_model("pythia")
    plain, processed = tl_adapter.adapt(boot(hf)), tl_adapter.adapt(boot(hf, compat=True))
    clean, noise, metric = prompt_pair(B, T, VOCAB)
    resid = [f"blocks.{l}.hook_resid_post" for l in range(L)]
    moved = max_diff(atp.run_with_cache(plain, clean, resid)[1],
                     atp.run_with_cache(processed, clean, resid)[1])
    exact = atp.activation_patching(plain, clean, noise, metric, progress=False)
    d_exact = max_diff(exact, atp.activation_patching(processed, clean, noise, metric, progress=False))
    star = atp.atp_star(plain, clean, noise, metric)
    d_star = max_diff(star, atp.atp_star(processed, clean, noise, metric))
    print(f"\n  compatibility mode: residual stream moves by {moved:.1e}; "
          f"exact effects (up to {largest(exact):.2f}) by {d_exact:.1e}, "
          f"AtP* scores (up to {largest(star):.2f}) by {d_star:.1e}")
    assert moved > 1e-1 and d_exact <= 1e-4 * largest(exact) and d_star <= 1e-4 * largest(star)


# --- 5. resuming, refusals, and the user's bridge left as it was


def test_forward_from_on_pythia_with_cached_keys_and_values_equals_the_full_forward():
    """The GPT-NeoX adapter's forward_from (the bridge's start_at_layer and Hugging Face's key-value cache)
    on the clean residual stream of positions P.. with the cached keys and values of positions :P gives
    the full forward's logits, for every layer and split, also for the last position alone."""
    adapted = tl_adapter.adapt(small_bridge("pythia"))
    clean, _, _ = prompt_pair(B, T, VOCAB)
    worst, full = resumed_vs_full(adapted, clean, (0, 2, T - 1))
    print(f"\n  pythia: resumed runs vs the full forward, every layer and split: max diff {worst:.1e} "
          f"(logits up to {largest(full):.1f})")
    assert worst <= TOL and atp.resume_position(adapted, 3) == 3


@pytest.mark.parametrize("family", ("gpt2", "llama"))
def test_gpt2_and_llama_bridges_ignore_a_key_value_cache_so_their_adapters_have_no_forward_from(family):
    """Given the prefix's cache, these bridges (with transformers 5.x) compute the suffix as if it stood
    alone: the adapter offers no forward_from, and atp_minimal runs full forwards."""
    bridge = small_bridge(family)
    clean, _, _ = prompt_pair(B, T, VOCAB)
    P = 3
    with torch.no_grad():
        full = bridge(clean)
        _, cache = bridge(clean[:, :P], return_type="logits_and_cache")
        with_cache, alone = bridge(clean[:, P:], past_key_values=cache), bridge(clean[:, P:])
    wrong, ignored = max_diff(with_cache, full[:, P:]), max_diff(with_cache, alone)
    adapted = tl_adapter.adapt(bridge)
    print(f"\n  {family}: suffix logits with the prefix's cache vs the full forward: {wrong:.1f} off; vs the "
          f"suffix alone: {ignored:.1e}")
    assert wrong > 0.1 and ignored == 0.0
    assert not hasattr(adapted, "forward_from") and atp.resume_position(adapted, 3) == 0


REFUSED = {
    "sliding window (Qwen2)": (lambda: small_bridge("qwen2", use_sliding_window=True, sliding_window=2,
                                                    max_window_layers=0), "sliding"),
    "GPT-2 without score scaling": (lambda: small_bridge("gpt2", scale_attn_weights=False),
                                    "scale_attn_weights"),
    "GPT-2 scores upcast": (lambda: small_bridge("gpt2", reorder_and_upcast_attn=True),
                            "reorder_and_upcast_attn"),
    "per-head results": (lambda: switched(small_bridge("gpt2"), "set_use_attn_result"), "use_attn_result"),
    "split q/k/v input": (lambda: switched(small_bridge("llama"), "set_use_split_qkv_input"),
                          "use_split_qkv_input"),
    "score soft cap": (lambda: with_hf_field(small_bridge("llama"), "attn_logit_softcapping", 50.0),
                       "attn_logit_softcapping"),
    "another architecture (OPT)": (lambda: boot(transformers.OPTForCausalLM(transformers.OPTConfig(
        num_hidden_layers=2, num_attention_heads=4, hidden_size=D, ffn_dim=M, vocab_size=VOCAB,
        max_position_embeddings=16, word_embed_proj_dim=D)).double()), "OPTForCausalLM"),
}


def switched(bridge, switch):
    getattr(bridge, switch)(True)
    return bridge


def with_hf_field(bridge, field, value):
    setattr(bridge.original_model.config, field, value)
    return bridge


@pytest.mark.parametrize("case", list(REFUSED))
def test_bridges_the_adapter_cannot_handle_are_refused_with_the_reason(case):
    make, reason = REFUSED[case]
    with pytest.raises(ValueError, match=reason) as err:
        tl_adapter.adapt(make())
    print(f"\n  {case}: {str(err.value).splitlines()[-1].strip()}")


def test_qwen2_with_full_attention_is_handled_like_llama():
    """Qwen2: Llama's layout with q/k/v biases; grouped-query attention, the probe's identities hold."""
    adapted = tl_adapter.adapt(small_bridge("qwen2"))
    clean, noise, metric = prompt_pair(B, T, VOCAB)
    d = max_diff(atp.atp_star(adapted, clean, noise, metric),
                 atp.atp_star_reference(adapted, clean, noise, metric))
    print(f"\n  qwen2: {adapted.family} family, n_kv_head {adapted.config.n_kv_head}; "
          f"AtP* fast vs reference {d:.1e}")
    assert adapted.family == "llama" and adapted.config.n_kv_head == G and d <= TOL


def test_other_versions_are_refused_with_the_reason(monkeypatch):
    bridge = small_bridge("gpt2")
    monkeypatch.setattr(tl_adapter, "version", lambda name: "3.9.0")
    with pytest.raises(ImportError, match="3.9.0") as err:
        tl_adapter.adapt(bridge)
    print(f"\n  {err.value}")
    with pytest.raises(TypeError, match="TransformerBridge"):
        tl_adapter.adapt(bridge.original_model)


def test_hooks_on_unknown_sites_or_returning_the_wrong_shape_raise_a_clear_error():
    adapted = tl_adapter.adapt(small_bridge("pythia"))
    clean, _, _ = prompt_pair(B, T, VOCAB)
    with pytest.raises(KeyError, match="unknown hook site"):
        adapted(clean, hooks={"blocks.0.attn.hook_nothing": lambda t: None})
    for site in ("blocks.0.attn.hook_z", "blocks.0.attn.hook_q"):
        with pytest.raises(ValueError, match=site):
            adapted(clean, hooks={site: lambda t: t[:, :1]})


@pytest.mark.parametrize("family", FAMILIES)
def test_the_users_bridge_keeps_its_weights_hooks_and_mode(family):
    bridge = small_bridge(family)
    bridge.train()
    before = copy.deepcopy(bridge.state_dict())
    clean, noise, metric = prompt_pair(B, T, VOCAB)
    adapted = tl_adapter.adapt(bridge)
    atp.atp_star(adapted, clean, noise, metric)
    atp.verify(adapted, clean, noise, metric, atp.all_nodes(adapted, "q", T)[:8], 8, progress=False)
    after = bridge.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not hp.fwd_hooks and not hp.bwd_hooks for hp in bridge.hook_dict.values())
    assert bridge.training
    bridge.eval()  # and a bridge in eval mode stays in eval mode
    atp.atp_estimates(tl_adapter.adapt(bridge), clean, noise, metric)
    print(f"\n  {family}: weights unchanged, no hooks left, train and eval modes kept")
    assert not bridge.training
