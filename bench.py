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

    python bench.py                 # a few minutes on 2 CPU cores; writes results/bench_cpu.md
    python bench.py --quick         # about a minute: fewer nodes and repeats, some values extrapolated;
                                    # writes out/bench_cpu.md (never the shipped results/)
    python bench.py --out FILE.md   # write the CPU table elsewhere (the GPU one goes to --gpu-out)

Threads: by default as many torch threads as there are cores not already busy (cores minus the 1-minute
load average, at least 1). More threads than free cores makes each parallel op wait at its barrier for
a descheduled thread, which slows many-small-op code erratically; --threads N overrides.

Rows:
  1. F itself, and forward + backward (activation gradients only, as AtP needs) for reference
  2. AtP over all node kinds (q, k, v, z, neuron)                        target <= 4.5 F
  3. AtP + QK fix                                                         target <= 5.5 F
  4. AtP* (= AtP + QK fix + GradDrop)                                     target <= 16 F
     and a naive GradDrop written here: L clean forward+backward passes, pass l with
     blocks.{l}.hook_attn_out and blocks.{l}.hook_mlp_out detached; also checked against atp_star
  5. exhaustive activation patching of MLP neurons: atp_minimal.verify (patch_node_sets with one-node
     masks, batched, resumed at the patched layer) against a naive loop of one full forward per node.
     A "node" is one (layer, position, neuron) patched in all B prompt pairs at once, i.e. one value
     of I(n) for every pair.                                               target >= 5x the naive loop
  6. key fix scaling: atp_minimal.key_fix (closed form) against a naive O(T^3) loop written here
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

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
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
    graddrop_passes: Optional[int]  # row 4: None = all L passes of the naive GradDrop; k = time k, extrapolate
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
        memory_configs=((12, 16), (12, 32), (6, 16)) if quick else ((12, 16), (12, 32), (12, 64), (6, 16), (6, 64)),
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


def nodes_per_position(cfg: gpt.GPTConfig) -> int:
    """Nodes of atp_minimal at one position: q, k, v, z per head and every MLP neuron, in every layer."""
    return cfg.n_layer * (4 * cfg.n_head + cfg.d_mlp)


# --------------------------------------------------------------------------------------------------
# --- timing


@dataclass
class Measure:
    ratio: float  # median over repeats of time / F
    seconds: float  # median over repeats
    ratios: List[float] = field(default_factory=list)

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

    def in_F(self, fn, repeats: int) -> Measure:
        """F, (fn, F) x repeats: each repeat's ratio is t(fn) / mean of the two F timings around it."""
        ratios, seconds = [], []
        before = self.F()
        for _ in range(repeats):
            t, out = self.time(fn)
            del out
            after = self.F()
            ratios.append(t / ((before + after) / 2))
            seconds.append(t)
            before = after
        return Measure(statistics.median(ratios), statistics.median(seconds), ratios)

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
# --- references written here (naive, obviously correct, slow)


def no_grad_forward(model, clean):
    with torch.no_grad():
        return model(clean)


def forward_backward(model, clean, metric):
    """One clean forward with grad, then the gradient of sum(metric) at the embeddings: activation
    gradients through the whole model, no weight gradients (AtP needs only the former)."""
    cache = {}

    def leaf(t):
        cache["embed"] = t.detach().requires_grad_()
        return cache["embed"]
    with torch.enable_grad():
        values = metric(model(clean, hooks={"hook_embed": leaf}))
        return torch.autograd.grad(values.sum(), [cache["embed"]])[0]


