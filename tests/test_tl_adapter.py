"""tl_adapter.py: atp_minimal on TransformerLens HookedTransformers, checked the way model.GPT is.

Small random-weight HookedTransformers of both styles the paper's models cover, built from a
HookedTransformerConfig (no downloads), in float64:
  gpt2:   learned positions, attention then MLP (sequential)
  pythia: rotary on a quarter of each head, attention and MLP in parallel (GPT-NeoX)
Claims checked:
  - a HookedTransformer holding model.GPT's weights gives model.GPT's results for every public function;
  - exact patching equals TransformerLens's own patching (transformer_lens.patching, and a plain hook
    loop for neurons);
  - the adapter's q, k and attention_scale reproduce TransformerLens's own attention pattern, and
    AtP, the QK fix, GradDrop and AtP* (atp_minimal's fast forms) equal its reference forms;
  - models the adapter cannot handle are refused with the reason, and the user's model is left as it was.

    pytest -q -s tests/test_tl_adapter.py     # -s prints every max difference
"""

import copy
import types
from contextlib import contextmanager
from importlib.metadata import version

import pytest
import torch

tl = pytest.importorskip("transformer_lens", reason="TransformerLens is not installed "
                         "(pip install transformer-lens==3.9.0); the adapter's tests need it")
if version("transformer-lens").split(".")[0] not in ("2", "3"):
    pytest.skip(f"HookedTransformer tests need transformer-lens 2.x or 3.x (4.0 removed HookedTransformer), "
                f"found {version('transformer-lens')} "
                f"(tests/test_tl_adapter_bridge.py covers TransformerBridge)",
                allow_module_level=True)
from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402
from transformer_lens import patching as tl_patching  # noqa: E402

import atp_minimal as atp  # noqa: E402
import tl_adapter  # noqa: E402
from helpers import (fast_and_reference, max_diff, prompt_pair, protocol_site_cache,  # noqa: E402
                     resumed_vs_full)
from model import GPT, GPTConfig  # noqa: E402

TOL = 1e-10  # float64: every comparison is a different order of the same float64 operations
KINDS = ("q", "k", "v", "z", "neuron")
STYLES = ("gpt2", "pythia")
L, T, B, VOCAB = 3, 6, 2, 50


# --- models and prompts


def small_model(style, seed=0, **overrides):
    """A random 3-layer HookedTransformer in float64. Queries and keys are scaled up so that several
    heads saturate (the QK fix then matters), and biases and LayerNorm parameters are random."""
    fields = dict(n_layers=L, d_model=32, n_heads=4, d_head=8, d_mlp=48, n_ctx=16, d_vocab=VOCAB,
                  normalization_type="LN", dtype=torch.float64, seed=seed, initializer_range=0.3)
    if style == "gpt2":
        fields.update(act_fn="gelu_new", positional_embedding_type="standard")
    else:  # Pythia's choices (TransformerLens's GPTNeoXForCausalLM config): rotary_pct 0.25
        fields.update(act_fn="gelu", positional_embedding_type="rotary", rotary_dim=2,
                      rotary_adjacent_pairs=False, parallel_attn_mlp=True, default_prepend_bos=False)
    fields.update(overrides)
    model = HookedTransformer(HookedTransformerConfig(**fields))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("W_Q", "W_K")):
                p.mul_(4.0)
            elif not name.split(".")[-1].startswith("W_"):  # biases, LayerNorm weights and biases
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.eval()


# --- TransformerLens's own view: native hook names, no adapter


def tl_qk_site(model, kind, layer):
    """TransformerLens's hook for the q or k the scores use: hook_rot_q/k on rotary models, else hook_q/k."""
    rot = "rot_" if model.cfg.positional_embedding_type == "rotary" else ""
    return f"blocks.{layer}.attn.hook_{rot}{kind}"


def tl_run(model, idx, names, extra_hooks=(), grad=False):
    """Logits and {name: tensor} of the tensors the forward consumed, through TL's run_with_hooks."""
    cache = {}
    hooks = [(n, lambda t, hook, n=n: cache.__setitem__(n, t)) for n in names] + list(extra_hooks)
    with torch.set_grad_enabled(grad):
        if grad:  # start the graph at the embedding, as atp_minimal does
            hooks.insert(0, ("hook_embed", lambda t, hook: t.detach().requires_grad_(True)))
        logits = model.run_with_hooks(idx, fwd_hooks=hooks)
    return logits, cache


