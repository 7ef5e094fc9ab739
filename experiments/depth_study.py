"""
When does GradDrop help? AtP, AtP+QK fix, AtP* and AtP* with per-sub-layer GradDrop on toy IOI models
of increasing depth, scored against exact activation patching, and the mechanism that makes GradDrop
hurt at small depth, measured.

  J. Kramar, T. Lieberum, R. Shah, N. Nanda (2024). "AtP*: An efficient and scalable method for
  localizing LLM behaviour to components." https://arxiv.org/abs/2403.00745 (GradDrop: §3, Methods)

The models: the toy IOI task of toy_ioi.py, one recipe at every depth (d_model 64, 4 heads, AdamW lr
1e-3, batch 128, 1200 steps), L = 2, 4, 8 and 12 layers, two training seeds per depth that reach 95%
held-out accuracy (a model below that is not used, and the next seed is tried; at L = 2 only one of
six seeds gets there). The checkpoints ship in experiments/depth_models/L{L}_seed{s}/ with their accuracy and
training time in training.json, so the study is the same on every machine; --retrain trains them
again (same recipe and seeds; float32 training is deterministic on one machine, not bit-identical
across CPUs).

The mechanism. The metric reads the last position. A node at an earlier position reaches it only
through later attention layers, and every GradDrop term that drops one of those layers removes most of
the node's effect: its score shrinks by about (number of such layers)/(L-1). A last-position node keeps
its direct path and barely shrinks (so do earlier keys and values, which the last position's query
reads in their own layer). The study measures GradDrop score / |AtP+QK estimate| per node.

    python experiments/depth_study.py            # the shipped models: experiments/results/depth_study.*
    python experiments/depth_study.py --retrain  # train the models first (~40 min on a busy 2-core machine)
    python experiments/depth_study.py --quick    # smoke run (2 pairs, one model per depth), written to out/

Dimension legend: B prompt pairs, L layers, T positions, U units of a site (heads or neurons),
N nodes of a family, n candidate nodes (those the noise prompt moves), X counted nodes.
"""

import argparse
import csv
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))  # experiments/: depth_models/ and results/ are here
ROOT = os.path.dirname(HERE)  # the repository root: atp_minimal.py, model.py, toy_ioi.py, and out/
sys.path.insert(0, ROOT)
import atp_minimal as atp  # noqa: E402
import compare_methods as cm  # noqa: E402
import toy_ioi  # noqa: E402
from model import GPTConfig  # noqa: E402

MODELS_DIR = os.path.join(HERE, "depth_models")

# --- the models: one recipe, four depths, two seeds

DEPTHS = (2, 4, 8, 12)
SEEDS_USED = 2  # models per depth: training seeds 0, 1, 2, ... in turn until this many reach MIN_ACCURACY
MAX_SEED = 5  # ... trying seeds up to this one
RECIPE = dict(d_model=64, n_head=4, lr=1e-3, batch_size=128, steps=1200)
MIN_ACCURACY = 0.95  # held-out accuracy below this: the model is not used


def model_dir(L, seed):
    return os.path.join(MODELS_DIR, f"L{L}_seed{seed}")


def train_model(L, seed):
    """Train one depth-study model with toy_ioi.train (1 thread, deterministic, denormals flushed as
    toy_ioi.main does). Returns (model, record): record holds the recipe, the accuracies and the time."""
    config = GPTConfig(n_layer=L, n_head=RECIPE["n_head"], n_embd=RECIPE["d_model"],
                       n_positions=toy_ioi.CONFIG.n_positions, vocab_size=len(toy_ioi.VOCAB))
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    torch.set_flush_denormal(True)  # saturated softmaxes make subnormals, which are slow on a CPU
    start = time.perf_counter()
    try:
        model = toy_ioi.train(seed, RECIPE["steps"], log_every=RECIPE["steps"], config=config,
                              lr=RECIPE["lr"], batch_size=RECIPE["batch_size"])
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_flush_denormal(False)
    seconds = time.perf_counter() - start
    record = dict(n_layer=L, seed=seed, **RECIPE, train_seconds=round(seconds, 1),
                  threads=torch.get_num_threads(), train_accuracy=toy_ioi.accuracy(model, "train"),
                  test_accuracy=toy_ioi.accuracy(model, "test"), torch=torch.__version__)
    return model, record


