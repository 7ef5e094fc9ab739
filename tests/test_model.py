"""Tests for model.py: our GPT-2 against Hugging Face's, site by site, plus the hook contract,
the checkpoint loader's errors and the tokenizer. Everything runs offline on tiny random models.

Run `pytest -s tests/test_model.py` to see the evidence (max diffs, shapes) each test prints.
"""

import copy
import os
import shutil
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import max_diff
from model import GPT, get_tokenizer

transformers = pytest.importorskip("transformers")

# A tiny config (2 layers, 4 heads, d_model 32), and an odd one: 2 heads of 12 dims, an MLP width that is
# not 4*D.
SMALL = dict(n_layer=2, n_head=4, n_embd=32, vocab_size=64, n_positions=16)
ODD = dict(n_layer=3, n_head=2, n_embd=24, vocab_size=50, n_positions=12, n_inner=40)


# --- helpers


def make_hf(directory, seed=0, **shape):
    """A random transformers.GPT2LMHeadModel in eval mode, saved with save_pretrained into `directory`.
    Every parameter (biases and layer-norm gains included) gets noise, so a mistake in any of them shows."""
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(**shape, bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    hf = transformers.GPT2LMHeadModel(cfg).eval()  # a freshly built HF model is in train mode (dropout on)
    with torch.no_grad():
        for p in hf.parameters():  # lm_head.weight is wte.weight, so it is perturbed once and stays tied
            p.add_(0.2 * torch.randn_like(p))
    hf.save_pretrained(str(directory))
    return hf


def tokens(vocab_size, B=3, T=None, n_positions=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (B, T or n_positions), generator=g)  # (B, T)


def cache_all(model, idx, extra=None):
    """Run the model with a caching hook on every site; return (logits, {site: tensor})."""
    cache = {}

    def saver(name):
        def fn(t):
            cache[name] = t
        return fn

    hooks = {name: saver(name) for name in model.site_names()}
    hooks.update(extra or {})
    return model(idx, hooks=hooks), cache


def snapshot(directory):
    """Every file under `directory` with its bytes, to prove the loader wrote nothing there."""
    out = {}
    for root, _, files in os.walk(directory):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, directory)] = fh.read()
    return out


