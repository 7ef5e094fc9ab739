"""The pages cannot rot: tutorial.md and every docs/*.md run, and what they print is what they show.

For each page (tutorial.md, then docs/*.md in name order):
  - every ```python block runs, in order, in one namespace of its own, from the repository root;
  - a ```text block right after a python block is that block's printed output: the test reruns the block
    and compares (see `same_output`: integers, labels and ranks exactly, decimals to a stated relative
    tolerance), so quoted numbers stay current on any CPU;
  - every python block pastes cleanly into an interactive `python` session (see `repl_problems`);
  - every figure it shows exists (and is small), every file or section it links to exists, and every
    test it names (tests/test_x.py::test_y) exists.
A page whose blocks import a package that is not installed (TransformerLens, say), or that needs other
major versions of one than are installed (a line `<!-- needs transformer-lens 4.x -->`), is skipped, with
the reason; its other checks still run. tutorial.md's table of activation sites must list exactly
model.site_names() (for a 1-layer model), with the shapes that model.py really produces.

    pytest -s tests/test_tutorial.py        # also prints each block's run time
    python tests/test_tutorial.py --update  # rerun every page and rewrite its text blocks
                                            # (then reread the prose around any number that moved)
"""

import codeop
import contextlib
import glob
import importlib.metadata
import importlib.util
import io
import os
import re
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from model import GPT, GPTConfig  # noqa: E402

PAGES = ["tutorial.md"] + sorted(os.path.relpath(p, ROOT)
                                 for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))

# How a printed number is compared with the page:
#   - an integer (no decimal point, no exponent: counts, ranks, layers, heads, positions, percentages) must
#     be equal. The blocks print only integers that do not depend on float rounding (counts above a
#     stated threshold, ranks far from ties), so there is no slack for a wrong label or rank to pass.
#   - a decimal (1.5, 2.0e-3) must agree to REL_TOL relative, plus one unit of the page's last printed
#     digit: two runs whose values agree to REL_TOL can still round to neighbouring printed values.
#     REL_TOL = 1e-3: the blocks print float32 and float64 quantities that are not rounding residuals,
#     which agree across CPUs and thread counts to ~1e-6 relative (float32) or better; 1e-3 leaves a wide
#     margin for that, and is still far below any change of the code or the checkpoint that the prose
#     could depend on. Residuals (differences at rounding level) are never printed as values; the
#     blocks print a pass/fail line against a stated bound instead.
REL_TOL = 1e-3
MAX_FIGURE_BYTES = 150_000
INSTALL = {"transformer_lens": "pip install transformer-lens==3.9.0", "matplotlib": "pip install matplotlib",
           "transformers": "pip install -r requirements.txt"}


# --- reading a page

def read_page(page):
    with open(os.path.join(ROOT, page)) as f:
        return f.read()


def fenced_blocks(text, page="tutorial.md"):
    """[(language, code, first line number of the code (1-based), number of code lines)] for every
    ``` fenced block."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if m:
            start = i + 1
            end = start
            while end < len(lines) and lines[end].rstrip() != "```":
                end += 1
            if end == len(lines):
                raise ValueError(f"{page} line {i + 1}: fence never closed")
            blocks.append((m.group(1), "\n".join(lines[start:end]), start + 1, end - start))
            i = end + 1
        else:
            i += 1
    return blocks


def python_blocks_with_output(text, page="tutorial.md"):
    """[(code, line, expected output or None)]: a ```text block directly after a ```python block (only
    prose between them) is the python block's output. A text block anywhere else is an error."""
    blocks = fenced_blocks(text, page)
    out = []
    for j, (lang, code, line, _) in enumerate(blocks):
        if lang == "python":
            follows = blocks[j + 1] if j + 1 < len(blocks) else None
            expected = follows[1] if follows and follows[0] == "text" else None
            out.append((code, line, expected))
        elif lang == "text" and (j == 0 or blocks[j - 1][0] != "python"):
            raise ValueError(f"{page} line {line}: a ```text block must follow a ```python block")
    return out


