"""
The figures of tutorial.md, from the shipped toy IOI model (toy_model/) and 4 held-out prompt pairs,
written to experiments/figures/:

  saturated_head.png           layer 0 head 3 at the subject position: a saturated attention row that
                               AtP reads as "no effect", and the row the noise query produces
  atp_vs_exact.png             |estimate| against |c(n)| for every attention node: AtP, AtP+QK fix, AtP*
  cost_of_verified_recall.png  forward passes until the true top-x attention nodes are all verified,
                               for AtP, AtP+QK fix, AtP+GradDrop and AtP* (paper §4 Experiments)

    python experiments/make_figures.py   # about 10 s on one CPU core; needs matplotlib

Everything is computed in float64 (the checkpoint is float32; `.double()` after loading), so no point,
rank or curve depends on the CPU's float32 rounding, and no title carries a count that could. The same code,
checkpoint and matplotlib give the same PNG files (no version string in their metadata).
"""

import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only, no window
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))  # experiments/
ROOT = os.path.dirname(HERE)  # the repository root: atp_minimal.py, model.py, toy_ioi.py
sys.path.insert(0, ROOT)
import atp_minimal as atp  # noqa: E402
import compare_methods  # noqa: E402
import toy_ioi  # noqa: E402

OUT = os.path.join(HERE, "figures")
ATTN = ("q", "k", "v", "z")
MISSED = ("q", 0, 10, 3)  # the node the tutorial's §4 follows: query of layer 0, head 3, at the subject
METHODS = {"AtP": (False, False), "AtP+QK fix": (True, False), "AtP+GradDrop": (False, True),
           "AtP*": (True, True)}  # name -> (qk_fix, grad_drop)
COLORS = {"q": "tab:red", "k": "tab:orange", "v": "tab:blue", "z": "tab:green"}


def save(fig, name):
    path = os.path.join(OUT, name)
    fig.savefig(path, dpi=80, metadata={"Software": None})  # no version string: byte-stable across runs
    plt.close(fig)
    print(f"wrote {os.path.relpath(path, ROOT)} ({os.path.getsize(path) / 1000:.0f} kB)")


# --- the data: exact effects and the four estimates for the attention nodes

def compute():
    model = toy_ioi.load_toy_model().double()  # float64: nothing below depends on float32 rounding
    clean, noise, answer, wrong = toy_ioi.make_pairs(4, "test", seed=0)
    metric = atp.logit_diff(answer, wrong)
    exact = atp.activation_patching(model, clean, noise, metric, kinds=ATTN,
                                    progress=False)  # kind -> (B, L, T, H)
    truth = {k: v.mean(0) for k, v in exact.items()}  # c(n), kind -> (L, T, H)
    scores = {}
    for name, (qk_fix, grad_drop) in METHODS.items():
        est = atp.attribution_patching(model, clean, noise, metric, kinds=ATTN, qk_fix=qk_fix,
                                       grad_drop=grad_drop)
        # |.| per pair, then the mean (GradDrop's per-pair scores are already >= 0)
        scores[name] = {k: v.abs().mean(0) for k, v in est.items()}  # kind -> (L, T, H)
    return model, clean, noise, truth, scores


def flat(per_kind):
    """kind -> (L, T, H) -> one vector (N,) over all attention nodes, kinds in ATTN order."""
    return torch.cat([per_kind[k].reshape(-1) for k in ATTN])


def nodes_in_flat_order(truth):
    """The node tuples (kind, layer, pos, head) in the order of flat()'s vector."""
    return [(k,) + tuple(i.tolist()) for k in ATTN
            for i in torch.nonzero(torch.ones_like(truth[k], dtype=torch.bool))]


def rank_of(node, scores):
    ranking, _ = atp.rank_nodes(scores)
    return ranking.index(node) + 1


# --- figure 1: the saturated head

