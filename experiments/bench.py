"""
Benchmark for atp_minimal.py: what AtP, AtP + QK fix, AtP*, exhaustive patching and the key fix cost,
reported as RATIOS to one forward pass measured in the same run, plus the peak memory of AtP*.

The unit F is one forward pass (no grad) of the B clean prompts. Absolute seconds on a shared machine
drift with its load; a ratio measured in one run drifts far less. To keep it so, every timed repeat of
a method sits between two timings of F, each repeat's ratio uses the mean of those two, and the table
gives the median over the repeats (and their range).

Setup, CPU: GPT-2-small shape with random weights (model.GPT(model.GPTConfig()): L=12 layers, H=12
heads, d_model 768, d_mlp 3072, vocab 50257), float32, B=8 prompt pairs of T=16 random token ids.
The noise prompt differs from the clean one at positions T/2, 3T/4 and T-2 (so, through causal attention,
every node at positions >= T/2 moves). Metric: atp_minimal.logit_diff at the last position.
With CUDA, the same table is also made on the GPU: bf16 model, larger B and T, float32 estimates.

    python experiments/bench.py                # a few minutes on 2 CPU cores; writes
                                               # experiments/results/bench_cpu.md
    python experiments/bench.py --quick        # about a minute: fewer nodes and repeats, some values
                                               # extrapolated; writes out/bench_cpu.md (never the
                                               # shipped experiments/results/)
    python experiments/bench.py --out FILE.md  # write the CPU table elsewhere (the GPU one goes to --gpu-out)
    python experiments/bench.py --tl-adapter   # exact patching: tl_adapter against transformer_lens.patching;
                                               # writes experiments/results/bench_tl_adapter.md

Threads: by default as many torch threads as there are cores not already busy (cores minus the 1-minute
load average, at least 1). More threads than free cores makes each parallel op wait at its barrier for
a descheduled thread, which slows many-small-op code erratically; --threads N overrides.

Rows (the baselines are atp_minimal's Part I reference forms, timed against its Part II fast forms):
  1. F itself, and forward + backward (activation gradients only, as AtP needs) for reference
  2. AtP over all node kinds (q, k, v, z, neuron): atp_estimates                target <= 4.5 F
  3. AtP + QK fix: atp_estimates(qk_fix=True)                                   target <= 5.5 F
  4. AtP* (= AtP + QK fix + GradDrop): atp_star                                 target <= 16 F
     and literal GradDrop, atp_star_reference: L passes, pass l a noise forward and a clean
     forward+backward with blocks.{l}.hook_attn_out and hook_mlp_out detached; checked against atp_star
  5. exhaustive activation patching of MLP neurons: atp_minimal.verify (patch_node_sets with one-node
     masks, batched, resumed at the patched layer) against the naive loop of
     activation_patching_reference, one full forward per node (patch_hooks). A "node" is one
     (layer, position, neuron) patched in all B prompt pairs at once, i.e. one value of I(n) for
     every pair.                                                                target >= 5x the naive loop
  6. key fix scaling: key_fix (closed form, O(T^2)) against key_fix_reference (literal, O(T^3))
  7. peak memory of AtP* over T and L, each configuration in a fresh subprocess
"""

import argparse
import cProfile
import gc
import json
import math
import os
import platform
import pstats
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

HERE = os.path.dirname(os.path.abspath(__file__))  # experiments/: the shipped tables go to results/ here
ROOT = os.path.dirname(HERE)  # the repository root: atp_minimal.py, model.py, and out/ for scratch runs
sys.path.insert(0, ROOT)
import atp_minimal as atp  # noqa: E402
import model as gpt  # noqa: E402

# --------------------------------------------------------------------------------------------------
# --- settings


@dataclass
class Settings:
    """Everything one table depends on. cpu_settings / gpu_settings below fill it in."""
    device: str
    dtype: torch.dtype
    B: int
    T: int
    repeats: int  # timed repeats per measurement (median reported)
    heavy_repeats: int  # the same, for the slow naive references and the batched patching sweep
    patch_nodes_per_layer: int  # row 5: neurons patched in layer 0 and in layer L-1
    naive_patch_nodes: int  # row 5: nodes for the naive one-forward-per-node loop
    chunk_size: int  # row 5: rows per batched forward (atp_minimal's default is 256)
    graddrop_passes: Optional[int]  # row 4: None = all L passes of the naive GradDrop; k = time k,
    #                                 extrapolate
    keyfix_T: Tuple[int, ...]  # row 6
    keyfix_naive_max_T: int  # row 6: the naive key fix is extrapolated above this T
    memory_configs: Tuple[Tuple[int, int], ...]  # row 7: (L, T) pairs
    memory_atp_reference: bool  # row 7: also measure plain AtP's peak in each configuration
    profile: bool
    seed: int = 0


def cpu_settings(quick: bool, seed: int) -> Settings:
    return Settings(
        device="cpu", dtype=torch.float32, B=8, T=16, repeats=3 if quick else 5, heavy_repeats=3,
        patch_nodes_per_layer=16 if quick else 32, naive_patch_nodes=4 if quick else 6,
        chunk_size=128 if quick else 256, graddrop_passes=2 if quick else None,
        keyfix_T=(16, 32, 64, 128, 256), keyfix_naive_max_T=128 if quick else 256,
        memory_configs=(((12, 16), (12, 32), (6, 16)) if quick
                        else ((12, 16), (12, 32), (12, 64), (6, 16), (6, 64))),
        memory_atp_reference=not quick, profile=not quick, seed=seed)