def naive_grad_drop(model, clean, noise, metric, passes=None):
    """GradDrop (paper §4.2) by brute force: for each dropped layer l, a full clean forward+backward with
    blocks.{l}.hook_attn_out and blocks.{l}.hook_mlp_out detached (lambda t: t.detach()), AtP with the
    QK fix on that pass's gradients, |.| summed over the passes, / (L-1). kind -> (B, L, T, U), like
    atp_star. `passes` (a list of layers) runs only those passes, for timing."""
    cfg = model.config
    L = cfg.n_layer
    f32 = torch.promote_types(next(model.parameters()).dtype, torch.float32)
    node = {(k, l): f"blocks.{l}.{atp.SITES[k]}" for k in atp.KINDS for l in range(L)}
    attn = lambda l, s: f"blocks.{l}.attn.{s}"
    qk_cached = [attn(l, s) for l in range(L) for s in ("hook_q", "hook_k", "hook_attn_scores")]
    patterns = [attn(l, "hook_pattern") for l in range(L)]

    def caching(names, cache):
        return {n: (lambda t, n=n: cache.__setitem__(n, t)) for n in names}

    noise_cache = {}
    with torch.no_grad():
        model(noise, hooks=caching(list(node.values()) + qk_cached, noise_cache))
    units = lambda t: (t if t.dim() == 4 else t.unsqueeze(-1)).detach().to(f32)  # (B, T, U, E)
    total = None
    for dropped in (range(L) if passes is None else passes):
        cache = {}
        hooks = caching(list(node.values()) + qk_cached + patterns, cache)
        hooks[f"blocks.{dropped}.hook_attn_out"] = lambda t: t.detach()
        hooks[f"blocks.{dropped}.hook_mlp_out"] = lambda t: t.detach()
        with torch.enable_grad():
            values = metric(model(clean, hooks=hooks))
            wrt = list(node.values()) + patterns
            grads = dict(zip(wrt, torch.autograd.grad(values.sum(), [cache[n] for n in wrt], allow_unused=True)))
        if total is None:
            total = {k: torch.zeros((clean.shape[0], L) + tuple(units(cache[node[(k, 0)]]).shape[1:3]),
                                    dtype=f32, device=clean.device) for k in atp.KINDS}
        for (k, l), name in node.items():  # estimates need no autograd graph: computed from detached tensors
            if k in ("q", "k"):  # QK fix: exact softmax, linear after it
                G = grads[attn(l, "hook_pattern")]
                if G is None:
                    continue
                get = lambda c, s: c[attn(l, s)].detach().to(f32)
                scale = model.transformer.h[l].attn.scale
                if k == "q":
                    est = atp.query_fix(get(cache, "hook_q"), get(noise_cache, "hook_q"), get(cache, "hook_k"),
                                        get(cache, "hook_attn_scores"), G.to(f32), scale)
                else:
                    est = atp.key_fix(get(cache, "hook_q"), get(cache, "hook_k"), get(noise_cache, "hook_k"),
                                      get(cache, "hook_attn_scores"), G.to(f32), scale)
            else:
                if grads[name] is None:  # inside the dropped block: no gradient reaches it
                    continue
                est = ((units(noise_cache[name]) - units(cache[name])) * units(grads[name])).sum(-1)
            total[k][:, l] += est.abs()
    return {k: v / (L - 1) for k, v in total.items()}


def naive_patching(model, clean, metric, base, noise_post, nodes):
    """Exhaustive patching the obvious way: one full forward of the B clean prompts per node, a hook
    writing the noise value of neuron `unit` at `pos` into blocks.{l}.mlp.hook_post. (B,) per node."""
    effects = []
    with torch.no_grad():
        for _, l, pos, unit in nodes:
            def patch(t, l=l, pos=pos, unit=unit):
                t = t.clone()
                t[:, pos, unit] = noise_post[l][:, pos, unit]
                return t
            effects.append(metric(model(clean, hooks={f"blocks.{l}.mlp.hook_post": patch})) - base)
    return torch.stack(effects)  # (N, B)


