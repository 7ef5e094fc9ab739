"""
What exact patching costs on Hugging Face models through hf_adapter, per node, in forward passes (F),
with forward_from (each patched run resumed at the node's layer and position from cached clean
activations) and without it (one full forward per patched run, the protocol's plain call).

The unit F is one forward pass (no grad) of the B clean prompts through the adapter (or model.GPT),
timed right before and right after each measurement (their mean is the unit), so that the ratio
survives a machine's load; each ratio is the median of 3 repeats, with their range.

Setup: random float32 weights (no downloads), one torch thread, B=4 prompt pairs of T=16 random token
ids; the noise prompt differs at positions T/2, 3T/4 and T-2. Metric: logit_diff at the last position.
  gpt2-small shape:   GPT2LMHeadModel(GPT2Config()): 12 layers, d_model 768, 12 heads, d_mlp 3072
  pythia-160m shape:  GPTNeoXForCausalLM: 12 layers, d_model 768, 12 heads, d_mlp 3072, rotary_pct 0.25,
                      parallel attention and MLP, vocab 50304
Nodes: 12 neurons (evenly spread over d_mlp) at positions T/2 and T-1 in every layer, 288 in all,
patched one at a time by atp_minimal.verify (its clean and noise runs included in the cost).
For the GPT-2 shape, the same weights through model.GPT are timed as well.

    python experiments/bench_hf.py            # about 10 minutes on one CPU core
    python experiments/bench_hf.py --quick    # 4 neurons per layer and position, 1 repeat: about 1 minute
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import atp_minimal as atp  # noqa: E402
import hf_adapter  # noqa: E402
from model import GPT  # noqa: E402

B, T = 4, 16


class FullForwards(torch.nn.Module):
    """The adapter without forward_from: atp_minimal then runs one full forward per patched run."""

    def __init__(self, adapted):
        super().__init__()
        self.adapted, self.config = adapted, adapted.config

    def attention_scale(self, layer):
        return self.adapted.attention_scale(layer)

    def forward(self, idx, hooks=None):
        return self.adapted(idx, hooks)


def models():
    import transformers
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    pythia = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=50304, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, max_position_embeddings=2048, rotary_pct=0.25,
        use_parallel_residual=True)).eval()
    return {"gpt2-small shape": gpt2, "pythia-160m shape": pythia}


def prompts(vocab):
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, vocab, (B, T), generator=g)
    noise = clean.clone()
    for pos in (T // 2, 3 * T // 4, T - 2):
        noise[:, pos] = torch.randint(0, vocab, (B,), generator=g)
    return clean, noise, atp.logit_diff(torch.tensor(11), torch.tensor(12))


def neuron_nodes(cfg, per_position):
    units = torch.linspace(0, cfg.d_mlp - 1, per_position).long().tolist()
    return [("neuron", l, pos, u) for l in range(cfg.n_layer) for pos in (T // 2, T - 1) for u in units]


def time_F(model, clean, repeats=5):
    with torch.no_grad():
        model(clean)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(clean)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def per_node_in_F(model, unit_model, clean, noise, metric, nodes, repeats):
    """Seconds per node of atp_minimal.verify on `model`, divided by F of `unit_model` timed around it:
    the ratios of `repeats` runs, and the median F."""
    ratios, units = [], []
    for _ in range(repeats):
        before = time_F(unit_model, clean)
        start = time.perf_counter()
        atp.verify(model, clean, noise, metric, nodes, len(nodes), progress=False)
        seconds = time.perf_counter() - start
        F = (before + time_F(unit_model, clean)) / 2
        ratios.append(seconds / len(nodes) / F)
        units.append(F)
    return ratios, statistics.median(units)


def spread(ratios):
    """'median (low-high)' of a list of ratios."""
    median = statistics.median(ratios)
    return f"{median:.3f}" + (f" ({min(ratios):.3f}-{max(ratios):.3f})" if len(ratios) > 1 else "")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="4 neurons per layer and position instead of 12, 1 repeat instead of 3")
    args = parser.parse_args()
    torch.set_num_threads(1)
    repeats = 1 if args.quick else 3
    rows = []
    for name, hf in models().items():
        adapted = hf_adapter.adapt(hf)
        clean, noise, metric = prompts(adapted.config.vocab_size)
        nodes = neuron_nodes(adapted.config, 4 if args.quick else 12)
        candidates = [(name + " (hf_adapter)", adapted)]
        if name.startswith("gpt2"):
            with tempfile.TemporaryDirectory() as d:
                hf.save_pretrained(d)
                candidates.append((name + " (model.GPT)", GPT.from_pretrained(d)))
        for label, model in candidates:
            resumed, F = per_node_in_F(model, model, clean, noise, metric, nodes, repeats)
            full, _ = per_node_in_F(FullForwards(model), model, clean, noise, metric, nodes, repeats)
            rows.append((label, len(nodes), F, full, resumed))
    print(f"\nExact patching of single neurons, atp_minimal.verify; float32, B={B}, T={T}, 1 thread, "
          f"torch {torch.__version__}; F/node: median of {repeats} (range)\n")
    print("| model | nodes | F (ms) | full forwards (F/node) | forward_from (F/node) | speed-up |")
    print("|---|---|---|---|---|---|")
    for name, n, F, full, resumed in rows:
        speed_up = statistics.median(full) / statistics.median(resumed)
        print(f"| {name} | {n} | {F * 1e3:.1f} | {spread(full)} | {spread(resumed)} | {speed_up:.1f}x |")


if __name__ == "__main__":
    main()
