"""
The worked example of atp_minimal.py: exact patching against AtP, AtP+QK fix and AtP* on a few IOI prompt
pairs, the true top nodes side by side, then verify-then-bound.

    python demo.py                      # the shipped toy IOI model (toy_model/), a few seconds on one core
    python demo.py --model DIR          # a Hugging Face GPT-2 directory (config.json + weights)
"""

import torch

from atp_minimal import (activation_patching, atp_estimates, atp_star, false_negative_bound, logit_diff,
                         node_label, rank_nodes, verifications_needed)


def gpt2_ioi_pairs(n, seed=0):
    """IOI prompt pairs for a real GPT-2, tokenized with tiktoken, built with the toy task's scheme:
    the noise prompt swaps the second-clause subject for the other name, so the answer flips."""
    import random
    from model import get_tokenizer
    enc = get_tokenizer()
    names = [w for w in ["Mary", "John", "Tom", "James", "Dan", "Sid", "Martin", "Amy", "Kate", "Paul",
                         "Lisa", "Mark", "Sarah", "David", "Emma", "Peter", "Laura", "Sam", "Max", "Rose"]
             if len(enc.encode(" " + w)) == 1]  # single-token names keep every prompt the same length
    rng = random.Random(seed)
    template = "When {a} and {b} went to the store, {s} gave a drink to"
    clean, noise, answer, wrong = [], [], [], []
    for _ in range(n):
        io, s = rng.sample(names, 2)
        a, b = (io, s) if rng.random() < 0.5 else (s, io)
        clean.append(enc.encode(template.format(a=a, b=b, s=s)))
        noise.append(enc.encode(template.format(a=a, b=b, s=io)))
        answer.append(enc.encode(" " + io)[0])
        wrong.append(enc.encode(" " + s)[0])
    t = lambda x: torch.tensor(x, dtype=torch.long)
    return t(clean), t(noise), t(answer), t(wrong), enc.decode(clean[0]), enc.decode(noise[0])


def main(argv=None):
    parser = argument_parser()
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    torch.manual_seed(args.seed)
    if args.threads or args.model is None:
        torch.set_num_threads(args.threads or 1)
    model, clean, noise, answer, wrong, show, label = load(args)
    check_sizes(parser, args, model.config, clean.shape[1])
    metric = logit_diff(answer, wrong)  # logit(answer) - logit(other name), last position
    cfg = model.config
    print(f"model: {label}: {cfg.n_layer} layers, {cfg.n_head} heads, "
          f"d_model {cfg.n_embd}, d_mlp {cfg.d_mlp}")
    print(f"prompt pair 0 of {args.pairs}:\n  clean: {show[0]!r}\n  noise: {show[1]!r}")
    with torch.no_grad():
        m_clean, m_noise = metric(model(clean)), metric(model(noise))
    print(f"metric = logit diff (answer - other name): "
          f"clean {m_clean.mean():+.3f}, noise {m_noise.mean():+.3f}")
    truth, scores = run_methods(model, clean, noise, metric)
    families = (("attention nodes (q, k, v, z)", ("q", "k", "v", "z")), ("MLP neurons", ("neuron",)))
    for family, kinds in families:
        print_family(family, kinds, truth, scores, args.top)
    print_bound(model, clean, noise, metric, truth, scores, args)


def argument_parser():
    import argparse
    parser = argparse.ArgumentParser(description="AtP* worked example: exact patching vs AtP, AtP+QK fix and "
                                     "AtP*, then verify-then-bound. Default: the shipped toy IOI model.")
    parser.add_argument("--model", default=None,
                        help="a Hugging Face GPT-2 directory (config.json + weights); "
                             "default: the toy IOI model in toy_model/")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed for the prompt pairs and the bound's subsets")
    parser.add_argument("--pairs", type=int, default=4, help="number of clean/noise prompt pairs")
    parser.add_argument("--top", type=int, default=10, help="K for top-K recall and the side-by-side table")
    parser.add_argument("--verify", type=int, default=20, help="nodes verified before the bound")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 for the toy model, whose matrices are too small "
                             "to gain from more; torch's default otherwise)")
    return parser


def load(args):
    """The model and the IOI prompt pairs (B, T) on args.device, the first pair as text, and a label."""
    if args.model is None:
        import toy_ioi
        model = toy_ioi.load_toy_model()
        clean, noise, answer, wrong = toy_ioi.make_pairs(args.pairs, split="test", seed=args.seed)
        show = (toy_ioi.decode(clean[0]), toy_ioi.decode(noise[0]))
        label = "toy IOI model (toy_model/)"
    else:
        from model import GPT
        model = GPT.from_pretrained(args.model)
        clean, noise, answer, wrong, *show = gpt2_ioi_pairs(args.pairs, args.seed)
        label = args.model
    model.to(args.device)
    clean, noise, answer, wrong = (x.to(args.device) for x in (clean, noise, answer, wrong))
    return model, clean, noise, answer, wrong, show, label