def get_model(L, seed, retrain=False):
    """(model or None, record). A model under MIN_ACCURACY is not written and not used (None); its
    record is kept in training.json so the report can list it."""
    path = model_dir(L, seed)
    record_path = os.path.join(path, "training.json")
    if not retrain and os.path.exists(record_path):
        with open(record_path) as f:
            record = json.load(f)
        if record["test_accuracy"] < MIN_ACCURACY:
            return None, record
        model = toy_ioi.load_toy_model(path)
        acc = toy_ioi.accuracy(model, "test")  # the checkpoint, not just its record
        if acc < MIN_ACCURACY:
            raise SystemExit(f"{path}: held-out accuracy {acc:.4f} < {MIN_ACCURACY}, but training.json says "
                             f"{record['test_accuracy']:.4f}")
        return model, record
    print(f"training L={L} seed={seed} ...", flush=True)
    model, record = train_model(L, seed)
    print(f"  {record['train_seconds']:.0f} s, held-out accuracy {record['test_accuracy']:.4f}", flush=True)
    os.makedirs(path, exist_ok=True)
    if record["test_accuracy"] >= MIN_ACCURACY:
        toy_ioi.save(model, path)
    else:  # keep only the record; a checkpoint left by an earlier run would not match it
        model = None
        for name in ("config.json", "model.safetensors", "vocab.json"):
            if os.path.exists(os.path.join(path, name)):
                os.remove(os.path.join(path, name))
    with open(record_path, "w") as f:
        json.dump(record, f, indent=1)
    return model, record


# --- the cost of per-sub-layer GradDrop

# --- scoring one setting

METHODS = ("AtP", "AtP+QK fix", "AtP*", "AtP* (sub-layer GradDrop)")
GRID = 1e9  # scores and effects are compared on a grid of max / GRID: float ties break alike everywhere
TOP = 10  # a second statistic: verifications until the true top-10 are all verified


def on_grid(values):
    """Round float64 values to multiples of max|values| / GRID: last-bit differences between CPUs
    (different summation orders) then give the same ranking, and exact ties break in natural order."""
    top = values.abs().max()
    return values if top == 0 else torch.round(values / top * GRID)


def estimates(model, clean, noise, metric):
    """method -> kind -> per-pair estimate (B, L, T, U): signed for AtP and AtP+QK fix, >= 0 for the
    GradDrop methods."""
    kinds = atp.KINDS
    return {"AtP": atp.attribution_patching(model, clean, noise, metric, kinds),
            "AtP+QK fix": atp.attribution_patching(model, clean, noise, metric, kinds, qk_fix=True),
            "AtP*": atp.atp_star(model, clean, noise, metric, kinds),  # unit="layer", the paper's
            "AtP* (sub-layer GradDrop)": atp.atp_star(model, clean, noise, metric, kinds, unit="sublayer")}


def run_model(model, clean, noise, metric):
    """Exact patching and the four estimates for B prompt pairs at once: kind -> (B, L, T, U) each (I(n)
    and every estimate are per pair, so pair b's single-pair setting is row b, and the distribution
    setting is the mean over rows). Also which nodes the noise prompt moves, per pair."""
    L = model.config.n_layer
    truth = atp.activation_patching(model, clean, noise, metric, atp.KINDS, progress=False)
    est = estimates(model, clean, noise, metric)
    with torch.no_grad():
        _, c_cache, n_cache, _ = atp.clean_and_noise_runs(model, clean, noise, metric, atp.KINDS)
    delta = lambda k, l: atp.as_units(n_cache[atp.site(k, l)]) - atp.as_units(c_cache[atp.site(k, l)])
    moved = {k: torch.stack([(delta(k, l) != 0).any(-1) for l in range(L)], 1)  # (B, L, T, U)
             for k in atp.KINDS}
    return truth, est, moved


