"""docs/transformerlens_tl4.md cannot rot: its code runs and prints what the page shows.

The page's ```python blocks before its section "The older path" need TransformerLens 4.x (a
TransformerBridge); the blocks in that section need 2.x or 3.x (a HookedTransformer). With the installed
TransformerLens, the blocks it can run run in order, in one namespace, from the repository root, and each
```text block after a python block is compared with what the block prints, as tests/test_tutorial.py
does for tutorial.md (integers exactly, decimals to its REL_TOL); the other blocks are skipped.

    pytest -s tests/test_transformerlens_tl4_page.py
    python tests/test_transformerlens_tl4_page.py --update   # rewrite the text blocks this version runs
"""

import contextlib
import io
import os
import sys
from importlib.metadata import PackageNotFoundError, version

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PAGE = os.path.join(ROOT, "docs", "transformerlens_tl4.md")
OLDER = "## The older path"  # the heading of the HookedTransformer section
sys.path[:0] = [ROOT, HERE]
from test_tutorial import python_blocks_with_output, repl_problems, same_output  # noqa: E402


def installed_major():
    try:
        return version("transformer-lens").split(".")[0]
    except PackageNotFoundError:
        return None


def runnable_blocks(text, major):
    """[(code, line, expected output or None)] of the python blocks the installed TransformerLens runs."""
    older_from = text[:text.index(OLDER)].count("\n") + 1  # the line the older section starts at
    blocks = python_blocks_with_output(text)
    if major == "4":
        return [b for b in blocks if b[1] < older_from]
    if major in ("2", "3"):
        return [b for b in blocks if b[1] > older_from]
    return []


def run(blocks):
    """Run the blocks in order in one namespace, from the repository root; [printed output]."""
    namespace, printed = {"__name__": "__page__"}, []
    cwd, threads, rng = os.getcwd(), torch.get_num_threads(), torch.get_rng_state()
    os.chdir(ROOT)
    try:
        for code, line, _ in blocks:
            buffer = io.StringIO()
            with contextlib.redirect_stdout(buffer):
                exec(compile("\n" * (line - 1) + code, PAGE, "exec"), namespace)
            printed.append(buffer.getvalue())
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)
    return printed


def read_page():
    with open(PAGE) as f:
        return f.read()


def test_the_blocks_for_the_installed_transformer_lens_print_what_the_page_shows():
    blocks = runnable_blocks(read_page(), installed_major())
    if not blocks:
        pytest.skip(f"no block of the page runs on transformer-lens {version('transformer-lens')}")
    problems = []
    for (code, line, expected), got in zip(blocks, run(blocks)):
        if expected is None:
            problems.append(f"block at line {line} has no ```text block after it")
            continue
        message = same_output(got, expected)
        if message:
            problems.append(f"block at line {line}: {message}")
    print(f"\n  {len(blocks)} blocks of {os.path.relpath(PAGE, ROOT)} run on transformer-lens "
          f"{version('transformer-lens')}")
    assert not problems, ("docs/transformerlens_tl4.md is out of date (rerun `python "
                          "tests/test_transformerlens_tl4_page.py --update`):\n" + "\n".join(problems))


def test_every_block_pastes_into_an_interactive_session():
    problems = [f"block at line {line}: {repl_problems(code)}"
                for code, line, _ in python_blocks_with_output(read_page()) if repl_problems(code)]
    assert not problems, "\n".join(problems)


def update():
    """Rerun the blocks the installed TransformerLens runs and write their output into the text blocks."""
    text = read_page()
    blocks = runnable_blocks(text, installed_major())
    lines = text.splitlines()
    for (code, line, expected), got in reversed(list(zip(blocks, run(blocks)))):
        end = line - 1 + len(code.splitlines())  # index of the python block's closing fence
        start = next(i for i in range(end + 1, len(lines)) if lines[i].startswith("```text"))
        stop = next(i for i in range(start + 1, len(lines)) if lines[i].rstrip() == "```")
        lines[start + 1:stop] = got.rstrip("\n").splitlines()
    with open(PAGE, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"updated {len(blocks)} text blocks of {PAGE}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--update"]:
        update()
    else:
        sys.exit("usage: python tests/test_transformerlens_tl4_page.py --update")