def gpu_settings(quick: bool, seed: int, B: int, T: int) -> Settings:
    return Settings(
        device="cuda", dtype=torch.bfloat16, B=B, T=T, repeats=5 if quick else 10, heavy_repeats=5,
        patch_nodes_per_layer=32 if quick else 128, naive_patch_nodes=8 if quick else 16,
        chunk_size=256, graddrop_passes=None,
        keyfix_T=(64, 128, 256, 512, 1024), keyfix_naive_max_T=512 if quick else 1024,
        memory_configs=(((12, T // 4), (12, T // 2), (6, T // 4)) if quick else
                        ((12, T // 4), (12, T // 2), (12, T), (6, T // 4), (6, T))),
        memory_atp_reference=True, profile=False, seed=seed)


# --------------------------------------------------------------------------------------------------
# --- inputs


def diff_positions(T: int) -> List[int]:
    """Where the noise prompt differs from the clean one: T/2, 3T/4 and T-2."""
    return sorted({T // 2, (3 * T) // 4, max(T - 2, 0)})


def make_inputs(cfg: gpt.GPTConfig, B: int, T: int, seed: int, device):
    """Random clean ids; noise = clean with different random ids at diff_positions(T); a logit_diff metric
    between two random tokens per pair."""
    g = torch.Generator().manual_seed(seed)
    V = cfg.vocab_size
    clean = torch.randint(V, (B, T), generator=g)
    noise = clean.clone()
    for p in diff_positions(T):  # + a nonzero offset mod V: always a different token
        noise[:, p] = (clean[:, p] + 1 + torch.randint(V - 1, (B,), generator=g)) % V
    answer = torch.randint(V, (B,), generator=g)
    wrong = (answer + 1 + torch.randint(V - 1, (B,), generator=g)) % V
    metric = atp.logit_diff(answer.to(device), wrong.to(device))
    return clean.to(device), noise.to(device), metric


def make_model(n_layer: int, dtype, device, seed: int) -> gpt.GPT:
    torch.manual_seed(seed)
    return gpt.GPT(gpt.GPTConfig(n_layer=n_layer)).to(device=device, dtype=dtype)


def nodes_per_position(cfg: gpt.GPTConfig, n_layer: int) -> int:
    """Nodes of atp_minimal at one position of an n_layer-deep model of cfg's width: q, k, v, z per head
    and every MLP neuron, in every layer."""
    return n_layer * (4 * cfg.n_head + cfg.d_mlp)


# --------------------------------------------------------------------------------------------------
# --- timing


@dataclass
class Measure:
    ratio: float  # median over repeats of time / F
    seconds: float  # median over repeats
    ratios: List[float] = field(default_factory=list)
    out: object = None  # the last repeat's result, when Clock.in_F was asked to keep it

    def text(self, unit="F", digits=2) -> str:
        lo, hi = min(self.ratios), max(self.ratios)
        return f"{self.ratio:.{digits}f} {unit} (range {lo:.{digits}f}-{hi:.{digits}f}, n={len(self.ratios)})"


class Clock:
    """Times callables (synchronising CUDA), and ratios to F bracketed by F timings."""

    def __init__(self, device: torch.device, forward):
        self.cuda = device.type == "cuda"
        self.forward = forward
        self.F_samples: List[float] = []

    def time(self, fn):
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, out

    def F(self) -> float:
        seconds, _ = self.time(self.forward)
        self.F_samples.append(seconds)
        return seconds

    def in_F(self, fn, repeats: int, keep: bool = False) -> Measure:
        """F, (fn, F) x repeats: each repeat's ratio is t(fn) / mean of the two F timings around it.
        keep: also return the last repeat's result (Measure.out), for an agreement check."""
        ratios, seconds, kept = [], [], None
        before = self.F()
        for _ in range(repeats):
            t, out = self.time(fn)
            kept = out if keep else None
            del out
            after = self.F()
            ratios.append(t / ((before + after) / 2))
            seconds.append(t)
            before = after
        return Measure(statistics.median(ratios), statistics.median(seconds), ratios, kept)

    def per_call(self, fns, repeats: int, min_seconds=0.05) -> List[float]:
        """Median seconds per call of each of several small functions. After a warm-up call, each function
        gets a loop count n so that one sample lasts >= min_seconds; then the functions are sampled in
        turn, `repeats` rounds, so a burst of load on the machine spoils one round, not one function."""
        counts = []
        for fn in fns:
            fn()
            n = 1
            while self.time(lambda: [fn() for _ in range(n)])[0] < min_seconds and n < 1 << 16:
                n *= 2
            counts.append(n)
        samples = [[] for _ in fns]
        for _ in range(repeats):
            for fn, n, out in zip(fns, counts, samples):
                out.append(self.time(lambda: [fn() for _ in range(n)])[0] / n)
        return [statistics.median(x) for x in samples]


# --------------------------------------------------------------------------------------------------
# --- the baselines: atp_minimal's Part I reference forms, and the two passes every method is made of


def no_grad_forward(model, clean):
    """F, the unit: one forward of the B clean prompts (B, T) -> logits (B, T, V), no autograd graph."""
    with torch.no_grad():
        return model(clean)


def forward_backward(model, clean, metric):
    """One clean forward with grad, then the gradient of sum(metric) with respect to the residual stream
    entering block 0: activation gradients through the whole model and no weight gradients, the backward
    pass AtP needs. The graph starts at blocks.0.hook_resid_pre, as in atp_minimal. Returns (B, T, D)."""
    start = "blocks.0.hook_resid_pre"
    leaf = {start: lambda t: t.detach().requires_grad_(True)}
    with torch.enable_grad():
        logits, cache = atp.run_with_cache(model, clean, [start], leaf)  # logits (B, T, V)
        return torch.autograd.grad(metric(logits).sum(), [cache[start]])[0]  # (B, T, D)


def literal_grad_drop_passes(model, clean, noise, metric, layers):
    """Some of the passes of atp_minimal.atp_star_reference (literal GradDrop, §3 Methods), for timing:
    for each layer l in `layers`, atp_qk_fix_reference on the model with layer l's residual writes
    detached (GradientDropped). Estimates kind -> (B, L, T, U) each."""
    units = atp.grad_drop_units(model)  # per layer: [hook_attn_out, hook_mlp_out]
    return [atp.atp_qk_fix_reference(atp.GradientDropped(model, units[l]), clean, noise, metric)
            for l in layers]


def random_key_fix_inputs(T: int, H: int, Dh: int, scale: float, g: torch.Generator, device):
    """Inputs of atp_minimal.key_fix for one prompt: q, k(clean), k(noise) = k(clean) + noise, (1, T, H, Dh)
    each, and a random G = dL/dpattern (1, H, T, S)."""
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(device)
    q, k_clean = rnd(1, T, H, Dh), rnd(1, T, H, Dh)
    k_noise = k_clean + 0.5 * rnd(1, T, H, Dh)
    return q, k_clean, k_noise, rnd(1, H, T, T), scale


def loglog_slope(xs, ys) -> float:
    """Least-squares slope of log y against log x: the exponent of y ~ x^p."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float64 on the CPU."""
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# --------------------------------------------------------------------------------------------------
# --- memory: each configuration in a fresh process (CPU) or with CUDA's peak counters (GPU)


def _proc_status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB -> MB
    raise RuntimeError(f"/proc/self/status has no {key}")


def memory_child(n_layer: int, T: int, B: int, seed: int, threads: int, atp_reference: bool):
    """Run in a fresh process (see measure_memory_cpu). Prints JSON: MB above the baseline (model, inputs,
    and a tiny warm-up run of AtP* so that one-off library buffers are already there) at the peak of
    a no-grad forward, of AtP (if asked) and of AtP*. The peak is VmHWM, reset before each run by writing
    5 to /proc/self/clear_refs; the parent sets MALLOC_MMAP_THRESHOLD_ so freed tensors leave the RSS."""
    torch.set_num_threads(threads)
    model = make_model(n_layer, torch.float32, "cpu", seed)
    tiny_clean, tiny_noise, tiny_metric = make_inputs(model.config, 1, 4, seed, "cpu")
    atp.atp_star(model, tiny_clean, tiny_noise, tiny_metric)
    clean, noise, metric = make_inputs(model.config, B, T, seed, "cpu")
    runs = [("forward", lambda: no_grad_forward(model, clean))]
    if atp_reference:
        runs.append(("atp", lambda: atp.atp_estimates(model, clean, noise, metric)))
    runs.append(("atp_star", lambda: atp.atp_star(model, clean, noise, metric)))
    out = {}
    for name, fn in runs:
        gc.collect()
        base = _proc_status_mb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        result = fn()
        out[name] = _proc_status_mb("VmHWM") - base
        if name == "atp_star":
            out["graph"] = any(v.requires_grad for v in result.values())
        del result
    print(json.dumps(out))


def measure_memory_cpu(s: Settings, threads: int):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="131072")
    rows = []
    for n_layer, T in s.memory_configs:
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", str(n_layer), str(T), str(s.B),
               str(s.seed), str(threads), "1" if s.memory_atp_reference else "0"]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode == 0:
            rows.append((n_layer, T, json.loads(done.stdout.strip().splitlines()[-1])))
        else:  # out of memory (killed) or an error: reported as OOM, left out of the fits
            print(f"memory run L={n_layer} T={T} failed (exit {done.returncode}):\n{done.stderr[-2000:]}",
                  flush=True)
            rows.append((n_layer, T, {"forward": math.nan, "atp": math.nan, "atp_star": math.nan}))
    return rows


def measure_memory_cuda(s: Settings):
    rows = []
    for n_layer, T in s.memory_configs:
        model = make_model(n_layer, s.dtype, "cuda", s.seed)
        atp.atp_star(model, *make_inputs(model.config, 1, 4, s.seed, "cuda"))  # warm-up
        clean, noise, metric = make_inputs(model.config, s.B, T, s.seed, "cuda")
        runs = [("forward", lambda: no_grad_forward(model, clean))]
        if s.memory_atp_reference:
            runs.append(("atp", lambda: atp.atp_estimates(model, clean, noise, metric)))
        runs.append(("atp_star", lambda: atp.atp_star(model, clean, noise, metric)))
        out = {}
        for name, fn in runs:
            gc.collect()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            try:
                result = fn()
                torch.cuda.synchronize()
                out[name] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
                if name == "atp_star":
                    out["graph"] = any(v.requires_grad for v in result.values())
                del result
            except torch.cuda.OutOfMemoryError:
                out[name] = math.nan  # reported as OOM, left out of the fits
                torch.cuda.empty_cache()
        rows.append((n_layer, T, out))
        del model
        torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------------------------------
# --- profile of AtP*


def qualified_names(path: str) -> dict:
    """{first line of each def: "Class.method" or "function"} for one source file, to label cProfile rows."""
    import ast
    with open(path) as f:
        tree = ast.parse(f.read())
    names = {}

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.ClassDef)):
                if isinstance(child, ast.FunctionDef):
                    first = min([child.lineno] + [d.lineno for d in child.decorator_list])
                    names[first] = prefix + child.name
                visit(child, prefix + child.name + ".")
    visit(tree, "")
    return names


def profile_atp_star(model, clean, noise, metric, top=10):
    """Where AtP*'s time goes: cProfile cumulative time of this project's functions (and autograd.grad),
    and torch.profiler's heaviest ops by self time. Returns markdown lines."""
    profiler = cProfile.Profile()
    profiler.enable()
    atp.atp_star(model, clean, noise, metric)
    profiler.disable()
    stats = pstats.Stats(profiler).stats
    total = max(v[3] for v in stats.values())  # cumulative time of the outermost call
    rows, labels = [], {}
    for (filename, line, name), (_, ncalls, _, cumtime, _) in stats.items():
        base = os.path.basename(filename)
        ours = base in ("atp_minimal.py", "model.py") and cumtime < 0.99 * total  # not the outer wrappers
        grad = name == "grad" and filename.replace(os.sep, "/").endswith("torch/autograd/__init__.py")
        if ours:
            if filename not in labels:
                labels[filename] = qualified_names(filename)
            rows.append((cumtime, ncalls, f"{base[:-3]}.{labels[filename].get(line, name)}"))
        elif grad:
            rows.append((cumtime, ncalls, "torch.autograd.grad (all backward passes)"))
    rows.sort(reverse=True)
    lines = [f"Function-level (cProfile, one atp_star call of {total:.2f} s; cumulative time, so nested rows "
             "overlap; cProfile inflates Python-heavy code a little):", "",
             "| function | calls | cumulative s | % of atp_star |", "|---|---|---|---|"]
    lines += [f"| `{w}` | {n} | {c:.2f} | {100 * c / total:.0f}% |" for c, n, w in rows[:top]]

    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        atp.atp_star(model, clean, noise, metric)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    all_self = sum(e.self_cpu_time_total for e in events)
    lines += ["", "Op-level (torch.profiler, self CPU time, a second atp_star call):", "",
              "| op | calls | self ms | % |", "|---|---|---|---|"]
    lines += [f"| `{e.key}` | {e.count} | {e.self_cpu_time_total / 1e3:.0f} | "
              f"{100 * e.self_cpu_time_total / all_self:.0f}% |" for e in events[:8]]
    return lines


# --------------------------------------------------------------------------------------------------
# --- the table: one function per measured row (or group of rows), then the renderer


@dataclass
class Row:
    num: str
    what: str
    target: str
    measured: str
    status: str  # "met", "NOT met", "-" (reference, no target), "error"


def source_digest() -> str:
    """Short sha256 of the code under test, to tell which version a table measured."""
    import hashlib
    h = hashlib.sha256()
    for name in ("atp_minimal.py", "model.py"):
        with open(os.path.join(ROOT, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:12]


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def auto_threads() -> int:
    """The cores not already busy. On a machine that other processes keep busy, more torch threads than
    free cores make every parallel op wait at its barrier for a descheduled thread: many-small-op code
    (the QK fix, GradDrop's estimates) then slows down many times over, erratically."""
    cores = usable_cores()
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, round(cores - busy)))


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


@dataclass
class Run:
    """What every row of one table shares: settings, the GPT-2-small-shaped model, inputs and clock."""
    s: Settings
    model: gpt.GPT
    clean: torch.Tensor  # (B, T) token ids
    noise: torch.Tensor  # (B, T) token ids, = clean except at diff_positions(T)
    metric: object  # logits (B, T, V) -> (B,)
    clock: Clock
    t_start: float = field(default_factory=time.perf_counter)

    def log(self, msg: str):
        print(f"[{time.perf_counter() - self.t_start:6.1f}s] {msg}", flush=True)


def start_run(s: Settings) -> Run:
    """Build the model and inputs on s.device, and warm up once every code path the rows time (forward,
    backward, AtP*, batched and naive patching)."""
    device = torch.device(s.device)
    model = make_model(12, s.dtype, device, s.seed)
    clean, noise, metric = make_inputs(model.config, s.B, s.T, s.seed, device)
    run = Run(s, model, clean, noise, metric, Clock(device, lambda: no_grad_forward(model, clean)))
    run.log("warm-up")
    no_grad_forward(model, clean)
    forward_backward(model, clean, metric)
    atp.atp_star(model, clean, noise, metric)
    atp.verify(model, clean, noise, metric, [("neuron", 0, s.T - 1, 0)], 1, progress=False)
    return run


def row_unit(run: Run) -> Row:
    """Row 1: F itself, from every F timing taken so far."""
    Fs = run.clock.F_samples
    return Row("1", f"forward pass F: B={run.s.B} clean prompts, T={run.s.T}, no grad (the unit)", "unit",
               f"1 F = {1e3 * statistics.median(Fs):.1f} ms (median of {len(Fs)} timings; "
               f"range {1e3 * min(Fs):.1f}-{1e3 * max(Fs):.1f} ms)", "-")


def row_forward_backward(run: Run) -> Row:
    """Row 1: one forward + backward, the floor of any gradient method."""
    run.log("row 1: forward, forward+backward")
    fb = run.clock.in_F(lambda: forward_backward(run.model, run.clean, run.metric), run.s.repeats)
    return Row("1", "forward + backward (activation gradients only, no weight gradients)", "-", fb.text(),
               "-")


def rows_atp(run: Run) -> Tuple[List[Row], Measure]:
    """Rows 2-4: AtP, AtP + QK fix and AtP* (atp_minimal's fast forms), and what the QK fix and GradDrop
    each add. Also returns AtP*'s Measure, whose .out keeps its scores for row 4's agreement check."""
    model, clean, noise, metric, n = run.model, run.clean, run.noise, run.metric, run.s.repeats
    run.log("row 2: AtP")
    m_atp = run.clock.in_F(lambda: atp.atp_estimates(model, clean, noise, metric), n)
    run.log("row 3: AtP + QK fix")
    m_qk = run.clock.in_F(lambda: atp.atp_estimates(model, clean, noise, metric, qk_fix=True), n)
    run.log("row 4: AtP*")
    m_star = run.clock.in_F(lambda: atp.atp_star(model, clean, noise, metric), n, keep=True)
    rows = [Row("2", "AtP, all kinds (q, k, v, z, neuron), per pair", "<= 4.5 F", m_atp.text(),
                verdict(m_atp.ratio <= 4.5)),
            Row("3", "AtP + QK fix", "<= 5.5 F", m_qk.text(), verdict(m_qk.ratio <= 5.5)),
            Row("4", "AtP* (AtP + QK fix + GradDrop)", "<= 16 F", m_star.text(), verdict(m_star.ratio <= 16)),
            Row("4", "AtP* cost split: QK fix adds (row 3 - row 2), GradDrop adds (row 4 - row 3)", "-",
                f"QK fix {m_qk.ratio - m_atp.ratio:+.2f} F, GradDrop {m_star.ratio - m_qk.ratio:+.2f} F",
                "-")]
    return rows, m_star


def row_literal_grad_drop(run: Run, m_star: Measure) -> Row:
    """Row 4: atp_minimal.atp_star_reference, literal GradDrop: one pass per dropped layer. With
    s.graddrop_passes = k, only k of the L passes are timed; the passes are alike, so the rest scale."""
    model, clean, noise, metric, L = run.model, run.clean, run.noise, run.metric, run.model.config.n_layer
    run.log("row 4: literal GradDrop (atp_star_reference)")
    k = run.s.graddrop_passes
    if k is None:
        m_ref = run.clock.in_F(lambda: atp.atp_star_reference(model, clean, noise, metric),
                               run.s.heavy_repeats, keep=True)
        diff = max(max_rel_diff(m_ref.out[kind], m_star.out[kind]) for kind in atp.KINDS)
        ratio = m_ref.ratio
        note = (f"{m_ref.text()}; = {ratio / m_star.ratio:.1f}x AtP*; same scores as atp_star "
                f"(max rel. diff {diff:.1e})")
    else:
        layers = [round(i * (L - 1) / max(k - 1, 1)) for i in range(k)]
        m_ref = run.clock.in_F(lambda: literal_grad_drop_passes(model, clean, noise, metric, layers),
                               run.s.heavy_repeats)
        ratio = m_ref.ratio * L / k
        note = (f"~{ratio:.1f} F (extrapolated from {k} of {L} passes: {m_ref.text()}); "
                f"= {ratio / m_star.ratio:.1f}x AtP*")
    return Row("4", f"literal GradDrop (atp_minimal.atp_star_reference): {L} passes, each a noise forward "
               "and a clean forward+backward with hook_attn_out/hook_mlp_out detached, q/k by the O(T^3) "
               "key fix", "-", note, "-")


def patching_nodes(run: Run) -> List[tuple]:
    """Row 5's neurons, evenly spread over d_mlp, at the first changed position and the last, in layers 0
    and L-1: resuming there runs L and 1 blocks, whose mean (L+1)/2 is the mean over all layers, so the
    per-node cost is that of a sweep over every layer. Ordered by layer, so no chunk mixes layers."""
    cfg, T = run.model.config, run.s.T
    n_per_position = run.s.patch_nodes_per_layer // 2
    units = [round(i * (cfg.d_mlp - 1) / max(n_per_position - 1, 1)) for i in range(n_per_position)]
    return [("neuron", l, pos, u) for l in (0, cfg.n_layer - 1) for pos in (diff_positions(T)[0], T - 1)
            for u in units]


def rows_patching(run: Run) -> List[Row]:
    """Row 5: exhaustive patching of neurons, batched (atp_minimal.verify) against the naive loop of one
    full forward per node; the two must give the same effects."""
    run.log("row 5: exhaustive patching")
    model, clean, noise, metric, s = run.model, run.clean, run.noise, run.metric, run.s
    L = model.config.n_layer
    nodes = patching_nodes(run)
    sites = [atp.site("neuron", l) for l in (0, L - 1)]
    with torch.no_grad():
        _, clean_acts = atp.run_with_cache(model, clean, sites)
        _, noise_acts = atp.run_with_cache(model, noise, sites)  # {site: (B, T, M)}
    moved = sum(bool((noise_acts[atp.site(k, l)][:, p, u] != clean_acts[atp.site(k, l)][:, p, u]).any())
                for k, l, p, u in nodes)
    batched = run.clock.in_F(lambda: atp.verify(model, clean, noise, metric, nodes, len(nodes),
                                                chunk_size=s.chunk_size, progress=False),
                             s.heavy_repeats, keep=True)
    naive_nodes = nodes[::max(1, len(nodes) // s.naive_patch_nodes)][:s.naive_patch_nodes]
    naive = run.clock.in_F(lambda: atp.patch_node_sets_reference(model, clean, noise, metric,
                                                                 [[n] for n in naive_nodes]),
                           s.heavy_repeats, keep=True)  # (N, B): one full forward per node
    # ... after the noise and clean runs it makes once per call, timed alone and taken off
    setup = run.clock.in_F(lambda: atp.patch_node_sets_reference(model, clean, noise, metric, []),
                           s.heavy_repeats)
    per_node_batched = batched.ratio / len(nodes)
    per_node_naive = (naive.ratio - setup.ratio) / len(naive_nodes)
    F_sec = statistics.median(run.clock.F_samples)
    agree = max_rel_diff(batched.out[1][[nodes.index(n) for n in naive_nodes]], naive.out)
    speedup = per_node_naive / per_node_batched
    return [Row("5", f"exhaustive patching, batched (atp_minimal.verify, chunk_size={s.chunk_size}): "
                f"{len(nodes)} neurons, layers 0 and {L - 1}, positions {nodes[0][2]} and {s.T - 1} "
                f"({moved} of {len(nodes)} move)", "-",
                f"{per_node_batched:.3f} F per node = {1 / (per_node_batched * F_sec):.1f} nodes/s "
                f"(call: {batched.text()})", "-"),
            Row("5", "exhaustive patching, naive: one full forward of the B pairs per node "
                f"(atp_minimal.patch_node_sets_reference, its one-off noise and clean runs taken off; "
                f"{len(naive_nodes)} nodes timed)", "-",
                f"{per_node_naive:.3f} F per node = {1 / (per_node_naive * F_sec):.1f} nodes/s; "
                f"effects agree with batched (max rel. diff {agree:.1e})", "-"),
            Row("5", "exhaustive patching speedup, batched over naive (neurons)", ">= 5x",
                f"{speedup:.2f}x", verdict(speedup >= 5))]


def time_key_fix(run: Run) -> List[tuple]:
    """Row 6's timings: atp_minimal.key_fix (closed form, O(T^2)) and key_fix_reference (literal, O(T^3))
    per call at each T in s.keyfix_T, the reference only up to s.keyfix_naive_max_T. Returns, per T,
    (T, closed s, reference s or None, max rel. diff or None)."""
    run.log("row 6: key fix scaling")
    s, cfg = run.s, run.model.config
    g = torch.Generator().manual_seed(s.seed)
    fns, agreement = [], {}  # fns: (T, "closed" or "naive", callable)
    for T in s.keyfix_T:
        args = random_key_fix_inputs(T, cfg.n_head, cfg.d_head, run.model.attention_scale(0), g, s.device)
        fns.append((T, "closed", lambda a=args: atp.key_fix(*a)))  # (1, S, H)
        if T <= s.keyfix_naive_max_T:
            fns.append((T, "naive", lambda a=args: atp.key_fix_reference(*a)))  # (1, S, H)
            agreement[T] = max_rel_diff(fns[-2][2](), fns[-1][2]())
    timed = dict(zip([(T, which) for T, which, _ in fns],
                     run.clock.per_call([f for _, _, f in fns], s.repeats)))
    return [(T, timed[(T, "closed")], timed.get((T, "naive")), agreement.get(T)) for T in s.keyfix_T]


def rows_key_fix(kf: List[tuple]) -> Tuple[List[Row], List[str]]:
    """Row 6 from time_key_fix's timings: the fitted exponents (last 3 T each), the speedup at the largest
    T, and the per-T table; reference times above keyfix_naive_max_T are extrapolated with its exponent."""
    fit = lambda pts: loglog_slope([p[0] for p in pts], [p[1] for p in pts])
    closed_pts = [(T, tc) for T, tc, _, _ in kf][-3:]
    naive_pts = [(T, tn) for T, _, tn, _ in kf if tn is not None][-3:]
    p_closed, p_naive = fit(closed_pts), fit(naive_pts)
    last_T, last_t = naive_pts[-1]
    lines = ["| T | key_fix (closed form) | key_fix_reference O(T^3) | reference / closed | max rel. diff |",
             "|---|---|---|---|---|"]
    for T, tc, tn, agree in kf:
        if tn is None:
            tn = last_t * (T / last_T) ** p_naive
            lines.append(f"| {T} | {1e3 * tc:.3f} ms | ~{1e3 * tn:.1f} ms (extrapolated) | "
                         f"~{tn / tc:.0f}x | - |")
        else:
            lines.append(f"| {T} | {1e3 * tc:.3f} ms | {1e3 * tn:.2f} ms | {tn / tc:.0f}x | {agree:.1e} |")
    T_max, t_closed_max, t_naive_max, _ = kf[-1]
    extrapolated = t_naive_max is None
    t_naive_max = t_naive_max or last_t * (T_max / last_T) ** p_naive
    rows = [Row("6", f"key fix, closed form (atp_minimal.key_fix): exponent p of time ~ T^p (fit on T = "
                f"{', '.join(str(t) for t, _ in closed_pts)})", "<= 2.5 (O(T^2))", f"{p_closed:.2f}",
                verdict(p_closed <= 2.5)),
            Row("6", f"key fix, literal (atp_minimal.key_fix_reference): exponent (fit on T = "
                f"{', '.join(str(t) for t, _ in naive_pts)})", "- (O(T^3))", f"{p_naive:.2f}", "-"),
            Row("6", f"key fix speedup, closed form over literal, at T={T_max}", "-",
                f"{'~' if extrapolated else ''}{t_naive_max / t_closed_max:.0f}x", "-")]
    return rows, lines


def rows_memory(run: Run, mem) -> List[Row]:
    """Row 7 from the peaks: AtP*'s exponent in T at full depth, its growth from a shallower model at equal
    T (linear in L is the target), AtP* over AtP, and that atp_star returns no autograd graph."""
    L, rows = run.model.config.n_layer, []
    ok = [(n_layer, T, m) for n_layer, T, m in mem if not math.isnan(m["atp_star"])]
    full_L = [(T, m["atp_star"]) for n_layer, T, m in ok if n_layer == L]
    if len(full_L) >= 2:
        p_T = loglog_slope([t for t, _ in full_L], [v for _, v in full_L])
        rows.append(Row("7", f"AtP* peak memory vs T (L={L}, T = {', '.join(str(t) for t, _ in full_L)}): "
                        "exponent p of MB ~ T^p", "<= 1.25 (linear in T)",
                        f"{p_T:.2f} ({', '.join(f'{v:.0f}' for _, v in full_L)} MB)", verdict(p_T <= 1.25)))
    by_LT = {(n_layer, T): m["atp_star"] for n_layer, T, m in ok}
    pairs = [(T, n_layer, by_LT[(L, T)] / v) for (n_layer, T), v in by_LT.items()
             if n_layer < L and (L, T) in by_LT]
    if pairs:
        small_L = min(n for _, n, _ in pairs)
        limit = 1.125 * L / small_L  # linear in L gives L / small_L; L x growth (quadratic) its square
        rows.append(Row("7", f"AtP* peak memory, L={L} over L={small_L} at equal T", f"<= {limit:.2f} "
                        f"(linear in L: {L / small_L:.0f}; L x growth: {(L / small_L) ** 2:.0f})",
                        ", ".join(f"{r:.2f} at T={t}" for t, _, r in pairs),
                        verdict(max(r for _, _, r in pairs) <= limit)))
    star_over_atp = [m["atp_star"] / m["atp"] for _, _, m in ok if not math.isnan(m.get("atp", math.nan))]
    if run.s.memory_atp_reference and star_over_atp:
        rows.append(Row("7", "AtP* peak / AtP peak (ideally ~1: GradDrop needs no extra copies per layer)",
                        "-", f"{min(star_over_atp):.2f}-{max(star_over_atp):.2f}", "-"))
    graph = any(m.get("graph", False) for _, _, m in mem)
    rows.append(Row("7", "scores returned by atp_star are plain tensors (no autograd graph attached, which "
                    "would keep the forward's saved tensors alive)", "no graph",
                    "graph attached" if graph else "no graph", verdict(not graph)))
    return rows


def memory_table(run: Run, mem) -> List[str]:
    """Row 7's per-configuration table: peaks in MB above the baseline, and AtP*'s bytes per node."""
    cfg, with_atp = run.model.config, run.s.memory_atp_reference
    npp = lambda n_layer: nodes_per_position(cfg, n_layer)
    mb = lambda v: "OOM" if math.isnan(v) else f"{v:.0f}"
    lines = ["| L | T | nodes per position | forward peak MB | " + ("AtP peak MB | " if with_atp else "") +
             "AtP* peak MB | AtP* bytes / (T x nodes per position) |",
             "|---|---|---|---|" + ("---|" if with_atp else "") + "---|---|"]
    for n_layer, T, m in mem:
        lines.append(f"| {n_layer} | {T} | {npp(n_layer)} | {mb(m['forward'])} | " +
                     (f"{mb(m['atp'])} | " if with_atp else "") +
                     f"{mb(m['atp_star'])} | {mb(m['atp_star'] * 2 ** 20 / (T * npp(n_layer)))} |")
    return lines


def describe_run(run: Run, threads: int, threads_why: str, load_start, digest_start: str) -> List[str]:
    """The section's heading and the paragraph that says what was measured, how, and under what load."""
    s, cfg, device = run.s, run.model.config, torch.device(run.s.device)
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else (platform.processor() or platform.machine()))
    if device.type == "cpu" and os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    out = [f"## {device.type.upper()}: {name}", "",
           f"torch {torch.__version__}, torch threads: {threads} of {usable_cores()} cores ({threads_why}), "
           f"{str(s.dtype).replace('torch.', '')} model; GPT-2-small "
           f"shape with random weights (L={cfg.n_layer}, H={cfg.n_head}, d_model {cfg.n_embd}, "
           f"d_mlp {cfg.d_mlp}, vocab {cfg.vocab_size}); B={s.B} prompt pairs, T={s.T}; noise differs at "
           f"positions {diff_positions(s.T)}; "
           f"metric logit_diff at the last position; after one warm-up, {s.repeats} timed repeats per row "
           f"({s.heavy_repeats} for the reference forms and the patching sweep), median reported. "
           f"Run time {time.perf_counter() - run.t_start:.0f} s."]
    load_end = os.getloadavg() if hasattr(os, "getloadavg") else None
    if load_start is not None:
        cores = usable_cores()
        busy = max(load_start[0], load_end[0]) > cores + 0.5
        out.append(f"Load average (1 min) {load_start[0]:.1f} at the start, {load_end[0]:.1f} at the end, on "
                   f"{cores} cores" + (": the machine was shared, so absolute times are inflated and ratios "
                                       "noisier than usual (see the ranges)." if busy else "."))
    digest_end = source_digest()
    out.append(f"Code measured: sha256 of atp_minimal.py + model.py = {digest_start}" +
               ("." if digest_end == digest_start else
                f" at the start, {digest_end} at the end: the code changed during the run, so rows measured "
                "after the change (and the memory subprocesses) may have run the new version; rerun."))
    return out


def render(run: Run, rows: List[Row], key_fix_lines: List[str], memory_lines: List[str],
           profile_lines: List[str]) -> List[str]:
    """The table of rows, then the notes and tables that rows 5-7 refer to, then the profile."""
    cfg, s = run.model.config, run.s
    out = ["", "| # | measurement | target | measured | status |", "|---|---|---|---|---|"]
    out += [f"| {r.num} | {r.what} | {r.target} | {r.measured} | {r.status} |" for r in rows]
    out += ["", "Row 4: atp_star_reference is GradDrop as the paper defines it, built from "
            "atp_estimates_reference; each of its L passes also reruns the noise forward (L - 1 F more than "
            "a loop that caches it once) and computes the key fix literally (key_fix_reference).",
            "", "Row 5: a node is one (layer, position, neuron), patched with its noise value in all B pairs "
            "at once; one node gives I(n) for every pair. The batched time includes atp_minimal.verify's own "
            "clean and noise caching forwards; the naive loop's noise values are cached beforehand, not "
            "timed (so each node costs one patched forward; patch_nodes and verify_reference also rerun the "
            "noise and clean forwards for every node, 3 F per node). Layers 0 and L-1 are patched equally "
            "often: resuming at them runs L and 1 blocks, on average the same as a sweep over every layer.",
            "", f"### Row 6: key fix timings (B=1, H={cfg.n_head}, Dh={cfg.d_head}, float32; median per call "
            f"over {s.repeats} rounds that sample every T in turn)", ""] + key_fix_lines
    out += ["", f"### Row 7: peak memory above the baseline (model + inputs), B={s.B}", "",
            ("Each configuration runs in a fresh process: peak = VmHWM (reset via /proc/self/clear_refs) "
             "minus VmRSS before the run, with MALLOC_MMAP_THRESHOLD_=65536 so that freed tensors are "
             "unmapped and the RSS follows live tensor memory. A tiny AtP* run first pulls in one-off "
             "library buffers. Same thread count as above."
             if s.device == "cpu" else
             "torch.cuda.max_memory_allocated() minus memory_allocated() before the run (model and inputs)."),
            ""] + memory_lines
    if profile_lines:
        out += ["", "### Where AtP* spends its time", ""] + profile_lines
    return out


def run_table(s: Settings, threads: int, threads_why: str = "--threads") -> List[str]:
    """Measure every row on s.device, in the order below (F is timed around all of rows 1-5); return the
    markdown section."""
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    digest_start = source_digest()
    run = start_run(s)
    rows = [row_forward_backward(run)]
    atp_rows, m_star = rows_atp(run)
    rows += atp_rows + [row_literal_grad_drop(run, m_star)]
    del m_star
    rows += rows_patching(run)
    rows.insert(0, row_unit(run))  # now that all F samples are in
    key_fix_rows, key_fix_lines = rows_key_fix(time_key_fix(run))
    run.log("row 7: peak memory (fresh subprocesses)" if s.device == "cpu" else "row 7: peak memory")
    mem = measure_memory_cpu(s, threads) if s.device == "cpu" else measure_memory_cuda(s)
    rows += key_fix_rows + rows_memory(run, mem)
    profile_lines = []
    if s.profile:
        run.log("profile of AtP*")
        profile_lines = profile_atp_star(run.model, run.clean, run.noise, run.metric)
    run.log("done")
    return (describe_run(run, threads, threads_why, load_start, digest_start) +
            render(run, rows, key_fix_lines, memory_table(run, mem), profile_lines))



def write_report(lines, path):
    """Print the report's lines and write them to path (its folder made if needed)."""
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    print(f"wrote {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="about a minute on 2 idle CPU cores")
    parser.add_argument("--out", default=None, help="CPU table (markdown); default "
                        "experiments/results/bench_cpu.md, or out/bench_cpu.md with --quick (a quick run "
                        "never overwrites the shipped table)")
    parser.add_argument("--gpu-out", default=None,
                        help="GPU table (markdown), written when CUDA is available; default "
                        "experiments/results/bench_gpu.md, or out/bench_gpu.md with --quick")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: the CPU table, and the GPU table too when CUDA is available")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: the cores this process may use, less those the 1-minute "
                             "load average says are busy, at least 1)")
    parser.add_argument("--gpu-batch", type=int, default=32, help="B on the GPU")
    parser.add_argument("--gpu-seq", type=int, default=128, help="T on the GPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-child", nargs=6, metavar=("L", "T", "B", "SEED", "THREADS", "ATP"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    folder = os.path.join(ROOT, "out") if args.quick else os.path.join(HERE, "results")
    args.out = args.out or os.path.join(folder, "bench_cpu.md")
    args.gpu_out = args.gpu_out or os.path.join(folder, "bench_gpu.md")
    if args.memory_child:
        L, T, B, seed, threads, with_atp = (int(x) for x in args.memory_child)
        memory_child(L, T, B, seed, threads, bool(with_atp))
        return
    threads = args.threads or auto_threads()
    threads_why = ("fixed by --threads, not left to the load average, which on a shared machine moves from "
                   "run to run" if args.threads else "the cores the 1-minute load average left free")
    torch.set_num_threads(threads)

    jobs = []
    if args.device in ("auto", "cpu"):
        jobs.append((cpu_settings(args.quick, args.seed), args.out))
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here")
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        jobs.append((gpu_settings(args.quick, args.seed, args.gpu_batch, args.gpu_seq), args.gpu_out))
    for settings, path in jobs:
        print(f"== {settings.device}: B={settings.B}, T={settings.T}, {settings.dtype}", flush=True)
        lines = ["# AtP* benchmark: cost in forward passes", "",
                 f"`python experiments/bench.py{' --quick' if args.quick else ''}"
                 f"{f' --threads {args.threads}' if args.threads else ''}`. F = one forward pass (no grad) "
                 "of the B clean prompts, timed around every repeat of every row; each ratio is a method's "
                 "time over the mean of the two F timings around it.", ""]
        lines += run_table(settings, threads, threads_why)
        write_report(lines, path)


# --------------------------------------------------------------------------------------------------
# --- exact patching on a TransformerLens model: tl_adapter's resumed sweep vs TransformerLens's helpers


def bench_tl_adapter(T=16, sample=24, seed=0, threads=1,
                     out=os.path.join(HERE, "results", "bench_tl_adapter.md")):
    """Seconds per patched node, same process: atp_minimal.activation_patching on tl_adapter.adapt(model)
    (batched nodes, resumed at the patched layer and position through TransformerLens's start_at_layer
    and key-value cache, last-position logits only) against transformer_lens.patching's
    get_act_patch_attn_head_{q,k,v,out}_by_pos (one full run_with_hooks forward per node), on a random
    GPT-2-small-shaped HookedTransformer (float32, CPU), one prompt pair of T random tokens whose noise
    prompt differs at position 0 (so every node moves and neither side can skip one). Ours sweeps every
    node of a kind; TransformerLens's helpers a random sample of `sample` nodes per kind (index_df), whose
    effects are also compared with ours. Writes a markdown table to `out`."""
    import pandas as pd
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens import patching as tl_patching
    import tl_adapter
    torch.set_num_threads(threads)
    cfg = HookedTransformerConfig(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, n_ctx=1024,
                                  d_vocab=50257, act_fn="gelu_new", normalization_type="LN", seed=seed)
    model = HookedTransformer(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, cfg.d_vocab, (1, T), generator=g)
    noise = clean.clone()
    noise[0, 0] = (clean[0, 0] + 1) % cfg.d_vocab
    noise[0, T // 2] = (clean[0, T // 2] + 1) % cfg.d_vocab
    metric = atp.logit_diff(11, 22)  # logit of token 11 minus token 22 at the last position
    adapted = tl_adapter.adapt(model)
    tl_patching.tqdm = lambda items, **kwargs: items  # no progress bars in the timings
    helpers = {"q": tl_patching.get_act_patch_attn_head_q_by_pos,
               "k": tl_patching.get_act_patch_attn_head_k_by_pos,
               "v": tl_patching.get_act_patch_attn_head_v_by_pos,
               "z": tl_patching.get_act_patch_attn_head_out_by_pos}
    with torch.no_grad():
        base = metric(model(clean)).item()
        _, noise_cache = model.run_with_cache(noise)
    rows, total_ours, total_theirs = [], 0.0, 0.0
    for kind, helper in helpers.items():
        start = time.perf_counter()
        ours = atp.activation_patching(adapted, clean, noise, metric, kinds=(kind,),
                                       progress=False)[kind][0]  # (L, T, H)
        ours_s = (time.perf_counter() - start) / ours.numel()
        index = torch.randperm(ours.numel(), generator=g)[:sample]
        l, t, h = (index // (T * cfg.n_heads)), (index // cfg.n_heads) % T, index % cfg.n_heads
        index_df = pd.DataFrame({"layer": l.tolist(), "pos": t.tolist(), "head": h.tolist()})
        start = time.perf_counter()
        theirs = helper(model, clean, noise_cache, lambda logits: metric(logits).sum(),
                        index_axis_names=None, index_df=index_df) - base
        theirs_s = (time.perf_counter() - start) / sample
        diff = (ours[l, t, h] - theirs).abs().max().item()
        rows.append(f"| {kind} | {ours.numel()} | {1000 * ours_s:.2f} | {sample} | {1000 * theirs_s:.2f} | "
                    f"{theirs_s / ours_s:.1f}x | {diff:.1e} |")
        total_ours, total_theirs = total_ours + ours_s, total_theirs + theirs_s
        print(rows[-1], flush=True)
    lines = ["# Exact patching on a TransformerLens model: tl_adapter vs transformer_lens.patching", "",
             f"`python experiments/bench.py --tl-adapter`: random GPT-2-small-shaped HookedTransformer "
             f"(12 layers, 12 heads, d_model 768, vocab 50257), float32, CPU, {threads} thread(s), "
             f"transformer-lens {tl_adapter.version('transformer-lens')}, torch {torch.__version__}. "
             f"One prompt pair, T = {T}, noise differs at positions 0 and {T // 2}; metric: logit difference "
             f"at the last position. Ours: every node of the kind; TransformerLens: {sample} random nodes of "
             f"it. Max diff: our effect minus theirs on those nodes (float32).", "",
             "| kind | nodes (ours) | ms/node (ours) | nodes (TL) | ms/node (TL) | speed-up | max diff |",
             "|---|---|---|---|---|---|---|"] + rows + ["",
             f"Mean over the four kinds: {total_theirs / total_ours:.1f}x fewer seconds per node than "
             f"TransformerLens's helpers."]
    write_report(lines, out)


if __name__ == "__main__":
    if "--tl-adapter" in sys.argv[1:]:  # python experiments/bench.py --tl-adapter [--tl-seq T] [--threads N]
        extra = argparse.ArgumentParser(description="exact patching: tl_adapter vs transformer_lens.patching")
        extra.add_argument("--tl-adapter", action="store_true")
        extra.add_argument("--tl-seq", type=int, default=16, help="prompt length T")
        extra.add_argument("--threads", type=int, default=1)
        extra_args = extra.parse_args()
        bench_tl_adapter(T=extra_args.tl_seq, threads=extra_args.threads)
    else:
        main()
