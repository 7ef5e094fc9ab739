"""Grouped-query attention (GQA: fewer key-value heads than query heads, as in Llama 3, Qwen2, Mistral) in
every method of atp_minimal.py, in float64.

The GQA model here is a GPT-2 whose query heads come in groups of R that share ONE key and ONE value
head (Hkv = H / R key-value heads): its k and v sites are (B, T, Hkv, Dh), and query head h reads
key-value head h // R. Built on model.GPT by giving the heads of a group identical key and value weights,
it is also an ordinary H-head GPT-2 whose k and v happen to be equal within each group. That gives exact,
independent checks of what key-value heads mean for each method:
  - patching key-value head g at position s is patching the key (or value) of every head of g's group;
  - AtP of a shared k or v is the sum over the group of the per-head AtP estimates (the gradient of a
    tensor read R times is the sum of the R gradients);
  - the key fix of g is the sum over g's query heads of the per-head key fixes (each head's softmax rows
    are recomputed alone, and everything after the softmax is linearised);
  - q and z stay per query head, equal to the H-head model's.
And, as for every model: the fast forms equal their Part I references (tolerance TWIN_TOL = 1e-12).
Run `pytest -s tests/test_gqa.py` to read the measured differences."""

import pytest
import torch

import atp_minimal as atp
from model import GPT, GPTConfig

TWIN_TOL = 1e-12
R = 2  # query heads per key-value head


class GroupedQueryGPT(torch.nn.Module):
    """A GPT whose heads come in groups of R sharing one key and one value head: the protocol's k and v
    sites are (B, T, Hkv, Dh), Hkv = n_head // R; forward_from takes past keys and values per key-value head.
    The wrapped GPT must have equal key and value weights within each group (tie_key_values)."""

    def __init__(self, gpt, r):
        super().__init__()
        self.gpt, self.r = gpt, r
        cfg = gpt.config
        fields = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_kv_head=cfg.n_head // r, d_head=cfg.d_head,
                      d_mlp=cfg.d_mlp, vocab_size=cfg.vocab_size, n_positions=cfg.n_positions)
        self.config = type("GQAConfig", (), fields)()

    def attention_scale(self, layer):
        return self.gpt.attention_scale(layer)

    def grouped(self, hooks):
        """Hooks on the H-head model: at k and v, the protocol's hook sees one head per group (B, T, Hkv, Dh),
        and what it returns (or sees) is what every head of the group reads."""
        hooks = dict(hooks or {})
        for l in range(self.config.n_layer):
            for x in ("k", "v"):
                name = atp.site(x, l)
                def per_group(t, inner=hooks.get(name)):
                    shared = t[:, :, ::self.r]  # (B, T, Hkv, Dh): the first head of each group
                    out = inner(shared) if inner is not None else None
                    return (shared if out is None else out).repeat_interleave(self.r, dim=2)  # (B, T, H, Dh)
                hooks[name] = per_group
        return hooks

    def forward(self, idx, hooks=None):
        return self.gpt(idx, hooks=self.grouped(hooks))

    def forward_from(self, layer, resid, hooks=None, past=None, last_position_only=False):
        if past is not None:
            past = [tuple(t.repeat_interleave(self.r, dim=2) for t in kv) for kv in past]  # (n, P, H, Dh)
        return self.gpt.forward_from(layer, resid, self.grouped(hooks), past, last_position_only)


def tie_key_values(gpt, r):
    """Give every head of a group of r the key and value weights of the group's first head."""
    D, Dh = gpt.config.n_embd, gpt.config.d_head
    with torch.no_grad():
        for block in gpt.transformer.h:
            for part in (1, 2):  # c_attn's columns are [q | k | v], head h at h*Dh..(h+1)*Dh
                for h in range(gpt.config.n_head):
                    first = h - h % r
                    for p in (block.attn.c_attn.weight, block.attn.c_attn.bias):
                        p[..., part * D + h * Dh:part * D + (h + 1) * Dh] = \
                            p[..., part * D + first * Dh:part * D + (first + 1) * Dh].clone()
    return gpt