def score_setting(cfg, T, truth, est, moved, pairs):
    """Per family and method, for the prompt pairs `pairs` (a slice of the B rows) taken as one D:
    relative cost (with and without the method's own cost C) and verifications to cover the true
    top-10. Returns a list of rows (dicts)."""
    L = cfg.n_layer
    rows = []
    for fam_name, kinds in cm.FAMILIES.items():
        fam = cm.Family(fam_name, kinds, cfg, T)
        c = on_grid(fam.vector({k: truth[k][pairs].mean(0) for k in kinds}).double())  # (N,): c(n)
        is_moved = fam.vector({k: moved[k][pairs].any(0) for k in kinds})
        candidates, rest = is_moved.nonzero()[:, 0], (~is_moved).nonzero()[:, 0]
        true_top = cm.true_top(c)[:TOP]  # the nodes that count (compare_methods.COUNTED), best first
        for method in METHODS:
            per_pair = {k: est[method][k][pairs] for k in kinds}
            # |.| per pair, then the mean (paper §2); GradDrop scores are >= 0 already
            score = {k: (v.abs() if method in ("AtP", "AtP+QK fix") else v).mean(0)
                     for k, v in per_pair.items()}
            s = on_grid(fam.vector(score).double())[candidates]  # (n,)
            order = torch.cat([candidates[cm.rank_by_score(s)], rest])  # (N,): unmoved nodes last
            qk, gd = method != "AtP", method.startswith("AtP*")
            own = cm.atp_cost(L, qk, gd, kinds, unit="sublayer" if "sub-layer" in method else "layer")
            curve = cm.cost_of_verified_recall(order, c, own)  # (X,): x over the nodes that count
            position = torch.empty_like(order)
            position[order] = torch.arange(len(order))
            rows.append(dict(family=fam_name, method=method, own_cost=own, X=curve.numel(),
                             rel_cost=cm.relative_cost(curve), rel_cost_no_c=cm.relative_cost(curve - own),
                             top10=int(position[true_top].max()) + 1))
    return rows


# --- the mechanism: how much GradDrop shrinks a node's score, last position against earlier ones

SHOWN = 0.05  # nodes whose |AtP+QK estimate| is at least this fraction of the family's largest
GROUPS = ("earlier", "earlier q, z", "earlier k, v", "last")


def position_group(kind, pos, T):
    """Last position, or earlier. Earlier keys and values are read by the last position's query in
    their own layer, which no GradDrop term of theirs drops; earlier queries and head outputs (and
    neurons) reach the last position only through a later layer's attention."""
    if pos == T - 1:
        return "last"
    return {"q": "earlier q, z", "z": "earlier q, z", "k": "earlier k, v", "v": "earlier k, v"}.get(
        kind, "earlier")


def shrink_ratios(est, b, T):
    """For prompt pair b: per family and per GradDrop unit, the ratios GradDrop score / |AtP+QK|
    of the nodes with a sizeable AtP+QK estimate, split into last position and earlier positions.
    Returns a list of dicts (family, where, unit, ratio)."""
    out = []
    for fam_name, kinds in cm.FAMILIES.items():
        qk = {k: est["AtP+QK fix"][k][b].abs() for k in kinds}  # (L, T, U) per kind
        top = max(v.max() for v in qk.values())
        for k in kinds:
            keep = qk[k] >= SHOWN * top  # (L, T, U)
            for unit, method in (("layer", "AtP*"), ("sub-layer", "AtP* (sub-layer GradDrop)")):
                ratio = est[method][k][b][keep] / qk[k][keep]
                pos = keep.nonzero()[:, 1]
                for r, p in zip(ratio.tolist(), pos.tolist()):
                    out.append(dict(family=fam_name, where=position_group(k, p, T), unit=unit, ratio=r))
    return out


# --- the study

def models(L, n_used, retrain):
    """Yield (seed, model, record) for training seeds 0, 1, ... of depth L, the unusable ones (model
    None) included, until n_used models have reached MIN_ACCURACY or MAX_SEED is passed."""
    used = 0
    for seed in range(MAX_SEED + 1):
        model, record = get_model(L, seed, retrain)
        yield seed, model, record
        used += model is not None
        if used == n_used:
            return