def prose(text):
    """The page without its fenced blocks (links and names inside code are not the page's own)."""
    return re.sub(r"^```\w*\s*$.*?^```\s*$", "", text, flags=re.M | re.S)


def missing_packages(text, page="tutorial.md"):
    """Top-level modules the page's python blocks import that are neither installed nor the project's."""
    names = set()
    for code, _, _ in python_blocks_with_output(text, page):
        names.update(re.findall(r"^\s*(?:from|import)\s+([A-Za-z_]\w*)", code, re.M))
    project = {os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(ROOT, "*.py"))
               + glob.glob(os.path.join(ROOT, "*", "*.py"))}
    return sorted(n for n in names if n not in project and importlib.util.find_spec(n) is None)


NEEDS = re.compile(r"^<!-- needs ([\w-]+) (\d+\.x(?:, \d+\.x)*) -->$", re.M)


def unmet_versions(text):
    """A page runs with some major versions of a package only when it says so in a line of its own,
    `<!-- needs transformer-lens 4.x -->` (or `2.x, 3.x`): [(package, majors wanted, installed)] unmet."""
    unmet = []
    for package, majors in NEEDS.findall(text):
        wanted = [m.split(".")[0] for m in majors.split(", ")]
        try:
            installed = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed is None or installed.split(".")[0] not in wanted:
            unmet.append((package, majors, installed))
    return unmet


def skip_reason(page, text):
    """Why the page's blocks cannot run here (a package missing, or not in the version the page needs),
    or None."""
    missing = missing_packages(text, page)
    if missing:
        install = "; ".join(INSTALL.get(m, "pip install " + m) for m in missing)
        return f"{page} needs {', '.join(missing)}, which is not installed ({install})"
    unmet = unmet_versions(text)
    if unmet:
        return f"{page} runs with " + "; ".join(f"{p} {m} (installed: {v or 'none'})" for p, m, v in unmet)
    return None


# --- running the blocks

NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def same_output(got, want):
    """None if `got` matches `want`, else a message. Text between numbers must match exactly (trailing
    spaces aside); integers must be equal; decimals must agree to REL_TOL relative plus one unit of
    want's last printed digit (see REL_TOL)."""
    got_lines, want_lines = got.rstrip("\n").splitlines(), want.rstrip("\n").splitlines()
    if len(got_lines) != len(want_lines):
        return f"{len(got_lines)} lines printed, the text block has {len(want_lines)}"
    for n, (g, w) in enumerate(zip(got_lines, want_lines), 1):
        g, w = g.rstrip(), w.rstrip()
        if NUMBER.sub("#", g) != NUMBER.sub("#", w):
            return f"line {n} differs:\n  printed: {g}\n  page:    {w}"
        for a, b in zip(NUMBER.findall(g), NUMBER.findall(w)):
            mantissa, _, exponent = b.lower().partition("e")
            if "." not in mantissa and not exponent:  # an integer: exactly
                ok = a.lstrip("+") == b.lstrip("+")
            else:
                decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
                unit = 10.0 ** (int(exponent or 0) - decimals)  # one unit of the last printed digit
                ok = abs(float(a) - float(b)) <= REL_TOL * abs(float(b)) + unit
            if not ok:
                return f"line {n}: {a} printed, {b} on the page:\n  printed: {g}\n  page:    {w}"
    return None


def repl_problems(code):
    """Why `code` would not paste into an interactive `python` session, or None. The REPL reads a
    compound statement (def, for, with, ...) until the first blank line, so a blank line inside an
    indented block cuts it short, and a statement right after an indented block, without a blank line
    between them, is a syntax error. This feeds the lines to codeop the way the REPL does."""
    buffer = []
    for number, line in enumerate(code.splitlines() + [""], 1):
        buffer.append(line)
        source = "\n".join(buffer)
        try:
            compiled = codeop.compile_command(source, "<stdin>", "single")
        except SyntaxError as err:
            return f"line {number} of the block: {err.msg}: {line.strip()!r}"
        if compiled is not None or not source.strip():
            buffer = []
    return None