def key_fix_naive(q_clean, k_clean, k_noise, scores, G, scale):
    """The key fix by definition, O(T^3) per head: for every key s, recompute each query row t's softmax
    with only logit s moved to q_t(clean) . k_s(noise) * scale, and sum (a_new - a) * G over the row and
    over t. q, k: (B, T, H, Dh); scores, G: (B, H, T, S). Returns (B, S, H), like atp_minimal.key_fix."""
    a = torch.softmax(scores, dim=-1)  # (B, H, T, S)
    moved = (q_clean.transpose(1, 2) @ k_noise.permute(0, 2, 3, 1)) * scale  # (B, H, T, S)
    masked = torch.isinf(scores)
    out = torch.zeros(scores.shape[0], scores.shape[-1], scores.shape[1], dtype=scores.dtype, device=scores.device)
    for s in range(scores.shape[-1]):
        patched = scores.clone()
        patched[..., s] = torch.where(masked[..., s], scores[..., s], moved[..., s])
        out[:, s] = ((torch.softmax(patched, dim=-1) - a) * G).sum((-1, -2))  # (B, H)
    return out


def loglog_slope(xs, ys) -> float:
    """Least-squares slope of log y against log x: the exponent of y ~ x^p."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
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
        runs.append(("atp", lambda: atp.attribution_patching(model, clean, noise, metric)))
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
            print(f"memory run L={n_layer} T={T} failed (exit {done.returncode}):\n{done.stderr[-2000:]}", flush=True)
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
            runs.append(("atp", lambda: atp.attribution_patching(model, clean, noise, metric)))
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
# --- the table


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
        with open(os.path.join(HERE, name), "rb") as f:
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


def run_table(s: Settings, threads: int, threads_why: str = "--threads") -> List[str]:
    """Measure every row on s.device; return the markdown section."""
    device = torch.device(s.device)
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    digest_start = source_digest()
    t_start = time.perf_counter()
    model = make_model(12, s.dtype, device, s.seed)
    cfg = model.config
    L, B, T = cfg.n_layer, s.B, s.T
    clean, noise, metric = make_inputs(cfg, B, T, s.seed, device)

    forward = lambda: no_grad_forward(model, clean)
    clock = Clock(device, forward)
    rows: List[Row] = []
    log = lambda msg: print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    # warm up once: every code path the rows time (forward, backward, AtP*, batched and naive patching)
    log("warm-up")
    forward()
    forward_backward(model, clean, metric)
    atp.atp_star(model, clean, noise, metric)
    atp.verify(model, clean, noise, metric, [("neuron", 0, T - 1, 0)], 1, progress=False)

    # 1. F and forward+backward
    log("row 1: forward, forward+backward")
    fb = clock.in_F(lambda: forward_backward(model, clean, metric), s.repeats)
    rows.append(Row("1", "forward + backward (activation gradients only, no weight gradients)", "-",
                    fb.text(), "-"))

    # 2-4. AtP, AtP + QK fix, AtP*
    results = {}

    def keep(name, fn):  # time fn, and keep its result (detached) for the agreement checks
        def run():
            out = fn()
            results[name] = {k: v.detach() for k, v in out.items()} if isinstance(out, dict) else out
        return run
    log("row 2: AtP")
    m_atp = clock.in_F(lambda: atp.attribution_patching(model, clean, noise, metric), s.repeats)
    rows.append(Row("2", "AtP, all kinds (q, k, v, z, neuron), per pair", "<= 4.5 F", m_atp.text(),
                    verdict(m_atp.ratio <= 4.5)))
    log("row 3: AtP + QK fix")
    m_qk = clock.in_F(lambda: atp.attribution_patching(model, clean, noise, metric, qk_fix=True), s.repeats)
    rows.append(Row("3", "AtP + QK fix", "<= 5.5 F", m_qk.text(), verdict(m_qk.ratio <= 5.5)))
    log("row 4: AtP*")
    m_star = clock.in_F(keep("star", lambda: atp.atp_star(model, clean, noise, metric)), s.repeats)
    rows.append(Row("4", "AtP* (AtP + QK fix + GradDrop)", "<= 16 F", m_star.text(),
                    verdict(m_star.ratio <= 16)))
    rows.append(Row("4", "AtP* cost split: QK fix adds (row 3 - row 2), GradDrop adds (row 4 - row 3)", "-",
                    f"QK fix +{m_qk.ratio - m_atp.ratio:.2f} F, GradDrop +{m_star.ratio - m_qk.ratio:.2f} F", "-"))

    log("row 4: naive GradDrop")
    k = s.graddrop_passes
    if k is None:
        m_naive = clock.in_F(keep("naive_gd", lambda: naive_grad_drop(model, clean, noise, metric)), s.heavy_repeats)
        diff = max(max_rel_diff(results["naive_gd"][kind], results["star"][kind]) for kind in atp.KINDS)
        naive_ratio = m_naive.ratio
        note = (f"{m_naive.text()}; = {naive_ratio / m_star.ratio:.1f}x AtP*; same scores as atp_star "
                f"(max rel. diff {diff:.1e})")
    else:  # time k of the L passes; each pass is one full forward+backward, so the rest scale linearly
        passes = [round(i * (L - 1) / max(k - 1, 1)) for i in range(k)]
        m_naive = clock.in_F(lambda: naive_grad_drop(model, clean, noise, metric, passes=passes), s.heavy_repeats)
        naive_ratio = 1 + (m_naive.ratio - 1) * L / k  # 1 F: the noise forward, done once
        note = (f"~{naive_ratio:.1f} F (extrapolated from {k} of {L} passes: {m_naive.text()}); "
                f"= {naive_ratio / m_star.ratio:.1f}x AtP*")
    rows.append(Row("4", f"naive GradDrop reference: {L} forward+backward passes with detached "
                    "hook_attn_out/hook_mlp_out", "-", note, "-"))
    results.clear()

    # 5. exhaustive patching of neurons
    log("row 5: exhaustive patching")
    first = diff_positions(T)[0]
    n_per_position = s.patch_nodes_per_layer // 2
    units = [round(i * (cfg.d_mlp - 1) / max(n_per_position - 1, 1)) for i in range(n_per_position)]
    # layers 0 and L-1: resuming there runs L and 1 blocks, whose mean (L+1)/2 is the mean over all layers,
    # so the per-node cost is that of a sweep over every layer. Ordered by layer so no chunk mixes them.
    nodes = [("neuron", l, pos, u) for l in (0, L - 1) for pos in (first, T - 1) for u in units]
    post = lambda l: f"blocks.{l}.mlp.hook_post"
    caches = {"clean": {}, "noise": {}}
    with torch.no_grad():
        for name, idx in (("clean", clean), ("noise", noise)):
            model(idx, hooks={post(l): (lambda t, l=l, c=caches[name]: c.__setitem__(l, t)) for l in (0, L - 1)})
        base = metric(model(clean))
    moved = sum(bool((caches["noise"][l][:, p, u] != caches["clean"][l][:, p, u]).any()) for _, l, p, u in nodes)
    batched = clock.in_F(keep("batched", lambda: atp.verify(model, clean, noise, metric, nodes, len(nodes),
                                                             chunk_size=s.chunk_size, progress=False)),
                         s.heavy_repeats)
    step = max(1, len(nodes) // s.naive_patch_nodes)
    naive_nodes = nodes[::step][:s.naive_patch_nodes]
    naive = clock.in_F(keep("naive", lambda: naive_patching(model, clean, metric, base, caches["noise"],
                                                            naive_nodes)), s.heavy_repeats)
    per_node_batched = batched.ratio / len(nodes)
    per_node_naive = naive.ratio / len(naive_nodes)
    F_sec = statistics.median(clock.F_samples)
    _, effects = results["batched"]
    agree = max_rel_diff(effects[[nodes.index(n) for n in naive_nodes]], results["naive"])
    speedup = per_node_naive / per_node_batched
    rows.append(Row("5", f"exhaustive patching, batched (atp_minimal.verify, chunk_size={s.chunk_size}): "
                    f"{len(nodes)} neurons, layers 0 and {L - 1}, positions {first} and {T - 1} "
                    f"({moved} of {len(nodes)} move)", "-",
                    f"{per_node_batched:.3f} F per node = {1 / (per_node_batched * F_sec):.1f} nodes/s "
                    f"(call: {batched.text()})", "-"))
    rows.append(Row("5", f"exhaustive patching, naive: one full forward of the B pairs per node "
                    f"({len(naive_nodes)} nodes timed)", "-",
                    f"{per_node_naive:.3f} F per node = {1 / (per_node_naive * F_sec):.1f} nodes/s; "
                    f"effects agree with batched (max rel. diff {agree:.1e})", "-"))
    rows.append(Row("5", "exhaustive patching speedup, batched over naive (neurons)", ">= 5x",
                    f"{speedup:.2f}x", verdict(speedup >= 5)))
    results.clear()

    # 1. the unit, now that all F samples are in
    Fs = clock.F_samples
    rows.insert(0, Row("1", f"forward pass F: B={B} clean prompts, T={T}, no grad (the unit)", "unit",
                       f"1 F = {1e3 * statistics.median(Fs):.1f} ms (median of {len(Fs)} timings; "
                       f"range {1e3 * min(Fs):.1f}-{1e3 * max(Fs):.1f} ms)", "-"))

    # 6. key fix scaling
    log("row 6: key fix scaling")
    g = torch.Generator().manual_seed(s.seed)
    H, Dh = cfg.n_head, cfg.d_head
    fns, agreement = [], {}  # fns: (T, "closed" or "naive", callable)
    for Tk in s.keyfix_T:
        rnd = lambda *shape: torch.randn(*shape, generator=g).to(device)
        q, k_c = rnd(1, Tk, H, Dh), rnd(1, Tk, H, Dh)
        k_n = k_c + 0.5 * rnd(1, Tk, H, Dh)
        scale = Dh ** -0.5
        causal = torch.ones(Tk, Tk, dtype=torch.bool, device=device).tril()
        scores = ((q.transpose(1, 2) @ k_c.permute(0, 2, 3, 1)) * scale).masked_fill(~causal, float("-inf"))
        G = rnd(1, H, Tk, Tk)
        args_ = (q, k_c, k_n, scores, G, scale)
        fns.append((Tk, "closed", lambda a=args_: atp.key_fix(*a)))
        if Tk <= s.keyfix_naive_max_T:
            fns.append((Tk, "naive", lambda a=args_: key_fix_naive(*a)))
            agreement[Tk] = max_rel_diff(fns[-2][2](), fns[-1][2]())
    timed = dict(zip([(Tk, which) for Tk, which, _ in fns], clock.per_call([f for _, _, f in fns], s.repeats)))
    kf = [(Tk, timed[(Tk, "closed")], timed.get((Tk, "naive")), agreement.get(Tk)) for Tk in s.keyfix_T]
    fit = lambda pts: loglog_slope([p[0] for p in pts], [p[1] for p in pts])
    closed_pts = [(Tk, tc) for Tk, tc, _, _ in kf][-3:]
    naive_pts = [(Tk, tn) for Tk, _, tn, _ in kf if tn is not None][-3:]
    p_closed, p_naive = fit(closed_pts), fit(naive_pts)
    last_naive_T, last_naive_t = naive_pts[-1]
    kf_lines = ["| T | key_fix (closed form) | naive O(T^3) | naive / closed | max rel. diff |",
                "|---|---|---|---|---|"]
    for Tk, tc, tn, agree_kf in kf:
        if tn is None:
            tn = last_naive_t * (Tk / last_naive_T) ** p_naive
            kf_lines.append(f"| {Tk} | {1e3 * tc:.3f} ms | ~{1e3 * tn:.1f} ms (extrapolated) | ~{tn / tc:.0f}x | - |")
        else:
            kf_lines.append(f"| {Tk} | {1e3 * tc:.3f} ms | {1e3 * tn:.2f} ms | {tn / tc:.0f}x | {agree_kf:.1e} |")
    Tmax = kf[-1][0]
    t_naive_max = kf[-1][2] or last_naive_t * (Tmax / last_naive_T) ** p_naive
    rows.append(Row("6", f"key fix, closed form: exponent p of time ~ T^p (fit on T = "
                    f"{', '.join(str(t) for t, _ in closed_pts)})", "<= 2.5 (O(T^2))", f"{p_closed:.2f}",
                    verdict(p_closed <= 2.5)))
    rows.append(Row("6", f"key fix, naive: exponent (fit on T = {', '.join(str(t) for t, _ in naive_pts)})",
                    "- (O(T^3))", f"{p_naive:.2f}", "-"))
    rows.append(Row("6", f"key fix speedup, closed form over naive, at T={Tmax}", "-",
                    f"{'~' if kf[-1][2] is None else ''}{t_naive_max / kf[-1][1]:.0f}x", "-"))

    # 7. memory
    log("row 7: peak memory (fresh subprocesses)" if s.device == "cpu" else "row 7: peak memory")
    mem = measure_memory_cpu(s, threads) if s.device == "cpu" else measure_memory_cuda(s)
    npp = lambda n_layer: n_layer * (4 * cfg.n_head + cfg.d_mlp)  # nodes per position
    mb = lambda v: "OOM" if math.isnan(v) else f"{v:.0f}"
    mem_lines = ["| L | T | nodes per position | forward peak MB | " +
                 ("AtP peak MB | " if s.memory_atp_reference else "") +
                 "AtP* peak MB | AtP* bytes / (T x nodes per position) |",
                 "|---|---|---|---|" + ("---|" if s.memory_atp_reference else "") + "---|---|"]
    for n_layer, Tm, m in mem:
        mem_lines.append(f"| {n_layer} | {Tm} | {npp(n_layer)} | {mb(m['forward'])} | " +
                         (f"{mb(m['atp'])} | " if s.memory_atp_reference else "") +
                         f"{mb(m['atp_star'])} | {mb(m['atp_star'] * 2 ** 20 / (Tm * npp(n_layer)))} |")
    ok = [(n_layer, Tm, m) for n_layer, Tm, m in mem if not math.isnan(m["atp_star"])]
    full_L = [(Tm, m["atp_star"]) for n_layer, Tm, m in ok if n_layer == L]
    if len(full_L) >= 2:
        p_T = loglog_slope([t for t, _ in full_L], [v for _, v in full_L])
        rows.append(Row("7", f"AtP* peak memory vs T (L={L}, T = {', '.join(str(t) for t, _ in full_L)}): "
                        "exponent p of MB ~ T^p", "<= 1.25 (linear in T)",
                        f"{p_T:.2f} ({', '.join(f'{v:.0f}' for _, v in full_L)} MB)", verdict(p_T <= 1.25)))
    by_LT = {(n_layer, Tm): m["atp_star"] for n_layer, Tm, m in ok}
    pairs = [(Tm, n_layer, by_LT[(L, Tm)] / v) for (n_layer, Tm), v in by_LT.items()
             if n_layer < L and (L, Tm) in by_LT]
    if pairs:
        small_L = min(n for _, n, _ in pairs)
        limit = 1.125 * L / small_L  # linear in L gives L / small_L; L x growth (quadratic) its square
        worst = max(r for _, _, r in pairs)
        rows.append(Row("7", f"AtP* peak memory, L={L} over L={small_L} at equal T", f"<= {limit:.2f} "
                        f"(linear in L: {L / small_L:.0f}; L x growth: {(L / small_L) ** 2:.0f})",
                        ", ".join(f"{r:.2f} at T={t}" for t, _, r in pairs), verdict(worst <= limit)))
    if s.memory_atp_reference:
        star_over_atp = [m["atp_star"] / m["atp"] for _, _, m in ok if not math.isnan(m["atp"])]
        if star_over_atp:
            rows.append(Row("7", "AtP* peak / AtP peak (ideally ~1: GradDrop needs no extra copies per layer)", "-",
                            f"{min(star_over_atp):.2f}-{max(star_over_atp):.2f}", "-"))
    graph = any(m.get("graph", False) for _, _, m in mem)
    rows.append(Row("7", "scores returned by atp_star are plain tensors (no autograd graph attached, which would keep "
                    "the forward's saved tensors alive)", "no graph", "graph attached" if graph else "no graph",
                    verdict(not graph)))

    profile_lines = []
    if s.profile:
        log("profile of AtP*")
        profile_lines = profile_atp_star(model, clean, noise, metric)
    load_end = os.getloadavg() if hasattr(os, "getloadavg") else None
    log("done")

    # --- markdown
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else (platform.processor() or platform.machine()))
    cpu_model = ""
    if device.type == "cpu" and os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu_model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    out = [f"## {device.type.upper()}: {cpu_model or name}", "",
           f"torch {torch.__version__}, torch threads: {threads} of {usable_cores()} cores ({threads_why}), "
           f"{str(s.dtype).replace('torch.', '')} model; GPT-2-small "
           f"shape with random weights (L={L}, H={cfg.n_head}, d_model {cfg.n_embd}, d_mlp {cfg.d_mlp}, vocab "
           f"{cfg.vocab_size}); B={B} prompt pairs, T={T}; noise differs at positions {diff_positions(T)}; "
           f"metric logit_diff at the last position; after one warm-up, {s.repeats} timed repeats per row "
           f"({s.heavy_repeats} for the naive references and the patching sweep), median reported. "
           f"Run time {time.perf_counter() - t_start:.0f} s."]
    if load_start is not None:
        cores = usable_cores()
        busy = max(load_start[0], load_end[0]) > cores + 0.5
        out.append(f"Load average (1 min) {load_start[0]:.1f} at the start, {load_end[0]:.1f} at the end, on "
                   f"{cores} cores" + (": the machine was shared, so absolute times are inflated and ratios noisier "
                                       "than usual (see the ranges)." if busy else "."))
    digest_end = source_digest()
    out.append(f"Code measured: sha256 of atp_minimal.py + model.py = {digest_start}" +
               ("." if digest_end == digest_start else
                f" at the start, {digest_end} at the end: the code changed during the run, so rows measured "
                "after the change (and the memory subprocesses) may have run the new version; rerun."))
    out += ["", "| # | measurement | target | measured | status |", "|---|---|---|---|---|"]
    out += [f"| {r.num} | {r.what} | {r.target} | {r.measured} | {r.status} |" for r in rows]
    out += ["", "Row 5: a node is one (layer, position, neuron), patched with its noise value in all B pairs at "
            "once; one node gives I(n) for every pair. The batched time includes atp_minimal.verify's own clean "
            "and noise caching forwards; the naive loop's noise values are cached beforehand, not timed. "
            "Layers 0 and L-1 are patched equally often: resuming at them runs L and 1 blocks, on average the "
            "same as a sweep over every layer.",
            "", f"### Row 6: key fix timings (B=1, H={H}, Dh={Dh}, float32; median per call over {s.repeats} rounds "
            "that sample every T in turn)", ""] + kf_lines
    out += ["", f"### Row 7: peak memory above the baseline (model + inputs), B={B}", "",
            ("Each configuration runs in a fresh process: peak = VmHWM (reset via /proc/self/clear_refs) minus "
             "VmRSS before the run, with MALLOC_MMAP_THRESHOLD_=65536 so that freed tensors are unmapped and "
             "the RSS follows live tensor memory. A tiny AtP* run first pulls in one-off library buffers. "
             "Same thread count as above."
             if device.type == "cpu" else
             "torch.cuda.max_memory_allocated() minus memory_allocated() before the run (model and inputs)."),
            ""] + mem_lines
    if profile_lines:
        out += ["", "### Where AtP* spends its time", ""] + profile_lines
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="about a minute on 2 idle CPU cores")
    parser.add_argument("--out", default=None, help="CPU table (markdown); default results/bench_cpu.md, "
                        "or out/bench_cpu.md with --quick (a quick run never overwrites the shipped table)")
    parser.add_argument("--gpu-out", default=None,
                        help="GPU table (markdown), written when CUDA is available; default results/bench_gpu.md, "
                        "or out/bench_gpu.md with --quick")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: the CPU table, and the GPU table too when CUDA is available")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: the cores this process may use, less those the 1-minute load "
                             "average says are busy, at least 1)")
    parser.add_argument("--gpu-batch", type=int, default=32, help="B on the GPU")
    parser.add_argument("--gpu-seq", type=int, default=128, help="T on the GPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-child", nargs=6, metavar=("L", "T", "B", "SEED", "THREADS", "ATP"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    folder = os.path.join(HERE, "out" if args.quick else "results")
    args.out = args.out or os.path.join(folder, "bench_cpu.md")
    args.gpu_out = args.gpu_out or os.path.join(folder, "bench_gpu.md")
    if args.memory_child:
        L, T, B, seed, threads, with_atp = (int(x) for x in args.memory_child)
        memory_child(L, T, B, seed, threads, bool(with_atp))
        return
    threads = args.threads or auto_threads()
    threads_why = "--threads" if args.threads else "the cores the 1-minute load average left free"
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
                 f"`python bench.py{' --quick' if args.quick else ''}`. F = one forward pass (no grad) of the "
                 "B clean prompts, timed around every repeat of every row; each ratio is a method's time over "
                 "the mean of the two F timings around it.", ""] + run_table(settings, threads, threads_why)
        text = "\n".join(lines) + "\n"
        print("\n" + text)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
        print(f"wrote {path}")


# --------------------------------------------------------------------------------------------------
# --- exact patching on a TransformerLens model: tl_adapter's resumed sweep vs TransformerLens's helpers


def bench_tl_adapter(T=16, sample=24, seed=0, threads=1, out=os.path.join(HERE, "results", "bench_tl_adapter.md")):
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
    helpers = {"q": tl_patching.get_act_patch_attn_head_q_by_pos, "k": tl_patching.get_act_patch_attn_head_k_by_pos,
               "v": tl_patching.get_act_patch_attn_head_v_by_pos, "z": tl_patching.get_act_patch_attn_head_out_by_pos}
    with torch.no_grad():
        base = metric(model(clean)).item()
        _, noise_cache = model.run_with_cache(noise)
    rows, total_ours, total_theirs = [], 0.0, 0.0
    for kind, helper in helpers.items():
        start = time.perf_counter()
        ours = atp.activation_patching(adapted, clean, noise, metric, kinds=(kind,), progress=False)[kind][0]  # (L, T, H)
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
             f"`python bench.py --tl-adapter`: random GPT-2-small-shaped HookedTransformer (12 layers, 12 heads, "
             f"d_model 768, vocab 50257), float32, CPU, {threads} thread(s), transformer-lens "
             f"{tl_adapter.version('transformer-lens')}, torch {torch.__version__}. One prompt pair, T = {T}, noise "
             f"differs at positions 0 and {T // 2}; metric: logit difference at the last position. Ours: every node "
             f"of the kind; TransformerLens: {sample} random nodes of it. Max diff: our effect minus theirs on "
             f"those nodes (float32).", "",
             "| kind | nodes (ours) | ms/node (ours) | nodes (TL) | ms/node (TL) | speed-up | max diff |",
             "|---|---|---|---|---|---|---|"] + rows + ["",
             f"Mean over the four kinds: {total_theirs / total_ours:.1f}x fewer seconds per node than "
             f"TransformerLens's helpers."]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    if "--tl-adapter" in sys.argv[1:]:  # python bench.py --tl-adapter [--tl-seq T] [--threads N]
        extra = argparse.ArgumentParser(description="exact patching: tl_adapter vs transformer_lens.patching")
        extra.add_argument("--tl-adapter", action="store_true")
        extra.add_argument("--tl-seq", type=int, default=16, help="prompt length T")
        extra.add_argument("--threads", type=int, default=1)
        extra_args = extra.parse_args()
        bench_tl_adapter(T=extra_args.tl_seq, threads=extra_args.threads)
    else:
        main()