def run_study(depths, n_used, n_pairs, distribution, retrain):
    """Every model, every setting: rows (one per model, setting, family, method), shrink ratios and the
    training records."""
    clean, noise, answer, wrong = toy_ioi.make_pairs(n_pairs, "test", seed=0)
    metric = atp.logit_diff(answer, wrong)
    T = clean.shape[1]
    rows, ratios, records = [], [], []
    for L in depths:
        for seed, model, record in models(L, n_used, retrain):
            records.append(record)
            if model is None:
                print(f"L={L} seed={seed}: held-out accuracy {record['test_accuracy']:.4f} < {MIN_ACCURACY}, "
                      "not used")
                continue
            model = model.double()  # exact patching and every estimate in float64
            start = time.perf_counter()
            truth, est, moved = run_model(model, clean, noise, metric)
            settings = [("single pair", b, slice(b, b + 1)) for b in range(n_pairs)]
            if distribution:
                settings.append(("distribution", f"{n_pairs} pairs", slice(0, n_pairs)))
            for where, pair, pairs in settings:
                for row in score_setting(model.config, T, truth, est, moved, pairs):
                    rows.append(dict(row, L=L, seed=seed, where=where, pair=pair))
            for b in range(n_pairs):
                ratios += [dict(r, L=L, seed=seed, pair=b) for r in shrink_ratios(est, b, T)]
            print(f"L={L} seed={seed}: scored in {time.perf_counter() - start:.0f} s", flush=True)
    return rows, ratios, records


def select(rows, L, family, method, where="single pair"):
    """The rows of one depth, family, method and setting (single pair: one row per pair and seed)."""
    return [r for r in rows if (r["L"], r["family"], r["method"], r["where"]) == (L, family, method, where)]


def median_worst(values):
    return statistics.median(values), max(values)


def study_table(rows, depths):
    """Markdown lines: per depth and family, median / worst over single pairs (and seeds) of the
    relative cost and of the verifications to cover the true top-10, and the distribution setting."""
    lines = ["| L | family | runs | " + " | ".join(METHODS) + " |", "|---|---|---:|" + "---:|" * len(METHODS)]
    for L in depths:
        for fam in cm.FAMILIES:
            for stat, key in (("relative cost", "rel_cost"), ("relative cost, C left out", "rel_cost_no_c"),
                              ("top-10 verifications", "top10")):
                cells = []
                for m in METHODS:
                    v = [r[key] for r in select(rows, L, fam, m)]
                    if not v:
                        cells = None
                        break
                    med, worst = median_worst(v)
                    cells.append(f"{med:g} / {worst}" if key == "top10" else f"{med:.2f} / {worst:.2f}")
                if cells is None:
                    continue
                runs = len(select(rows, L, fam, METHODS[0]))
                lines.append(f"| {L} | {fam}: {stat} | {runs} | " + " | ".join(cells) + " |")
    return lines


def distribution_table(rows, depths):
    lines = ["| L | family | seeds | " + " | ".join(METHODS) + " |",
             "|---|---|---:|" + "---:|" * len(METHODS)]
    for L in depths:
        for fam in cm.FAMILIES:
            cells = []
            for m in METHODS:
                v = select(rows, L, fam, m, "distribution")
                if not v:
                    break
                cells.append(" ; ".join(f"{r['rel_cost']:.2f} ({r['top10']})" for r in v))
            if cells:
                lines.append(f"| {L} | {fam} | {len(v)} | " + " | ".join(cells) + " |")
    return lines


