"""
AtP on a TransformerLens 4.x TransformerBridge: TransformerLens's own attribution_patch against this
project's atp_estimates and atp_star through tl_adapter, each as a ratio to one forward of the bridge.

The unit F is one no-grad forward of the bridge on the B clean prompts, measured in the same process;
each timed repeat of a method sits between two timings of F, its ratio uses their mean, and the table
gives the median over the repeats (and their range). Absolute seconds drift with the machine's load;
a ratio measured this way drifts far less.

Setup: GPT-2-small shape with random weights (transformers.GPT2Config(): 12 layers, 12 heads, d_model
768, d_mlp 3072, vocab 50257), booted offline into a float32 TransformerBridge; B = 8 prompt pairs of
T = 16 random token ids, the noise prompt differing at positions T/2, 3T/4 and T-2; metric
atp_minimal.logit_diff at the last position; 1 torch thread. What each row computes:
  attribution_patch      TransformerLens's node attribution (hook_z per head, hook_mlp_out per layer),
                         one clean forward and one corrupt forward + backward per prompt pair
  atp_estimates          AtP over every node kind (q, k, v, z, neuron): a noise forward, a clean forward
                         and one backward for all B pairs at once
  atp_estimates z+neuron the same for TransformerLens's nodes only (z; neurons, whose sum is mlp_out)
  atp_star               AtP + the QK fix + GradDrop, every node kind

    python experiments/bench_tl4.py      # a few minutes; writes experiments/results/bench_tl4.md
"""

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from importlib.metadata import version

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
import atp_minimal as atp  # noqa: E402
import tl_adapter  # noqa: E402


def tokenizer(vocab_size):
    """A word-level tokenizer over vocab_size tokens with no BOS token (TransformerLens reloads one that
    has a BOS token by its name, which fails offline)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    inner = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="t0", pad_token="t0",
                                                eos_token=f"t{vocab_size - 1}")


def gpt2_small_bridge(seed=0):
    """A random GPT-2-small-shaped Hugging Face model, booted into a float32 TransformerBridge."""
    import transformers
    from transformer_lens.model_bridge import TransformerBridge
    torch.manual_seed(seed)
    config = transformers.GPT2Config()
    hf = transformers.GPT2LMHeadModel(config).eval()
    bridge = TransformerBridge.boot_transformers("local-model", hf_model=copy.deepcopy(hf), device="cpu",
                                                 dtype=torch.float32, tokenizer=tokenizer(config.vocab_size))
    return bridge.eval()


def prompts(B, T, vocab_size, seed=1):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, vocab_size, (B, T), generator=g)
    noise = clean.clone()
    for t in (T // 2, 3 * T // 4, T - 2):
        noise[:, t] = (clean[:, t] + 1 + torch.randint(0, vocab_size - 1, (B,), generator=g)) % vocab_size
    return clean, noise


def seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(fn, forward, repeats):
    """Median and range over repeats of seconds(fn) / F, F the mean of a forward just before and after."""
    fn()  # warm up
    ratios, times = [], []
    for _ in range(repeats):
        before = seconds(forward)
        took = seconds(fn)
        after = seconds(forward)
        ratios.append(took / (0.5 * (before + after)))
        times.append(took)
    return statistics.median(ratios), min(ratios), max(ratios), statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--B", type=int, default=8, help="prompt pairs (default 8)")
    parser.add_argument("--T", type=int, default=16, help="tokens per prompt (default 16)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per row (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "bench_tl4.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformer_lens.tools.analysis.attribution_patching import attribution_patch

    bridge = gpt2_small_bridge()
    adapted = tl_adapter.adapt(bridge)
    cfg = adapted.config
    clean, noise = prompts(args.B, args.T, cfg.vocab_size)
    metric = atp.logit_diff(11, 12)

    def forward():
        with torch.no_grad():
            bridge(clean)

    rows = {
        "TransformerLens attribution_patch (z, mlp_out)":
            lambda: attribution_patch(bridge, clean=noise, corrupt=clean,
                                      metric_fn=lambda x: metric(x).sum()),
        "atp_estimates (q, k, v, z, neuron)": lambda: atp.atp_estimates(adapted, clean, noise, metric),
        "atp_estimates (z, neuron)":
            lambda: atp.atp_estimates(adapted, clean, noise, metric, kinds=("z", "neuron")),
        "atp_star (q, k, v, z, neuron)": lambda: atp.atp_star(adapted, clean, noise, metric),
    }
    forward()
    F = statistics.median(seconds(forward) for _ in range(args.repeats))
    results = {name: measure(fn, forward, args.repeats) for name, fn in rows.items()}

    flags = (("B", args.B), ("T", args.T), ("repeats", args.repeats), ("threads", args.threads))
    command = "python experiments/bench_tl4.py" + "".join(
        f" --{k} {v}" for k, v in flags if v != parser.get_default(k))
    title = ("# AtP on a TransformerBridge: TransformerLens's attribution_patch vs atp_minimal "
             "through tl_adapter")
    lines = [title, "",
             f"Made by `{command}`: transformer-lens {version('transformer-lens')}, transformers "
             f"{version('transformers')}, torch {torch.__version__}, "
             f"{platform.processor() or platform.machine()}, {args.threads} thread(s).",
             f"GPT-2-small-shaped random bridge (L={cfg.n_layer}, H={cfg.n_head}, d_model 768, "
             f"d_mlp {cfg.d_mlp}, vocab {cfg.vocab_size}), float32, B = {args.B} prompt pairs, T = {args.T}. "
             f"1 F = one no-grad forward of the bridge on the B clean prompts = {1e3 * F:.0f} ms (median of "
             f"{args.repeats}); each row: median over {args.repeats} repeats of time / F (F measured around "
             f"each repeat), and the range.", "",
             "| method | time / F | range | seconds |", "|---|---|---|---|"]
    lines += [f"| {name} | {r:.1f} | {lo:.1f} - {hi:.1f} | {s:.2f} |"
              for name, (r, lo, hi, s) in results.items()]
    lines += ["",
              "attribution_patch runs one clean forward and one corrupt forward + backward per prompt pair "
              "(batch 1); atp_estimates one noise forward, one clean forward and one backward for the whole "
              "batch. Both give the same numbers where their nodes meet (tests/test_tl_adapter_bridge.py)."]
    print("\n".join(lines))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"\nwritten to {os.path.relpath(args.out, ROOT)}")


if __name__ == "__main__":
    main()