def run_blocks(text, page="tutorial.md", echo=False):
    """Run every python block of a page in order, in a namespace of its own, from the repository root;
    returns [(line, expected, printed, seconds)]."""
    namespace = {"__name__": "__tutorial__"}
    results = []
    cwd, path, threads, rng = os.getcwd(), list(sys.path), torch.get_num_threads(), torch.get_rng_state()
    set_threads = torch.set_num_threads
    os.chdir(ROOT)
    if "ATP_TEST_THREADS" in os.environ:  # hold the count conftest.py set (the pages themselves ask for 1)
        torch.set_num_threads = lambda n: None
    try:
        for code, line, expected in python_blocks_with_output(text, page):
            # padded with blank lines, so a traceback names the line of the page
            compiled = compile("\n" * (line - 1) + code, os.path.join(ROOT, page), "exec")
            buffer = io.StringIO()
            start = time.perf_counter()
            with contextlib.redirect_stdout(buffer):
                exec(compiled, namespace)
            seconds = time.perf_counter() - start
            results.append((line, expected, buffer.getvalue(), seconds))
            if echo:
                print(f"  block at {page}:{line}: {seconds:5.1f} s")
    finally:
        torch.set_num_threads = set_threads
        os.chdir(cwd)
        sys.path[:] = path
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)
    return results


def pages_with_code():
    return [p for p in PAGES if python_blocks_with_output(read_page(p), p)]


# --- the tests

@pytest.mark.parametrize("page", pages_with_code())
def test_every_python_block_runs_and_prints_what_the_page_shows(page):
    text = read_page(page)
    reason = skip_reason(page, text)
    if reason:
        pytest.skip(reason)
    start = time.perf_counter()
    results = run_blocks(text, page, echo=True)
    print(f"  {page}: {len(results)} blocks in {time.perf_counter() - start:.1f} s")
    problems = []
    for line, expected, printed, _ in results:
        if expected is None:
            if printed.strip():
                problems.append(f"block at line {line} prints output but no ```text block follows it")
            continue
        message = same_output(printed, expected)
        if message:
            problems.append(f"block at line {line}: {message}")
    assert not problems, (f"{page} is out of date (rerun `python tests/test_tutorial.py --update`, then "
                          "reread the prose near the changed numbers):\n" + "\n".join(problems))


@pytest.mark.parametrize("page", pages_with_code())
def test_every_python_block_pastes_into_an_interactive_session(page):
    problems = []
    for code, line, _ in python_blocks_with_output(read_page(page), page):
        message = repl_problems(code)
        if message:
            problems.append(f"block at {page}:{line}: {message}")
    assert not problems, "these blocks break when pasted into `python`:\n" + "\n".join(problems)


def site_table(text):
    """The rows of the table whose header starts with '| site |': [(site, shape)], backticks removed."""
    rows, inside = [], False
    for line in text.splitlines():
        if line.startswith("| site |"):
            inside = True
            continue
        if inside:
            if not line.startswith("|"):
                break
            cells = [c.strip().strip("`") for c in line.strip("|").split("|")]
            if set(cells[0]) <= set("-: "):
                continue  # the |---|---| row
            rows.append((cells[0], cells[1]))
    return rows


def test_site_table_lists_every_site_of_model_py_with_its_shape():
    rows = site_table(read_page("tutorial.md"))
    assert rows, "tutorial.md has no table starting with '| site |'"
    # distinct sizes, so a wrong letter in a shape cannot match by accident (only S = T is forced)
    cfg = GPTConfig(n_layer=1, n_head=3, n_embd=12, n_positions=8, vocab_size=11, n_inner=20)
    model = GPT(cfg)
    B, T = 2, 5
    dims = {"B": B, "T": T, "S": T, "D": cfg.n_embd, "H": cfg.n_head, "Dh": cfg.d_head, "M": cfg.d_mlp,
            "V": cfg.vocab_size}
    names = model.site_names()
    cache = {}
    hooks = {n: (lambda t, n=n: cache.__setitem__(n, t)) for n in names}
    with torch.no_grad():
        model(torch.zeros(B, T, dtype=torch.long), hooks=hooks)
    table = {site.replace("{l}", "0"): shape for site, shape in rows}
    missing = [n for n in names if n not in table]
    extra = [s for s in table if s not in names]
    assert not missing and not extra, f"site table out of date: missing {missing}, not a site {extra}"
    for name in names:
        letters = [x.strip() for x in table[name].strip("()").split(",")]
        want = tuple(dims[x] for x in letters)
        print(f"  {name:28s} table {table[name]:16s} -> {want}, model.py {tuple(cache[name].shape)}")
        assert tuple(cache[name].shape) == want, f"{name}: table says {table[name]}"