def mechanism_table(ratios, depths):
    """Median ratio GradDrop / |AtP+QK| per depth, family, position group and unit; the shrink times the
    number of terms, (1 - ratio) (L - 1) or (1 - ratio) (2L - 1), counts the terms that remove the node's
    effect: roughly constant if the 1/(L-1) scaling holds."""
    lines = ["| L | family | position | nodes | layer GradDrop: median ratio | (1 - ratio)(L-1) "
             "| sub-layer: median ratio | (1 - ratio)(2L-1) |", "|---|---|---|---:|---:|---:|---:|---:|"]
    summary = {}  # (L, family, position) -> (median ratio layer, median ratio sub-layer, nodes)
    for L in depths:
        for fam in cm.FAMILIES:
            for where in GROUPS:
                med = {}
                for unit in ("layer", "sub-layer"):
                    v = [r["ratio"] for r in ratios
                         if (r["L"], r["family"], r["where"], r["unit"]) == (L, fam, where, unit)]
                    med[unit] = (statistics.median(v), len(v)) if v else (None, 0)
                if not med["layer"][1]:
                    continue
                summary[(L, fam, where)] = med["layer"][0], med["sub-layer"][0], med["layer"][1]
                (rl, n), (rs, _) = med["layer"], med["sub-layer"]
                lines.append(f"| {L} | {fam} | {where} | {n} | {rl:.2f} | {(1 - rl) * (L - 1):.1f} | "
                             f"{rs:.2f} | {(1 - rs) * (2 * L - 1):.1f} |")
    return lines, summary


def beats_lines(rows, depths):
    """Where AtP* beats AtP+QK fix, by the median and by the worst case over single pairs."""
    out = []
    for fam in cm.FAMILIES:
        for L in depths:
            for m in ("AtP*", "AtP* (sub-layer GradDrop)"):
                parts = []
                for key, name in (("rel_cost", "relative cost"), ("rel_cost_no_c", "C left out"),
                                  ("top10", "top-10")):
                    a = [r[key] for r in select(rows, L, fam, m)]
                    b = [r[key] for r in select(rows, L, fam, "AtP+QK fix")]
                    if not a:
                        break
                    (ma, wa), (mb, wb) = median_worst(a), median_worst(b)
                    verdict = lambda x, y: "better" if x < y else ("equal" if x == y else "worse")
                    parts.append(f"{name}: median {verdict(ma, mb)}, worst {verdict(wa, wb)}")
                if parts:
                    out.append(f"[L={L}, {fam}] {m} vs AtP+QK fix: " + "; ".join(parts))
    return out