@contextmanager
def default_dtype(dtype):
    """transformer_lens.patching stores its results in a torch.zeros of the default dtype."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# --- 1. the sites mean what atp_minimal needs


@pytest.mark.parametrize("style", STYLES)
def test_adapted_sites_have_the_protocol_shapes_and_are_the_tensors_the_forward_consumes(style):
    model = small_model(style)
    adapted = tl_adapter.adapt(model)
    clean, _, metric = prompt_pair(B, T, VOCAB)
    cache = protocol_site_cache(adapted, clean, H=4, Hkv=4, Dh=8, M=48, D=32)
    _, native = tl_run(model, clean, [tl_qk_site(model, k, l) for k in ("q", "k") for l in range(L)])
    diff = max(max_diff(cache[f"blocks.{l}.attn.hook_{k}"], native[tl_qk_site(model, k, l)])
               for k in ("q", "k") for l in range(L))
    assert diff == 0.0, "our q/k must be TransformerLens's " + (
        "hook_rot_q/k" if style == "pythia" else "hook_q/k")
    # A reading hook's tensor is the very one consumed: the gradient with respect to the cached q equals
    # the gradient with respect to a leaf that TransformerLens's own hook puts in q's place.
    start = {"blocks.0.hook_resid_pre": lambda t: t.detach().requires_grad_(True)}
    with torch.enable_grad():
        logits, c = atp.run_with_cache(adapted, clean, ["blocks.1.attn.hook_q"], hooks=start)
        g_ours, = torch.autograd.grad(metric(logits).sum(), [c["blocks.1.attn.hook_q"]])
        leaf = {}
        swap = (tl_qk_site(model, "q", 1),
                lambda t, hook: leaf.setdefault("q", t.detach().clone().requires_grad_(True)))
        g_tl, = torch.autograd.grad(metric(tl_run(model, clean, [], [swap], grad=True)[0]).sum(), [leaf["q"]])
    grad_diff = max_diff(g_ours, g_tl)
    assert g_tl.abs().max() > 1e-3 and grad_diff <= TOL
    print(f"\n  {style}: every site has the protocol shape in float64; q/k are TransformerLens's "
          f"{'hook_rot_q/k' if style == 'pythia' else 'hook_q/k'} exactly (max diff {diff:.1e}); "
          f"d metric / d cached q matches a TL leaf to {grad_diff:.1e}")


# --- 2. GPT-2 style: the same weights give model.GPT's results


def gpt_and_hooked_twin(seed=0):
    """A random float64 model.GPT, and a HookedTransformer loaded with its weights by TransformerLens's
    own GPT-2 converter (model.GPT's modules carry Hugging Face's names), with no weight processing."""
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights
    torch.manual_seed(seed)
    gpt = GPT(GPTConfig(n_layer=L, n_head=4, n_embd=32, n_positions=16, vocab_size=VOCAB,
                        n_inner=48)).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in gpt.named_parameters():
            scale = (0.8 if "c_attn.weight" in name
                     else 0.3 if name.endswith("weight") and p.dim() == 2 else 0.1)
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    cfg = HookedTransformerConfig(n_layers=L, d_model=32, n_heads=4, d_head=8, d_mlp=48, n_ctx=16,
                                  d_vocab=VOCAB, act_fn="gelu_new", normalization_type="LN", eps=1e-5,
                                  dtype=torch.float64)
    twin = HookedTransformer(cfg)
    # tied unembedding
    hf_view = types.SimpleNamespace(transformer=gpt.transformer, lm_head=gpt.transformer.wte)
    # load_state_dict, not load_and_process_state_dict: TransformerLens 3.9 processes weights in
    # float32 even with every processing step off, which would round float64 weights.
    missing, unexpected = twin.load_state_dict(convert_gpt2_weights(hf_view, cfg), strict=False)
    # Left out: attention buffers, and the unembedding bias GPT-2 does not have (initialised to zero).
    assert not unexpected and all(k.endswith(("IGNORE", "mask", "b_U"))
                                  for k in missing), (missing, unexpected)
    assert not twin.unembed.b_U.any()
    return gpt, twin.eval()


def every_public_function(model, clean, noise, metric):
    """name -> result of every public function of atp_minimal that takes a model, on one model."""
    out = {}
    for positions in ("each", "all"):
        out[f"activation_patching {positions}"] = atp.activation_patching(model, clean, noise, metric,
                                                                          positions=positions, progress=False)
        for qk_fix in (False, True):
            out[f"atp_estimates qk_fix={qk_fix} {positions}"] = atp.atp_estimates(
                model, clean, noise, metric, qk_fix=qk_fix, positions=positions)
            for unit in ("layer", "sublayer"):
                out[f"grad_drop_scores qk_fix={qk_fix} {unit} {positions}"] = atp.grad_drop_scores(
                    model, clean, noise, metric, qk_fix=qk_fix, positions=positions, unit=unit)
    out["activation_patching_reference"] = atp.activation_patching_reference(model, clean, noise, metric)
    out["atp_estimates_reference"] = atp.atp_estimates_reference(model, clean, noise, metric)
    out["atp_qk_fix_reference"] = atp.atp_qk_fix_reference(model, clean, noise, metric)
    out["grad_drop_scores_reference"] = atp.grad_drop_scores_reference(model, clean, noise, metric)
    out["atp_star"] = atp.atp_star(model, clean, noise, metric)
    out["atp_star_reference"] = atp.atp_star_reference(model, clean, noise, metric)
    out["attribution_patching qk_fix=True grad_drop=True"] = atp.attribution_patching(
        model, clean, noise, metric, qk_fix=True, grad_drop=True)
    ranking, _ = atp.rank_nodes({k: s.mean(0) for k, s in out["atp_star"].items()})
    out["patch_nodes"] = atp.patch_nodes(model, clean, noise, metric, ranking[:5])
    out["verify"] = atp.verify(model, clean, noise, metric, ranking, 12, progress=False)
    out["verify_reference"] = atp.verify_reference(model, clean, noise, metric, ranking, 12)
    out["subset_sampling"] = atp.subset_sampling(model, clean, noise, metric, ranking[:40], 0.3, 8,
                                                 progress=False)
    out["subset_sampling_reference"] = atp.subset_sampling_reference(model, clean, noise, metric,
                                                                     ranking[:40], 0.3, 8)
    bound = atp.false_negative_bound(model, clean, noise, metric, ranking, K=20, p=0.3, n_samples=40,
                                     progress=False)
    out["false_negative_bound"] = {k: bound[k] for k in ("verified", "verified_effects", "theta_star",
                                                         "worst_node", "c_ss", "se", "df")}
    return out


def test_a_hooked_transformer_with_gpt_weights_gives_model_gpt_results_for_every_public_function():
    gpt, twin = gpt_and_hooked_twin()
    clean, noise, metric = prompt_pair(B, T, VOCAB)
    with torch.no_grad():
        logits_diff = max_diff(gpt(clean), twin(clean))
    assert logits_diff <= TOL
    ours = every_public_function(gpt, clean, noise, metric)
    theirs = every_public_function(tl_adapter.adapt(twin), clean, noise, metric)
    print(f"\n  logits: max diff {logits_diff:.1e}")
    worst = 0.0
    for name in ours:
        d = max_diff(ours[name], theirs[name])
        worst = max(worst, d)
        print(f"  {name:55s} max diff {d:.1e}")
        assert d <= TOL, name
    top = ours["atp_star"]["k"].abs().max().item()
    assert top > 0.05, "the comparison must not be between near-zero scores"
    print(f"  worst over every public function {worst:.1e} "
          f"(tolerance {TOL:.0e}; largest AtP* key score {top:.2f})")


# --- 3. exact patching equals TransformerLens's own patching


@pytest.mark.parametrize("style", STYLES)
def test_exact_patching_equals_transformer_lens_patching(style, monkeypatch):
    """Our convention: run on clean, patch in noise. TransformerLens's helpers run on `corrupted_tokens`
    and patch in values from a cache, so: corrupted_tokens = our clean prompts, cache = the noise run.
    TL patches the whole batch at once and needs a scalar metric: a weighted sum over pairs, with
    weights that make a wrong pair visible. On rotary models TL patches the un-rotated q and k
    (hook_q/hook_k), we the rotated ones: the same intervention."""
    monkeypatch.setattr(tl_patching, "tqdm", lambda items, **kwargs: items)  # no progress bars
    model = small_model(style)
    clean, noise, metric = prompt_pair(B, T, VOCAB)
    ours = atp.activation_patching(tl_adapter.adapt(model), clean, noise, metric, progress=False)
    weights = torch.tensor([1.0, 0.37], dtype=torch.float64)
    scalar = lambda logits: (weights * metric(logits)).sum()
    _, noise_cache = model.run_with_cache(noise)
    with torch.no_grad():
        base = scalar(model(clean)).item()
    helpers = {"q": tl_patching.get_act_patch_attn_head_q_by_pos,
               "k": tl_patching.get_act_patch_attn_head_k_by_pos,
               "v": tl_patching.get_act_patch_attn_head_v_by_pos,
               "z": tl_patching.get_act_patch_attn_head_out_by_pos}
    theirs = {}
    with default_dtype(torch.float64), torch.no_grad():
        for kind, helper in helpers.items():
            theirs[kind] = helper(model, clean, noise_cache, scalar) - base  # (L, T, H)
        neurons = torch.zeros(L, T, model.cfg.d_mlp)  # a plain hook loop: TL has no neuron helper
        for l in range(L):
            name = f"blocks.{l}.mlp.hook_post"
            for t in range(T):
                for m in range(model.cfg.d_mlp):
                    def patch(act, hook, t=t, m=m):
                        act = act.clone()
                        act[:, t, m] = noise_cache[name][:, t, m]
                        return act
                    patched = scalar(model.run_with_hooks(clean, fwd_hooks=[(name, patch)])).item()
                    neurons[l, t, m] = patched - base
        theirs["neuron"] = neurons
    print()
    for kind in KINDS:
        mine = (weights.view(B, 1, 1, 1) * ours[kind]).sum(0)  # (L, T, U)
        d = max_diff(mine, theirs[kind])
        print(f"  {style} {kind:6s}: max |effect| {theirs[kind].abs().max():.3f}, "
              f"max diff vs TransformerLens {d:.1e}")
        assert theirs[kind].abs().max() > 0.05 and d <= TOL, kind


@pytest.mark.parametrize("style", STYLES)
def test_patching_a_query_or_key_before_or_after_rotary_is_the_same_intervention(style):
    """Rotary embedding is linear and fixed per position, so swapping in the noise q (or k) of one
    head at one position before the rotation (TL's hook_q) or after it (hook_rot_q, our site) gives
    the same logits. On the learned-position model both hooks are the same site."""
    model = small_model(style)
    clean, noise, _ = prompt_pair(B, T, VOCAB)
    if style == "gpt2":
        assert "blocks.0.attn.hook_rot_q" not in model.hook_dict
        return
    worst, moved, effect = 0.0, 0.0, 0.0
    with torch.no_grad():
        clean_logits = model(clean)
        for kind in ("q", "k"):
            sites = (f"attn.hook_{kind}", f"attn.hook_rot_{kind}")
            _, nz = tl_run(model, noise, [f"blocks.{l}.{s}" for l in range(L) for s in sites])
            _, cl = tl_run(model, clean, [f"blocks.{l}.{s}" for l in range(L) for s in sites])
            for l in range(L):
                rotated = f"blocks.{l}.{sites[1]}"
                moved = max(moved, max_diff(cl[rotated], cl[f"blocks.{l}.{sites[0]}"]))
                for t in (1, 3, 5):
                    for h in range(model.cfg.n_heads):
                        logits = []
                        for s in sites:
                            def patch(act, hook, name=f"blocks.{l}.{s}"):
                                act = act.clone()
                                act[:, t, h] = nz[name][:, t, h]
                                return act
                            logits.append(model.run_with_hooks(clean, fwd_hooks=[(f"blocks.{l}.{s}", patch)]))
                        worst = max(worst, max_diff(*logits))
                        effect = max(effect, max_diff(logits[0], clean_logits))
    print(f"\n  rotation moves q/k by up to {moved:.2f}; patches move logits by up to {effect:.2f}; patched "
          f"before vs after the rotation: max diff {worst:.1e}")
    assert moved > 0.1 and effect > 0.1 and worst <= 1e-12


# --- 4. AtP, the QK fix, GradDrop and AtP* equal their reference forms


SCALES = {"default": {}, "own scale": dict(attn_scale=3.0),
          "per-layer scale": dict(scale_attn_by_inverse_layer_idx=True)}


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("scale", list(SCALES))
def test_adapted_q_k_and_attention_scale_reproduce_transformer_lens_attention_pattern(style, scale):
    """What the QK fix recomputes, from the adapter's q, k and attention_scale(l) alone, is the pattern
    TransformerLens computed (its own run_with_cache), also with a custom or per-layer scale."""
    model = small_model(style, **SCALES[scale])
    adapted = tl_adapter.adapt(model)
    clean, _, _ = prompt_pair(B, T, VOCAB)
    _, ours = atp.run_with_cache(adapted, clean,
                                 [f"blocks.{l}.attn.hook_{x}" for l in range(L) for x in "qk"])
    _, theirs = model.run_with_cache(clean)
    worst, saturated = 0.0, 0.0
    for l in range(L):
        a = torch.softmax(atp.causal_scores(ours[f"blocks.{l}.attn.hook_q"], ours[f"blocks.{l}.attn.hook_k"],
                                            adapted.attention_scale(l)), -1)  # (B, H, T, S)
        worst = max(worst, max_diff(a, theirs[f"blocks.{l}.attn.hook_pattern"]))
        saturated = max(saturated, a[:, :, 2:].max().item())
    print(f"\n  {style}, {scale}: recomputed pattern vs TransformerLens's: max diff {worst:.1e} "
          f"(largest probability beyond position 1: {saturated:.4f})")
    assert worst <= 1e-12 and saturated > 0.99


@pytest.mark.parametrize("style", STYLES)
def test_fast_forms_equal_the_reference_forms_on_adapted_models(style):
    """atp_minimal's Part II (fast: resumed, batched, one backward graph) against its Part I (literal:
    one forward per node, the O(T^3) key fix, one forward + backward per dropped unit) on the adapter."""
    adapted = tl_adapter.adapt(small_model(style))
    clean, noise, metric = prompt_pair(B, T, VOCAB)
    nodes = atp.all_nodes(adapted, "k", T)[::3] + atp.all_nodes(adapted, "neuron", T)[::29]
    cases = fast_and_reference(adapted, clean, noise, metric, nodes)
    print()
    for name, (fast, ref) in cases.items():
        d = max_diff(fast, ref)
        size = (max(v.abs().max().item() for v in ref.values()) if isinstance(ref, dict)
                else ref.abs().max().item())
        print(f"  {style} {name:22s}: largest value {size:6.3f}, max |fast - reference| {d:.1e}")
        assert size > 0.05 and d <= TOL, name
    # Not vacuous: the heads saturate enough that the QK fix moves the query and key estimates.
    qk_moves = max_diff({k: cases["AtP"][0][k] for k in "qk"}, {k: cases["AtP + QK fix"][0][k] for k in "qk"})
    print(f"  {style} the QK fix changes q/k estimates by up to {qk_moves:.3f}")
    assert qk_moves > 0.05


# --- 5. the fast resumed forward


@pytest.mark.parametrize("style", STYLES)
def test_forward_from_with_cached_keys_and_values_equals_the_full_forward(style):
    """forward_from (TL's start_at_layer + key-value cache) on the clean residual stream of positions
    P.. with the cached values of positions :P gives the full forward's logits, also for the last
    position alone (our own unembedding tail)."""
    adapted = tl_adapter.adapt(small_model(style))
    clean, _, _ = prompt_pair(B, T, VOCAB)
    worst, _ = resumed_vs_full(adapted, clean, (0, 2, T - 1))
    print(f"\n  {style}: resumed runs vs the full forward, every layer and split: max diff {worst:.1e}")
    assert worst <= TOL


# --- 6. refusals, and the user's model left as it was


REFUSED = {
    "grouped-query attention": (dict(n_key_value_heads=2), "n_key_value_heads"),
    "attention-only": (dict(attn_only=True), "attn_only"),
    "ALiBi": (dict(positional_embedding_type="alibi"), "positional_embedding_type"),
    "shortformer": (dict(positional_embedding_type="shortformer"), "positional_embedding_type"),
    "local attention": (dict(attn_types=["global", "local", "global"], window_size=2), "attn_types"),
    "score soft cap": (dict(attn_scores_soft_cap=50.0), "attn_scores_soft_cap"),
    "split q/k/v input": (dict(use_split_qkv_input=True), "use_split_qkv_input"),
    "gated MLP": (dict(gated_mlp=True), "GatedMLP"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_models_the_adapter_cannot_handle_are_refused_with_the_reason(case):
    overrides, field = REFUSED[case]
    model = small_model("gpt2", **overrides)
    with pytest.raises(ValueError, match=field) as err:
        tl_adapter.adapt(model)
    print(f"\n  {case}: {str(err.value).splitlines()[-1].strip()}")


def test_other_objects_and_versions_are_refused_with_the_reason(monkeypatch):
    gpt, _ = gpt_and_hooked_twin()
    with pytest.raises(TypeError, match="HookedTransformer"):
        tl_adapter.adapt(gpt)
    model = small_model("gpt2")
    monkeypatch.setattr(tl_adapter, "version", lambda name: "4.0.0")
    with pytest.raises(ImportError, match="4.0.0") as err:
        tl_adapter.adapt(model)
    print(f"\n  {err.value}")


def test_hooks_on_unknown_sites_or_returning_the_wrong_shape_raise_a_clear_error():
    adapted = tl_adapter.adapt(small_model("gpt2"))
    clean, _, _ = prompt_pair(B, T, VOCAB)
    with pytest.raises(KeyError, match="hook_q_unrotated"):  # rotary models only
        adapted(clean, hooks={"blocks.0.attn.hook_q_unrotated": lambda t: None})
    with pytest.raises(ValueError, match="blocks.0.attn.hook_z"):
        adapted(clean, hooks={"blocks.0.attn.hook_z": lambda t: t[:, :1]})


@pytest.mark.parametrize("style", STYLES)
def test_the_users_model_keeps_its_weights_hooks_and_mode(style):
    model = small_model(style)
    model.train()
    before = copy.deepcopy(model.state_dict())
    clean, noise, metric = prompt_pair(B, T, VOCAB)
    adapted = tl_adapter.adapt(model)
    atp.atp_star(adapted, clean, noise, metric)
    atp.activation_patching(adapted, clean, noise, metric, progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not hp.fwd_hooks and not hp.bwd_hooks for hp in model.hook_dict.values())
    assert model.training
    model.eval()  # and a model in eval mode stays in eval mode
    atp.atp_estimates(tl_adapter.adapt(model), clean, noise, metric)
    print(f"  {style}: weights unchanged, no hooks left, train and eval modes kept")
    assert not model.training


def test_processed_weights_give_the_same_effects_for_a_logit_difference_but_not_for_a_raw_logit():
    """TransformerLens's from_pretrained folds LayerNorm, centres the writing weights and the unembedding
    and folds value biases. That changes some site values (v and z by a constant, the residual stream
    by its mean) but not what patching a node does, nor any estimate, for a metric blind to a shift of
    all logits at a position (logit differences, log-probabilities). A metric reading one raw logit
    does change (centring the unembedding subtracts the mean logit): load with
    from_pretrained_no_processing for such metrics. Tolerance 1e-4: TransformerLens 3.9 processes the
    weights in float32, also for a float64 model."""
    model = small_model("pythia")
    processed = copy.deepcopy(model)
    processed.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
    clean, noise, metric = prompt_pair(B, T, VOCAB)
    raw_logit = lambda logits: logits[:, -1, 3]
    for name, fn in (("exact", lambda m, f: atp.activation_patching(m, clean, noise, f, progress=False)),
                     ("AtP*", lambda m, f: atp.atp_star(m, clean, noise, f))):
        d = max_diff(fn(tl_adapter.adapt(model), metric), fn(tl_adapter.adapt(processed), metric))
        d_raw = max_diff(fn(tl_adapter.adapt(model), raw_logit), fn(tl_adapter.adapt(processed), raw_logit))
        print(f"\n  {name}: processed vs unprocessed weights, max diff {d:.1e} for a logit difference, "
              f"{d_raw:.1e} for one raw logit", end="")
        assert d <= 1e-4 and d_raw > 1e-2
    print()