@pytest.mark.parametrize("page", PAGES)
def test_figures_exist_and_are_small(page):
    paths = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", prose(read_page(page)))
    if page == "tutorial.md":
        assert paths, "tutorial.md shows no figure"
    for path in paths:
        full = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), path))
        assert os.path.isfile(full), f"{page} shows {path}, which does not exist (run make_figures.py)"
        size = os.path.getsize(full)
        print(f"  {path}: {size / 1000:.0f} kB")
        if "figures" in os.path.relpath(full, ROOT).split(os.sep):
            assert size < MAX_FIGURE_BYTES, f"{path} is {size} bytes; keep figures under {MAX_FIGURE_BYTES}"


def heading_anchors(text):
    """GitHub's anchors for the page's headings: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    for title in re.findall(r"^#+\s+(.*?)\s*$", prose(text), re.M):
        anchors.add(re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("page", PAGES)
def test_every_link_to_a_file_or_section_resolves(page):
    text = read_page(page)
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(text)):
        if re.match(r"[a-z]+:", target):
            continue  # https://..., mailto:
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), path)) if path else \
            os.path.join(ROOT, page)
        if not os.path.exists(full):
            problems.append(f"{target}: no such file")
        elif anchor and full.endswith(".md") and anchor not in heading_anchors(open(full).read()):
            problems.append(f"{target}: no such section")
    assert not problems, f"{page} links to what is not there:\n" + "\n".join(problems)


@pytest.mark.parametrize("page", PAGES)
def test_every_test_the_page_names_exists(page):
    named = set(re.findall(r"(tests/test_\w+\.py)::(\w+)", read_page(page)))
    if page == "tutorial.md":
        assert named, "tutorial.md names no test"
    for path, name in sorted(named):
        with open(os.path.join(ROOT, path)) as f:
            source = f.read()
        assert re.search(rf"^def {name}\b", source, re.M), f"{page} names {path}::{name}, which is gone"
    print(f"  {page}: {len(named)} named tests found")


# --- python tests/test_tutorial.py [--update]

def update(text, page="tutorial.md"):
    """Rewrite every ```text block after a python block with what the block prints now (and add one
    where a block prints but has none)."""
    results = {line: printed for line, _, printed, _ in run_blocks(text, page, echo=True)}
    lines = text.splitlines()
    blocks = fenced_blocks(text, page)
    edits = []  # (first line index, last line index (exclusive), new lines), applied bottom-up
    for j, (lang, code, line, n_lines) in enumerate(blocks):
        if lang != "python":
            continue
        printed = results[line].rstrip("\n")
        follows = blocks[j + 1] if j + 1 < len(blocks) else None
        if follows and follows[0] == "text":
            first = follows[2] - 1  # index of the text block's first line
            edits.append((first, first + follows[3], printed.splitlines()))
        elif printed:
            after = line - 1 + n_lines + 1  # index just past the python block's closing fence
            edits.append((after, after, ["", "```text"] + printed.splitlines() + ["```"]))
    for first, last, new in sorted(edits, reverse=True):
        lines[first:last] = new
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    for page in pages_with_code():
        text = read_page(page)
        reason = skip_reason(page, text)
        if reason:
            print(f"skipped: {reason}")
        elif "--update" in sys.argv:
            new = update(text, page)
            with open(os.path.join(ROOT, page), "w") as f:
                f.write(new)
            print(f"rewrote the output blocks of {page}")
        else:
            for line, expected, printed, seconds in run_blocks(text, page):
                print(f"--- {page}:{line} ({seconds:.1f} s)\n{printed}", end="")