def saturated_head(model, clean, noise, scores):
    kind, layer, t, head = MISSED
    names = [f"blocks.{layer}.attn.hook_{s}" for s in ("q", "k", "pattern")]
    with torch.no_grad():
        _, c = atp.run_with_cache(model, clean, names)
        _, n = atp.run_with_cache(model, noise, names)
    pattern = c[names[2]][:, head]  # (B, T, S)
    b = int(pattern[:, t].max(-1).values.argmax())  # the pair whose row t is most saturated
    q_noise, k_clean = n[names[0]][b, :, head], c[names[1]][b, :, head]  # (T, Dh), (S, Dh)
    row = q_noise[t] @ k_clean.T * model.transformer.h[layer].attn.scale  # (S,): the noise query, clean keys
    row[t + 1:] = float("-inf")
    new = torch.softmax(row, -1)  # (S,)
    words = toy_ioi.decode(clean[b]).split()
    noise_word = toy_ioi.decode(noise[b]).split()[t]
    T = len(words)

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 5), gridspec_kw=dict(width_ratios=[1, 1.25]))
    logp = torch.log10(pattern[b].clamp(min=1e-12)).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(),
                                                                  float("nan"))  # (T, S)
    im = left.imshow(logp, cmap="viridis", vmin=-12, vmax=0)
    left.set_xticks(range(T), words, rotation=90, fontsize=8)
    left.set_yticks(range(T), words, fontsize=8)
    left.set_xlabel("key position s")
    left.set_ylabel("query position t")
    left.add_patch(plt.Rectangle((-0.5, t - 0.5), t + 1, 1, fill=False, edgecolor="red", linewidth=2))
    left.set_title(f"clean pattern of L{layer} H{head}, log10 a(t, s)", fontsize=10)
    fig.colorbar(im, ax=left, fraction=0.046, pad=0.04)

    x = torch.arange(t + 1)
    right.bar(x - 0.2, pattern[b, t, :t + 1], width=0.4, label="clean query (the clean run)")
    right.bar(x + 0.2, new[:t + 1], width=0.4, label=f"noise query ('{noise_word}'), clean keys")
    right.set_yscale("log")
    right.set_ylim(1e-12, 3)
    right.set_xticks(x, words[:t + 1], rotation=90, fontsize=8)
    right.set_ylabel("attention probability")
    top = int(pattern[b, t].argmax())
    off_top = float(torch.cat([pattern[b, t, :top], pattern[b, t, top + 1:]]).sum())  # on the other keys
    right.set_title(f"row t={t} ('{words[t]}'): {1 - off_top:.6f} on '{words[top]}', {off_top:.1e} on the "
                    f"rest\n{atp.node_label(MISSED)}: AtP rank #{rank_of(MISSED, scores['AtP'])}, "
                    f"AtP+QK fix rank #{rank_of(MISSED, scores['AtP+QK fix'])}", fontsize=10)
    right.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    save(fig, "saturated_head.png")


# --- figure 2: estimates against the truth

def atp_vs_exact(truth, scores):
    c = flat(truth).abs()  # (N,)
    nodes = nodes_in_flat_order(truth)
    kinds = [n[0] for n in nodes]
    # the nodes that count in compare_methods: |c(n)| >= 1e-3 max
    keep = torch.zeros(len(c), dtype=torch.bool)
    keep[compare_methods.true_top(c)] = True
    missed = nodes.index(MISSED)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.2), sharex=True, sharey=True)
    floor = 1e-4  # no node that counts is estimated below it (the floor only guards the log axis)
    for ax, name in zip(axes, ("AtP", "AtP+QK fix", "AtP*")):
        s = flat(scores[name]).clamp(min=floor)  # (N,)
        for k in ATTN:
            mask = keep & torch.tensor([kk == k for kk in kinds])
            ax.scatter(c[mask], s[mask], s=10, alpha=0.7, color=COLORS[k], label=k)
        ax.scatter([c[missed]], [s[missed]], s=160, facecolors="none", edgecolors="black", linewidths=1.5)
        ax.annotate(atp.node_label(MISSED), (c[missed], s[missed]), textcoords="offset points",
                    xytext=(-95, -75), fontsize=8, arrowprops=dict(arrowstyle="->", linewidth=0.8))
        ax.plot([1e-3, 30], [1e-3, 30], color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylim(floor * 0.5, 60)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("exact |c(n)|")
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel(f"estimate (mean over pairs of |.|), floored at {floor:g}")
    axes[0].legend(title="kind", fontsize=8, loc="upper left")
    fig.suptitle(f"toy IOI model, 4 prompt pairs: the attention nodes with |c(n)| >= "
                 f"{compare_methods.COUNTED:g} x the largest (those that count in compare_methods.py)",
                 fontsize=10)
    fig.tight_layout()
    save(fig, "atp_vs_exact.png")


# --- figure 3: cost of verified recall

def cost_curves(model, truth, scores):
    c = flat(truth).double()  # (N,)
    fig, ax = plt.subplots(figsize=(6.5, 4.4))
    for name, (qk_fix, grad_drop) in METHODS.items():
        order = torch.sort(flat(scores[name]), descending=True, stable=True).indices  # (N,)
        own = compare_methods.atp_cost(model.config.n_layer, qk_fix, grad_drop, ATTN)
        curve = compare_methods.cost_of_verified_recall(order, c, own)  # (X,)
        x = torch.arange(1, len(curve) + 1)
        ax.step(x, curve, where="post", label=f"{name} (own cost {own:g})")
    X = len(compare_methods.true_top(c))  # the nodes that count: |c(n)| >= 1e-3 x the largest
    ax.plot([1, X], [1, X], color="black", linewidth=0.8, label="oracle: cost = x")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("x (the true top-x attention nodes by |c(n)| all verified)")
    ax.set_ylabel("forward passes per prompt pair")
    ax.set_title("cost of verified recall, toy IOI model, 4 pairs as one distribution", fontsize=10)
    ax.grid(True, which="both", alpha=0.2)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, "cost_of_verified_recall.png")


def main():
    torch.set_num_threads(1)  # every tensor here is small: extra threads cost more than they save
    os.makedirs(OUT, exist_ok=True)
    model, clean, noise, truth, scores = compute()
    saturated_head(model, clean, noise, scores)
    atp_vs_exact(truth, scores)
    cost_curves(model, truth, scores)


if __name__ == "__main__":
    main()