@pytest.fixture(scope="module")
def setting():
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(n_layer=3, n_head=4, n_embd=16, vocab_size=20, n_positions=8, n_inner=24)).double()
    with torch.no_grad():  # large weights: saturated attention, effects far from 0
        for name, p in gpt.named_parameters():
            if not name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(0.6 * torch.randn_like(p) if p.dim() > 1 else 0.3 * torch.randn_like(p))
    gpt = tie_key_values(gpt.eval(), R)
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, 20, (2, 6), generator=g)
    noise = clean.clone()
    noise[:, 1] = (clean[:, 1] + 3) % 20
    noise[:, 4] = (clean[:, 4] + 7) % 20
    return GroupedQueryGPT(gpt, R), gpt, clean, noise, atp.neg_log_prob(torch.tensor([3, 5]))


def max_diff(a, b):
    if isinstance(a, dict):
        return max((a[k] - b[k]).abs().max().item() for k in a)
    return (a - b).abs().max().item()


def group_sum(per_head):
    """(B, L, T, H) -> (B, L, T, Hkv): the sum over the query heads of each group."""
    B, L, T, H = per_head.shape
    return per_head.view(B, L, T, H // R, R).sum(-1)


def test_the_grouped_model_is_the_h_head_model_with_shared_keys_and_values(setting):
    gqa, gpt, clean, noise, metric = setting
    with torch.no_grad():
        diff = (gqa(clean) - gpt(clean)).abs().max().item()
        _, cache = atp.run_with_cache(gqa, clean, [atp.site("k", 0), atp.site("q", 0)])
    print(f"  GQA logits vs the H-head GPT's: {diff:.1e}; k site {tuple(cache[atp.site('k', 0)].shape)}, "
          f"q site {tuple(cache[atp.site('q', 0)].shape)}")
    assert diff == 0 and cache[atp.site("k", 0)].shape[2] == 2 and cache[atp.site("q", 0)].shape[2] == 4
    assert atp.n_units(gqa, "k") == atp.n_units(gqa, "v") == 2 and atp.n_units(gqa, "q") == 4


def test_patching_a_key_value_head_is_patching_its_whole_group(setting):
    gqa, gpt, clean, noise, metric = setting
    got = atp.activation_patching(gqa, clean, noise, metric, kinds=("k", "v"))
    worst = 0.0
    for kind in ("k", "v"):  # the H-head GPT, a plain loop: patch every head of the group at once
        nodes = [[(kind, l, t, h) for h in range(g * R, (g + 1) * R)]
                 for l in range(3) for t in range(6) for g in range(2)]
        want = atp.patch_node_sets_reference(gpt, clean, noise, metric, nodes).T.reshape(2, 3, 6, 2)
        worst = max(worst, (got[kind] - want).abs().max().item())
    print(f"  k/v nodes of the GQA model vs patching the whole group in the H-head GPT: {worst:.1e} "
          f"(largest |effect| {max(v.abs().max().item() for v in got.values()):.3f})")
    assert worst < TWIN_TOL


def test_atp_and_the_qk_fix_of_a_shared_head_are_sums_over_its_group(setting):
    gqa, gpt, clean, noise, metric = setting
    for qk_fix in (False, True):
        got = atp.atp_estimates(gqa, clean, noise, metric, qk_fix=qk_fix)
        per_head = atp.atp_estimates(gpt, clean, noise, metric, qk_fix=qk_fix)
        diffs = {k: max_diff(got[k], group_sum(per_head[k]) if k in ("k", "v") else per_head[k]) for k in got}
        print(f"  qk_fix={qk_fix!s:5s}: GQA vs (group sums of) the H-head estimates: "
              + ", ".join(f"{k} {d:.1e}" for k, d in diffs.items()))
        assert max(diffs.values()) < TWIN_TOL
    # The same identity for the literal forms (the O(T^3) key fix, one softmax per moved logit).
    lit = atp.atp_qk_fix_reference(gqa, clean, noise, metric, ("q", "k"))
    lit_heads = atp.atp_qk_fix_reference(gpt, clean, noise, metric, ("q", "k"))
    diff = max(max_diff(lit["k"], group_sum(lit_heads["k"])), max_diff(lit["q"], lit_heads["q"]))
    print(f"  literal QK fix: GQA vs the H-head group sums: {diff:.1e}")
    assert diff < TWIN_TOL


def test_fast_forms_equal_their_references_with_key_value_heads(setting):
    gqa, gpt, clean, noise, metric = setting
    pairs = {
        "activation_patching": (atp.activation_patching(gqa, clean, noise, metric, chunk_size=5,
                                                        progress=False),
                                atp.activation_patching_reference(gqa, clean, noise, metric)),
        "atp_estimates": (atp.atp_estimates(gqa, clean, noise, metric),
                          atp.atp_estimates_reference(gqa, clean, noise, metric)),
        "atp_estimates qk_fix": (atp.atp_estimates(gqa, clean, noise, metric, qk_fix=True),
                                 atp.atp_qk_fix_reference(gqa, clean, noise, metric)),
        "atp_star": (atp.atp_star(gqa, clean, noise, metric),
                     atp.atp_star_reference(gqa, clean, noise, metric)),
        "atp_star sublayer": (atp.atp_star(gqa, clean, noise, metric, unit="sublayer"),
                              atp.atp_star_reference(gqa, clean, noise, metric, unit="sublayer")),
    }
    ranking, _ = atp.rank_nodes({k: v.mean(0) for k, v in pairs["atp_star"][0].items()})
    assert sum(1 for n in ranking if n[0] == "k") == 3 * 6 * 2  # L * T * G key nodes
    pairs["verify"] = (atp.verify(gqa, clean, noise, metric, ranking, 30)[1],
                       atp.verify_reference(gqa, clean, noise, metric, ranking, 30)[1])
    fast = atp.false_negative_bound(gqa, clean, noise, metric, ranking, K=30, p=0.3, n_samples=40)
    ref = atp.false_negative_bound_reference(gqa, clean, noise, metric, ranking, K=30, p=0.3, n_samples=40)
    pairs["false_negative_bound c_ss"] = (fast["c_ss"], ref["c_ss"])
    for name, (a, b) in pairs.items():
        print(f"  {name:26s} max |fast - reference| = {max_diff(a, b):.1e}")
        assert max_diff(a, b) < TWIN_TOL
    print(f"  theta*: fast {fast['theta_star']:.6f}, reference {ref['theta_star']:.6f}")
    assert abs(fast["theta_star"] - ref["theta_star"]) < TWIN_TOL and fast["worst_node"] == ref["worst_node"]


def test_whole_position_key_value_heads(setting):
    gqa, gpt, clean, noise, metric = setting
    got = atp.activation_patching(gqa, clean, noise, metric, kinds=("k",), positions="all")["k"]  # B, L, Hkv
    nodes = [[("k", l, h) for h in range(g * R, (g + 1) * R)] for l in range(3) for g in range(2)]
    want = atp.patch_node_sets_reference(gpt, clean, noise, metric, nodes).T.reshape(2, 3, 2)
    est = atp.atp_estimates(gqa, clean, noise, metric, kinds=("k",), qk_fix=True, positions="all")["k"]
    heads = atp.atp_estimates(gpt, clean, noise, metric, kinds=("k",), qk_fix=True, positions="all")["k"]
    diff_patch = (got - want).abs().max().item()
    diff_qk = (est - heads.view(2, 3, 2, R).sum(-1)).abs().max().item()
    print(f"  whole-position k: patching vs H-head groups {diff_patch:.1e}; QK fix vs group sums "
          f"{diff_qk:.1e}")
    assert diff_patch < TWIN_TOL and diff_qk < TWIN_TOL


def test_a_head_count_that_is_not_a_multiple_of_the_key_value_heads_is_refused(setting):
    gqa, gpt, clean, noise, metric = setting
    gqa.config.n_kv_head = 3
    try:
        with pytest.raises(ValueError, match="not a multiple of n_kv_head = 3"):
            atp.atp_estimates(gqa, clean, noise, metric)
    finally:
        gqa.config.n_kv_head = 2
