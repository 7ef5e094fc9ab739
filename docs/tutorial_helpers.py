"""Three small helpers the pages (tutorial.md, docs/*.md) use, so that what they print is the code that runs.

    show(fn, first, last)  print fn's source from the file, or only its lines from `first` to `last`
    fmt(values)            a tensor as "[+1.23, -4.56]"
    check(test, *args)     run a test function from tests/ (it raises if a claim fails) and say it passed
    ranked(per_pair)       per-pair estimates -> (ranking best first, node -> 1-based rank)

A page imports them after `sys.path[:0] = ["docs", "tests"]`, from the repository root.
"""

import contextlib
import inspect
import io
import os
import textwrap

import atp_minimal as atp


def show(fn, first=None, last=None):
    """Print fn's source, or only its lines from the first one containing `first` to the next one
    containing `last`."""
    lines = inspect.getsource(fn).splitlines()
    start = next(i for i, line in enumerate(lines) if first in line) if first else 0
    stop = next(i for i in range(start, len(lines)) if last in lines[i]) if last else len(lines) - 1
    print(f"# {os.path.basename(inspect.getsourcefile(fn))}, {fn.__qualname__}")
    print(textwrap.dedent("\n".join(lines[start:stop + 1])))


def fmt(values, spec="+.3g"):
    return "[" + ", ".join(format(v, spec) for v in values.tolist()) + "]"


def check(test, *args):
    """Run a test function from tests/; it raises if a claim fails. What it prints (pytest -s shows it)
    is kept off the page: its measured differences are rounding residuals that vary from CPU to CPU."""
    with contextlib.redirect_stdout(io.StringIO()):
        test(*args)
    param = f"[{', '.join(map(str, args))}]" if args else ""
    print(f"passed: tests/{test.__module__}.py::{test.__name__}{param}")


def ranked(per_pair, already_abs=False):
    """Per-pair estimates kind -> (B, L, T, U) -> (ranking best first, node -> 1-based rank), ranked by
    the mean over the pairs of |estimate| (scores that are >= 0 already: already_abs=True)."""
    scores = {k: (v if already_abs else v.abs()).mean(0) for k, v in per_pair.items()}
    order, _ = atp.rank_nodes(scores)
    return order, {n: i + 1 for i, n in enumerate(order)}