def run_methods(model, clean, noise, metric):
    """Exact patching and the three estimators, timed. Returns c(n) (kind -> (L, T, U)) and each method's
    score (name -> kind -> (L, T, U)): estimates are |.| per pair, then the mean (paper §2 Background)."""
    import time
    timings, results = {}, {}
    methods = [("exact", lambda: activation_patching(model, clean, noise, metric)),
               ("AtP", lambda: atp_estimates(model, clean, noise, metric)),
               ("AtP+QK", lambda: atp_estimates(model, clean, noise, metric, qk_fix=True)),
               ("AtP*", lambda: atp_star(model, clean, noise, metric))]
    for name, run in methods:
        start = time.perf_counter()
        results[name] = run()
        timings[name] = time.perf_counter() - start
    print("time: " + ", ".join(f"{n} {t:.2f}s" for n, t in timings.items()))
    truth = {k: v.mean(0) for k, v in results["exact"].items()}  # c(n): the mean of the signed effects
    scores = {name: {k: v.abs().mean(0) for k, v in results[name].items()}
              for name in ("AtP", "AtP+QK", "AtP*")}
    return truth, scores


def print_family(family, kinds, truth, scores, K):
    """The true top-K of one node family side by side with each method's top-K, recall, verification
    cost, and where each method ranks AtP's false negatives."""
    true_rank, _ = rank_nodes({k: truth[k].abs() for k in kinds})
    c_of = dict(zip(true_rank, [truth[n[0]][n[1:]].item() for n in true_rank]))
    ranks = {name: rank_nodes({k: s[k] for k in kinds})[0] for name, s in scores.items()}
    print(f"\n== {family}: {len(true_rank)} nodes; true top-{K} by |c(n)| ==")
    print(f"{'rank':>4}  {'exact c(n)':>22} " + " ".join(f"{name:>26}" for name in ranks))
    for i in range(K):
        row = f"{i + 1:>4}  {node_label(true_rank[i]):>13} {c_of[true_rank[i]]:+8.3f} "
        row += " ".join(f"{node_label(r[i]):>17} {c_of[r[i]]:+8.3f}" for r in ranks.values())
        print(row)
    top = set(true_rank[:K])
    print(f"recall of the true top-{K} in each method's top-{K}: " + ", ".join(
        f"{name} {len(top & set(r[:K])) / K:.0%}" for name, r in ranks.items()))
    print(f"exact patches to verify the true top-{K} in each method's order: " + ", ".join(
        f"{name} {verifications_needed(r, top)}" for name, r in ranks.items()) + f" (oracle {K})")
    position = {name: {n: i + 1 for i, n in enumerate(r)} for name, r in ranks.items()}
    missed = [n for n in true_rank[:K] if position["AtP"][n] > K]
    print(f"AtP false negatives (true top-{K}, outside AtP's top-{K}) and where each method ranks them:")
    for n in missed:
        print(f"  {node_label(n):>17}  c(n) {c_of[n]:+.3f}   " + "   ".join(
            f"{name} #{position[name][n]}" for name in ranks))
    if not missed:
        print("  none")


def print_bound(model, clean, noise, metric, truth, scores, args):
    """Verify-then-bound (the paper's diagnostic): rank attention nodes by AtP*, verify the top, bound
    the rest."""
    import time
    ranking, _ = rank_nodes({k: scores["AtP*"][k] for k in ("q", "k", "v", "z")})
    start = time.perf_counter()
    p, n_samples = 0.1, 200
    bound = false_negative_bound(model, clean, noise, metric, ranking, K=args.verify, p=p,
                                 n_samples=n_samples, seed=args.seed)
    elapsed = time.perf_counter() - start
    true_max = max(abs(truth[n[0]][n[1:]].item()) for n in bound["unverified"])
    print(f"\n== verify-then-bound on attention nodes: verified the AtP* top {args.verify}, then "
          f"{n_samples} random joint patches (p = {p}) of the other {len(bound['unverified'])} "
          f"({elapsed:.1f}s) ==")
    print(f"largest verified |c(n)|: {bound['verified_effects'].abs().max():.3f}")
    print(f"theta* (95% upper bound on any unverified |c(n)|): {bound['theta_star']:.3f} "
          f"(set by {node_label(bound['worst_node'])}); true largest unverified |c(n)|: {true_max:.3f}")


def check_arguments(parser, args):
    """Refuse impossible settings before any work is done."""
    for name in ("pairs", "top", "verify"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")


def check_sizes(parser, args, cfg, T):
    """--top and --verify against the model's node counts (known once the model is loaded)."""
    attention, neurons = cfg.n_layer * T * cfg.n_head * 4, cfg.n_layer * T * cfg.d_mlp
    if args.top > min(attention, neurons):
        parser.error(f"--top {args.top} exceeds the number of nodes in a family (attention {attention}, "
                     f"neurons {neurons})")
    if args.verify >= attention:
        parser.error(f"--verify {args.verify} must leave some of the {attention} attention nodes unverified")


if __name__ == "__main__":
    main()