def plot(path, rows, summary, depths):
    """Top row: relative cost against depth (attention, neurons), and the shrink under layer GradDrop.
    Bottom row: the same with the method's own cost C left out, and the shrink under sub-layer GradDrop.
    Returns False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter, ScalarFormatter
    except ImportError:
        return False
    fig, axes = plt.subplots(2, 3, figsize=(14, 8))
    styles = dict(zip(METHODS, (("C0", "o"), ("C1", "s"), ("C2", "^"), ("C3", "v"))))
    panels = (("rel_cost", "relative cost"), ("rel_cost_no_c", "relative cost, C left out"))
    for row, (key, what) in enumerate(panels):
        for ax, fam in zip(axes[row, :2], cm.FAMILIES):
            for j, m in enumerate(METHODS):
                xs, med, lo, hi, dist = [], [], [], [], []
                for L in depths:
                    v = [r[key] for r in select(rows, L, fam, m)]
                    if not v:
                        continue
                    xs.append(L * (1 + 0.03 * (j - 1.5)))  # small offsets so the bars do not overlap
                    med.append(statistics.median(v))
                    lo.append(min(v))
                    hi.append(max(v))
                    d = [r[key] for r in select(rows, L, fam, m, "distribution")]
                    dist.append(statistics.median(d) if d else float("nan"))
                color, marker = styles[m]
                yerr = [[a - b for a, b in zip(med, lo)], [b - a for a, b in zip(med, hi)]]
                ax.errorbar(xs, med, yerr=yerr, color=color, marker=marker, capsize=3, lw=1.3,
                            label=f"{m}: single pairs")
                ax.plot(xs, dist, color=color, marker=marker, ls=":", mfc="none", lw=1,
                        label=f"{m}: distribution")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_yticks([1, 2, 3, 5, 10, 20, 40])
            ax.set_xticks(depths, [str(L) for L in depths])
            ax.set_xlabel("layers L")
            ax.set_ylabel(f"{what} (1 = oracle)")
            ax.set_title(f"{fam}: {what}", fontsize=10)
            ax.grid(alpha=0.3, which="both", lw=0.4)
        ax = axes[row, 2]
        unit, terms = (("layer", "L-1"), ("sub-layer", "2L-1"))[row]
        for fam, color in (("attention", "C4"), ("neurons", "C5")):
            for where, ls in (("earlier", "-"), ("earlier q, z", "-"), ("earlier k, v", "-."),
                              ("last", "--")):
                xs = [L for L in depths if (L, fam, where) in summary]
                if xs:
                    ax.plot(xs, [summary[(L, fam, where)][row] for L in xs], color=color, ls=ls, marker="o",
                            label=f"{fam}: {where}")
        n_terms = (lambda L: L - 1) if row == 0 else (lambda L: 2 * L - 1)
        ax.plot(depths, [1 - 1 / n_terms(L) for L in depths], color="black", lw=0.8, ls=":",
                label=f"1 - 1/({terms}): one term removes the effect")
        ax.set_xscale("log", base=2)
        ax.set_xticks(depths, [str(L) for L in depths])
        ax.set_ylim(-0.03, 1.08)
        ax.set_xlabel("layers L")
        ax.set_ylabel("GradDrop score / |AtP+QK estimate| (median)")
        ax.set_title(f"the shrink under {unit} GradDrop ({terms} terms)", fontsize=10)
        ax.grid(alpha=0.3, lw=0.4)
        ax.legend(fontsize=7, loc="lower right")
    axes[0, 0].legend(fontsize=6.5, loc="upper left")
    fig.suptitle("Relative cost: median over single prompt pairs and seeds (solid; bars: min to max) and the "
                 "distribution setting (dotted). Shrink: median over nodes with a sizeable AtP+QK estimate.",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=60)
    plt.close(fig)
    return True


def markdown_report(command, elapsed, args, records, rows, mech_lines, figure):
    """The report, experiments/results/depth_study.md: the models, the tables, the verdicts and the figure."""
    md = ["# GradDrop against depth (toy IOI models)", "",
          f"`{command}`: {elapsed:.0f} s wall clock, 1 torch thread"
          + (" (training included)." if args.retrain else " (from the checkpoints in depth_models/).")
          + " The wall-clock times are the only numbers here that differ from machine to machine.", "",
          f"Models: toy IOI (toy_ioi.py), d_model {RECIPE['d_model']}, {RECIPE['n_head']} heads, AdamW lr "
          f"{RECIPE['lr']:g}, batch {RECIPE['batch_size']}, {RECIPE['steps']} steps; used if held-out "
          f"accuracy >= {MIN_ACCURACY:.0%}. Training times: 1 torch thread on a shared 2-core machine under "
          "load.", "",
          "| model | held-out accuracy | train accuracy | training time (s) | used |",
          "|---|---:|---:|---:|---|"]
    md += [f"| L{r['n_layer']}_seed{r['seed']} | {r['test_accuracy']:.4f} | {r['train_accuracy']:.4f} | "
           f"{r['train_seconds']:.0f} | {'yes' if r['test_accuracy'] >= MIN_ACCURACY else 'no'} |"
           for r in records]
    md += ["", f"Prompt pairs: held-out names, `toy_ioi.make_pairs({args.pairs}, 'test', seed=0)`; single "
           f"pair = each alone; distribution = all {args.pairs} as one D (c(n) = mean over them). Metric: "
           "logit difference at the last position. Everything in float64.", "",
           f"Counted nodes: |c(n)| >= {cm.COUNTED:g} x the family's largest |c(n)| "
           f"(compare_methods.COUNTED); rankings and effects are compared on a grid of max/{GRID:.0e}, so "
           "last-bit differences between CPUs do not reorder anything. Relative cost (paper §4, "
           "Experiments): inverse-rank-weighted geometric mean of cost(x)/x, cost(x) = the method's own "
           "cost C + the exact patches until the true top-x are all verified (1 = oracle); 'C left out' "
           "scores the order alone. Top-10 verifications: exact patches, in the method's order, until the "
           "true top-10 are all verified (10 = oracle).", "",
           "## Single prompt pairs: median / worst over pairs and seeds", ""]
    md += study_table(rows, DEPTHS)
    if not args.no_distribution:
        md += ["", "## Distribution: relative cost (top-10 verifications), one value per seed", ""]
        md += distribution_table(rows, DEPTHS)
    md += ["", "## The mechanism: GradDrop score / |AtP+QK estimate|", "",
           f"Per single prompt pair, the nodes whose |AtP+QK estimate| is at least {SHOWN:g} of the family's "
           "largest; median ratio of their GradDrop score (per-pair, QK-fixed, as in AtP*) to |AtP+QK "
           "estimate|. The metric reads the last position; a node at an earlier position reaches it only "
           "through later attention layers, and each GradDrop term that drops one of those removes most of "
           "its effect. Earlier keys and values are the exception: the last position's query reads them in "
           "their own layer, whose term is 0 for every node anyway. (1 - ratio) x (number of terms) "
           "estimates how many terms remove the effect: if it stays roughly constant as L grows, the shrink "
           "scales as 1/(L-1).", ""]
    md += mech_lines
    md += ["", "## Where AtP* beats AtP+QK fix (single pairs)", "", "```"]
    md += beats_lines(rows, DEPTHS) + ["```", ""]
    if figure:
        md += [f"![relative cost against depth, and the shrink]({figure}.png)", ""]
    return md


def write_csv(path, rows, keys):
    with open(path, "w") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(keys)
        for r in rows:
            w.writerow([f"{r[k]:.4f}" if isinstance(r[k], float) else r[k] for k in keys])


def main(argv=None):
    parser = argparse.ArgumentParser(description="GradDrop against depth: AtP, AtP+QK fix, AtP* and AtP* "
                                     "with per-sub-layer GradDrop on toy IOI models of 2-12 layers.")
    parser.add_argument("--retrain", action="store_true", help="train every model again (overwrites "
                        "experiments/depth_models/)")
    parser.add_argument("--pairs", type=int, default=6,
                        help="prompt pairs: each alone, then all as one distribution")
    parser.add_argument("--no-distribution", action="store_true", help="single prompt pairs only")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 pairs, one model per depth, no distribution")
    parser.add_argument("--out", default=None, help="output directory (default: experiments/results/ for the "
                        "default run, out/ for any other)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # small matrices: one thread is as fast, and stays fast on a busy machine
    n_used = 1 if args.quick else SEEDS_USED
    if args.quick:
        args.pairs, args.no_distribution = 2, True
    began = time.perf_counter()
    rows, ratios, records = run_study(DEPTHS, n_used, args.pairs, not args.no_distribution, args.retrain)
    elapsed = time.perf_counter() - began

    default_run = not (args.quick or args.no_distribution or args.pairs != 6)
    args.out = args.out or (os.path.join(HERE, "results") if default_run else os.path.join(ROOT, "out"))
    stem = os.path.join(args.out, "depth_study")
    os.makedirs(args.out, exist_ok=True)
    mech_lines, summary = mechanism_table(ratios, DEPTHS)
    plotted = plot(stem + ".png", rows, summary, DEPTHS)
    write_csv(stem + "_shrink.csv", [dict(L=L, family=f, position=w, nodes=v[2], median_ratio_layer=v[0],
                                          median_ratio_sublayer=v[1]) for (L, f, w), v in summary.items()],
              ["L", "family", "position", "nodes", "median_ratio_layer", "median_ratio_sublayer"])
    write_csv(stem + ".csv", rows, ["L", "seed", "where", "pair", "family", "method", "own_cost", "X",
                                    "rel_cost", "rel_cost_no_c", "top10"])
    command = "python experiments/depth_study.py" + "".join(
        f" {a}" for a in (sys.argv[1:] if argv is None else argv))
    md = markdown_report(command, elapsed, args, records, rows, mech_lines,
                         plotted and os.path.basename(stem))
    with open(stem + ".md", "w") as f:
        f.write("\n".join(md))
    print("\n".join(md))
    print(f"\nwrote {stem}.md, .csv, _shrink.csv" + (", .png" if plotted else "") + f" in {elapsed:.0f} s")


if __name__ == "__main__":
    main()