def copy_dir(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(hf model, saved directory, our model loaded from it), shared by the tests that only read them."""
    d = tmp_path_factory.mktemp("small")
    hf = make_hf(d, **SMALL)
    return hf, d, GPT.from_pretrained(str(d))


# --- 1. logits equal transformers' GPT-2


@pytest.mark.parametrize("shape", [SMALL, ODD], ids=["small", "odd"])
def test_logits_match_transformers_in_float32_and_float64(tmp_path, shape):
    hf = make_hf(tmp_path, **shape)
    ours = GPT.from_pretrained(str(tmp_path))
    idx = tokens(shape["vocab_size"], n_positions=shape["n_positions"])
    with torch.no_grad():
        ours32, ref32 = ours(idx), hf(idx).logits
        ours64, ref64 = ours.double()(idx), hf.double()(idx).logits  # .double() converts both in place
    d32, d64 = max_diff(ours32, ref32), max_diff(ours64, ref64)
    print(f"\n{shape}: logits max abs diff vs transformers: float32 {d32:.2e}, float64 {d64:.2e} "
          f"(logits span {ref64.min():.2f}..{ref64.max():.2f})")
    torch.testing.assert_close(ours32, ref32, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours64, ref64, rtol=0, atol=1e-10)


@pytest.mark.parametrize("prefixed", [True, False], ids=["transformer.-prefix", "no-prefix"])
def test_pytorch_model_bin_loads_the_same_as_safetensors(tmp_path, small, prefixed):
    hf, _, from_st = small
    # transformers 5 writes safetensors even when given safe_serialization=False, so write the .bin by hand;
    # old GPT-2 checkpoints (e.g. openai-community/gpt2's .bin) have keys without "transformer.".
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    if not prefixed:
        sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    hf.config.save_pretrained(str(tmp_path))
    torch.save(sd, tmp_path / "pytorch_model.bin")
    from_bin = GPT.from_pretrained(str(tmp_path))
    idx = tokens(SMALL["vocab_size"])
    with torch.no_grad():
        a, b, ref = from_bin(idx), from_st(idx), hf(idx).logits
    print(f"\n.bin ({len(sd)} keys, prefixed={prefixed}) vs safetensors: max abs diff {max_diff(a, b):.2e}; "
          f"vs transformers {max_diff(a, ref):.2e}")
    assert torch.equal(a, b)


# --- 2. every site against transformers, layer by layer


def test_each_site_matches_transformers_hidden_states_and_attentions(small):
    hf, d, _ = small
    ours, hf = GPT.from_pretrained(str(d)).double(), copy.deepcopy(hf).double()  # the fixture stays float32
    L = SMALL["n_layer"]
    idx = tokens(SMALL["vocab_size"])
    with torch.no_grad():
        _, cache = cache_all(ours, idx)
        out = hf(idx, output_hidden_states=True, output_attentions=True)
    # HF's hidden_states: L+1 entries; [l] is block l's input, the last already has ln_f applied.
    assert len(out.hidden_states) == L + 1 and len(out.attentions) == L
    pairs = [(f"blocks.{l}.hook_resid_pre", out.hidden_states[l]) for l in range(L)]
    pairs += [("ln_final.hook_normalized", out.hidden_states[L])]
    pairs += [(f"blocks.{l}.attn.hook_pattern", out.attentions[l]) for l in range(L)]
    print()
    for site, ref in pairs:
        d = max_diff(cache[site], ref)
        print(f"  {site:28s} max abs diff {d:.2e}")
        torch.testing.assert_close(cache[site], ref, rtol=0, atol=1e-10, msg=lambda m: f"{site}: {m}")


# --- 3. the site list and the shape comments


def test_every_site_is_reached_once_with_its_documented_shape(small):
    _, _, model = small
    cfg = model.config
    B, T = 2, 7
    H, Dh, D, M = cfg.n_head, cfg.d_head, cfg.n_embd, cfg.d_mlp
    calls = {name: [] for name in model.site_names()}
    hooks = {name: (lambda t, name=name: calls[name].append(tuple(t.shape))) for name in calls}
    with torch.no_grad():
        logits = model(tokens(cfg.vocab_size, B=B, T=T), hooks=hooks)
    assert logits.shape == (B, T, cfg.vocab_size)
    # embed and pos_embed, 13 per block, ln_final
    assert len(set(model.site_names())) == len(model.site_names()) == 2 + 13 * cfg.n_layer + 1

    def expected(name):
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("hook_q", "hook_k", "hook_v", "hook_z"):
            return (B, T, H, Dh)
        if leaf in ("hook_attn_scores", "hook_pattern"):
            return (B, H, T, T)  # (B, H, T, S) with S == T
        if name.endswith(("mlp.hook_pre", "mlp.hook_post")):
            return (B, T, M)
        return (B, T, D)  # embed, pos_embed, resid_pre/mid/post, attn_out, mlp_out, ln_final

    print()
    for name, shapes in calls.items():
        assert shapes == [expected(name)], (f"{name}: reached with shapes {shapes}, "
                                            f"expected [{expected(name)}]")
        print(f"  {name:28s} {shapes[0]}")


# --- 4. hooks: reading leaves everything alone, patching changes only what is downstream


def test_identity_and_none_hooks_leave_logits_bit_identical(small):
    _, _, model = small
    idx = tokens(SMALL["vocab_size"])
    with torch.no_grad():
        plain = model(idx)
        ident = model(idx, hooks={n: (lambda t: t) for n in model.site_names()})
        none = model(idx, hooks={n: (lambda t: None) for n in model.site_names()})
    print(f"\nidentity hooks: max diff {max_diff(ident, plain):.1e}; None hooks: {max_diff(none, plain):.1e}")
    assert torch.equal(ident, plain) and torch.equal(none, plain)


def test_patching_resid_pre_changes_the_logits_and_nothing_upstream(small):
    _, _, model = small
    idx = tokens(SMALL["vocab_size"])
    site = "blocks.1.hook_resid_pre"
    with torch.no_grad():
        clean_logits, clean = cache_all(model, idx)
        # random noise, not a constant: a constant shift of the stream is removed by every LayerNorm
        noise = torch.randn(idx.shape + (SMALL["n_embd"],), generator=torch.Generator().manual_seed(2))
        patched_logits, patched = cache_all(model, idx, extra={site: lambda t: t + noise})
    names = model.site_names()
    upstream = names[:names.index(site)]
    for name in upstream:
        assert torch.equal(patched[name], clean[name]), f"{name} upstream of {site} changed"
    d = max_diff(patched_logits, clean_logits)
    print(f"\n{len(upstream)} sites upstream of {site} bit-identical; logits moved by up to {d:.2e}")
    assert d > 1e-3


def test_patching_the_last_position_leaves_earlier_positions_bit_identical(small):
    _, _, model = small
    idx = tokens(SMALL["vocab_size"])
    T = idx.shape[1]

    def patch_last(z):  # (B, T, H, Dh): overwrite every head's output at position T-1
        z = z.clone()
        z[:, T - 1] = 3.0
        return z

    with torch.no_grad():
        clean = model(idx)
        patched = model(idx, hooks={"blocks.0.attn.hook_z": patch_last})
    d_last = max_diff(patched[:, T - 1], clean[:, T - 1])
    print(f"\npositions 0..{T - 2}: max diff {max_diff(patched[:, :T - 1], clean[:, :T - 1]):.1e}; "
          f"position {T - 1}: {d_last:.2e}")
    assert torch.equal(patched[:, :T - 1], clean[:, :T - 1])  # causal: no position sees a later one
    assert d_last > 1e-3


def test_patching_one_batch_row_changes_only_that_row(small):
    _, _, model = small
    idx = tokens(SMALL["vocab_size"], B=3)

    def patch_row1(x):  # (B, T, D)
        x = x.clone()
        x[1] = -x[1]
        return x

    with torch.no_grad():
        clean = model(idx)
        patched = model(idx, hooks={"blocks.0.hook_resid_mid": patch_row1})
    diffs = [max_diff(patched[b], clean[b]) for b in range(3)]
    print(f"\nper-row max diff after patching row 1: {[f'{d:.2e}' for d in diffs]}")
    assert torch.equal(patched[0], clean[0]) and torch.equal(patched[2], clean[2])
    assert diffs[1] > 1e-3


# --- 5. GradDrop: detaching a layer's writes keeps the forward and routes the gradient around the layer


@pytest.mark.parametrize("layer", [0, 1])
def test_graddrop_keeps_logits_and_passes_gradient_straight_through_the_layer(small, layer):
    _, _, model = small
    idx = tokens(SMALL["vocab_size"])
    p = f"blocks.{layer}."
    watched = [p + "hook_resid_pre", p + "hook_resid_post", p + "attn.hook_q"]

    def run(graddrop):
        cache = {}
        hooks = {n: (lambda t, n=n: cache.__setitem__(n, t)) for n in watched}
        if graddrop:
            hooks[p + "hook_attn_out"] = lambda t: t.detach()
            hooks[p + "hook_mlp_out"] = lambda t: t.detach()
        logits = model(idx, hooks=hooks)
        metric = logits[:, -1, 3].sum() - logits[:, -1, 5].sum()  # any scalar of the logits
        grads = torch.autograd.grad(metric, [cache[n] for n in watched], allow_unused=True,
                                    materialize_grads=True)
        return logits.detach(), dict(zip(watched, grads))

    clean_logits, clean = run(False)
    gd_logits, gd = run(True)
    pre, post, q = gd[p + "hook_resid_pre"], gd[p + "hook_resid_post"], gd[p + "attn.hook_q"]
    print(f"\nlayer {layer}: forward diff {max_diff(gd_logits, clean_logits):.1e}; "
          f"|dM/dresid_pre - dM/dresid_post| {max_diff(pre, post):.1e}; max |dM/dq| {q.abs().max():.1e} "
          f"(without GradDrop: pre-post "
          f"{max_diff(clean[p + 'hook_resid_pre'], clean[p + 'hook_resid_post']):.2e}, "
          f"|dM/dq| {clean[p + 'attn.hook_q'].abs().max():.2e})")
    assert torch.equal(gd_logits, clean_logits)
    assert torch.equal(pre, post)
    assert torch.equal(q, torch.zeros_like(q))
    # ...and the layer really did matter without GradDrop, so the checks above are not vacuous.
    assert max_diff(clean[p + "hook_resid_pre"], clean[p + "hook_resid_post"]) > 1e-4
    assert clean[p + "attn.hook_q"].abs().max() > 1e-4


# --- 6. bad input is refused, not silently mis-indexed


def test_bad_hooks_and_bad_tokens_raise(small):
    _, _, model = small
    V, N = SMALL["vocab_size"], SMALL["n_positions"]
    idx = tokens(V, T=4)
    cases = [
        (KeyError, "unknown hook site", dict(idx=idx, hooks={"blocks.0.hook_resid_typo": lambda t: None})),
        (KeyError, "unknown hook site",
         dict(idx=idx, hooks={f"blocks.{SMALL['n_layer']}.hook_resid_pre": print})),
        (ValueError, "must return None or a tensor of shape",
         dict(idx=idx, hooks={"blocks.0.attn.hook_z": lambda t: t[:, :-1]})),
        (ValueError, "must return None or a tensor of shape",
         dict(idx=idx, hooks={"blocks.0.hook_resid_pre": lambda t: 0.0})),
        (ValueError, "must lie in [0, 64)", dict(idx=torch.tensor([[1, -1, 2]]))),
        (ValueError, "must lie in [0, 64)", dict(idx=torch.tensor([[1, V, 2]]))),
        (ValueError, "between 1 and n_positions=16", dict(idx=torch.zeros(1, N + 1, dtype=torch.long))),
        (ValueError, "between 1 and n_positions=16", dict(idx=torch.zeros(1, 0, dtype=torch.long))),
        (ValueError, "integer tensor of shape (B, T)", dict(idx=idx.float())),
        (ValueError, "integer tensor of shape (B, T)", dict(idx=idx[0])),
    ]
    print()
    for exc, words, kwargs in cases:
        with pytest.raises(exc) as info:
            model(**kwargs)
        print(f"  {exc.__name__}: {info.value}")
        assert words in str(info.value)
    with torch.no_grad():  # the edges themselves are fine: ids 0 and V-1, exactly n_positions tokens
        assert model(torch.tensor([[0] * (N - 1) + [V - 1]])).shape == (1, N, V)


# --- 7. the loader: clear errors, nothing written; the forms real checkpoints come in load


def _edit_weights(edit):
    """A damage that rewrites the directory's model.safetensors as edit(state_dict)."""
    def damage(d):
        save_file(edit(load_file(str(d / "model.safetensors"))), str(d / "model.safetensors"))
    return damage


def _missing(sd):
    del sd["transformer.h.1.mlp.c_fc.bias"]
    return sd


def _extra(sd):
    return {**sd, "transformer.h.0.attn.rotary": torch.zeros(3)}


def _wrong_shape(sd):
    return {**sd, "transformer.wpe.weight": torch.zeros(SMALL["n_positions"] + 1, SMALL["n_embd"])}


def _untied_head(sd):
    return {**sd, "lm_head.weight": sd["transformer.wte.weight"] + 1e-3}


def _no_weights(d):
    os.remove(d / "model.safetensors")


def _no_config(d):
    os.remove(d / "config.json")


def _gelu_config(d):
    text = (d / "config.json").read_text().replace('"gelu_new"', '"gelu"')
    (d / "config.json").write_text(text)


@pytest.mark.parametrize("damage, exc, words", [
    (_edit_weights(_missing), ValueError, "missing keys: ['transformer.h.1.mlp.c_fc.bias']"),
    (_edit_weights(_extra), ValueError, "unexpected keys: ['transformer.h.0.attn.rotary']"),
    (_edit_weights(_wrong_shape), ValueError, "transformer.wpe.weight: checkpoint (17, 32), model (16, 32)"),
    (_edit_weights(_untied_head), ValueError, "lm_head.weight differs from transformer.wte.weight"),
    (_no_weights, FileNotFoundError, "has neither model.safetensors nor pytorch_model.bin"),
    (_no_config, FileNotFoundError, "has no config.json"),
    (_gelu_config, ValueError, "activation_function='gelu'"),
], ids=["missing-key", "extra-key", "wrong-shape", "untied-lm-head", "no-weights", "no-config",
        "unsupported-activation"])
def test_bad_checkpoint_directory_is_refused_by_name_and_left_untouched(tmp_path, small, damage, exc, words):
    d = copy_dir(small[1], tmp_path / "ckpt")
    damage(d)
    before = snapshot(d)
    with pytest.raises(exc) as info:
        GPT.from_pretrained(str(d))
    print(f"\n{exc.__name__}: {info.value}")
    assert words in str(info.value)
    assert snapshot(d) == before


def test_unknown_hub_name_without_huggingface_hub_raises_file_not_found(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes `import huggingface_hub` fail
    with pytest.raises(FileNotFoundError) as info:
        GPT.from_pretrained("definitely-not-a-model-xyz")
    print(f"\nFileNotFoundError: {info.value}")
    assert "'definitely-not-a-model-xyz' is not a local directory" in str(info.value)
    assert "huggingface_hub is not installed" in str(info.value)


def test_unknown_hub_name_offline_raises_file_not_found_quickly(monkeypatch, tmp_path):
    hub = pytest.importorskip("huggingface_hub")
    # Offline mode, read at call time by huggingface_hub (constants.HF_HUB_OFFLINE; the env var only at
    # import), and an empty cache in tmp_path so nothing is found or written in the user's real cache.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as info:
        GPT.from_pretrained("definitely-not-a-model-xyz")
    elapsed = time.perf_counter() - start
    print(f"\nFileNotFoundError after {elapsed:.2f} s: {info.value}\n  caused by {info.value.__cause__!r}")
    assert "'definitely-not-a-model-xyz' is not a local directory" in str(info.value)
    assert "fetching it from the hub failed" in str(info.value)
    assert elapsed < 5.0


def test_legacy_checkpoint_forms_load(tmp_path, small):
    """Keys without "transformer.", an lm_head.weight equal to wte, and the attn.bias/attn.masked_bias
    causal-mask buffers of older checkpoints (e.g. openai-community/gpt2) all load to the same model."""
    hf, src, reference = small
    T, L = SMALL["n_positions"], SMALL["n_layer"]

    def legacy(sd):
        sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
        sd["lm_head.weight"] = sd["wte.weight"].clone()
        for l in range(L):
            sd[f"h.{l}.attn.bias"] = torch.ones(T, T).tril().view(1, 1, T, T)
            sd[f"h.{l}.attn.masked_bias"] = torch.tensor(-1e4)
        return sd

    d = copy_dir(src, tmp_path / "legacy")
    _edit_weights(legacy)(d)
    model = GPT.from_pretrained(str(d))
    idx = tokens(SMALL["vocab_size"])
    with torch.no_grad():
        d_ref = max_diff(model(idx), hf(idx).logits)
        assert torch.equal(model(idx), reference(idx))
    print(f"\nlegacy-form checkpoint loads; vs transformers max abs diff {d_ref:.2e}")


# --- 8. tokenizer


def test_tokenizer_is_gpt2_bpe_offline():
    enc = get_tokenizer()
    s = "Café naïve – 東京タワー 🚀🤖 fin.\n\t  spaces"
    roundtrip = enc.decode(enc.encode(s))
    print(f"\n'Hello world' -> {enc.encode('Hello world')}, ' John' -> {enc.encode(' John')}, "
          f"n_vocab {enc.n_vocab}; round trip of {s!r}: {roundtrip == s}")
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.encode(" John") == [1757]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert enc.n_vocab == 50257
    assert roundtrip == s


# --- 9. other dtypes


def test_model_runs_in_float64_and_bfloat16(small):
    hf, d, model32 = small
    idx = tokens(SMALL["vocab_size"])
    with torch.no_grad():
        ref = model32(idx)
        hf64 = copy.deepcopy(hf).double()  # the fixture stays float32
        out64 = GPT.from_pretrained(str(d)).to(torch.float64)(idx)
        out16 = GPT.from_pretrained(str(d)).to(torch.bfloat16)(idx)
        d64 = max_diff(out64, hf64(idx).logits)
    assert out64.dtype == torch.float64 and out16.dtype == torch.bfloat16
    d16 = max_diff(out16, ref)
    scale = ref.abs().max().item()
    print(f"\nfloat64 vs transformers float64: {d64:.2e}; bfloat16 vs float32: max abs diff {d16:.2e} "
          f"(logits up to {scale:.2f}, so {d16 / scale:.1%} of the scale)")
    torch.testing.assert_close(out64, hf64(idx).logits.detach(), rtol=0, atol=1e-10)
    assert torch.isfinite(out16).all()
    # bfloat16 keeps 8 significant bits (~0.4% per rounding); allow 5% of the logit scale after 2 layers.
    assert d16 <= 0.05 * scale


# --- resuming a run: forward_from with cached clean keys and values


@pytest.mark.parametrize("layer,start", [(0, 0), (1, 0), (0, 5), (1, 9)])
def test_forward_from_a_cached_prefix_equals_the_full_forward(small, layer, start):
    _, _, model = small
    model = copy.deepcopy(model).double()
    idx = tokens(model.config.vocab_size)
    with torch.no_grad():
        full, cache = cache_all(model, idx)
        past = [(cache[f"blocks.{l}.attn.hook_k"][:, :start], cache[f"blocks.{l}.attn.hook_v"][:, :start])
                for l in range(layer, model.config.n_layer)] if start else None
        resumed = model.forward_from(layer, cache[f"blocks.{layer}.hook_resid_pre"][:, start:], past_kv=past)
    d = max_diff(resumed, full[:, start:])
    print(f"forward_from(layer={layer}) on positions {start}.. vs full forward: max abs diff {d:.1e}")
    assert resumed.shape == full[:, start:].shape and d <= 1e-12
    with pytest.raises(ValueError, match="layer"):
        model.forward_from(-1, cache["blocks.0.hook_resid_pre"])
    with pytest.raises(ValueError, match="past_kv"):
        model.forward_from(0, cache["blocks.0.hook_resid_pre"][:, 2:], past_kv=[])
