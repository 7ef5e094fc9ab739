"""The worked example, `python demo.py`, on the toy model and on a Hugging Face GPT-2 directory."""

import pytest
import torch

import demo


def test_demo_on_the_toy_model_prints_every_part(capsys):
    demo.main(["--pairs", "2", "--top", "5", "--verify", "10"])
    out = capsys.readouterr().out
    print(out)
    for part in ("metric = logit diff", "time: exact", "== attention nodes", "== MLP neurons",
                 "recall of the true top-5", "exact patches to verify", "AtP false negatives", "theta*"):
        assert part in out, f"the demo output lacks {part!r}"
    clean_metric = float(out.split("other name): clean ")[1].split(",")[0])  # "...: clean +x, noise -y"
    assert clean_metric > 0


def test_demo_runs_on_a_hugging_face_gpt2_directory(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    # GPT-2's real vocabulary, so tiktoken's ids fit; everything else tiny.
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=32, vocab_size=50257)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    demo.main(["--model", str(tmp_path), "--pairs", "2", "--top", "3", "--verify", "5"])
    out = capsys.readouterr().out
    print(out)
    assert "2 layers, 2 heads, d_model 16" in out and "theta*" in out
    assert "When" in out and "gave a drink to" in out  # the GPT-2 IOI prompts, decoded


def test_gpt2_ioi_pairs_have_equal_lengths_and_flip_the_answer():
    clean, noise, answer, wrong, shown_clean, shown_noise = demo.gpt2_ioi_pairs(16, seed=3)
    changed = (clean != noise).sum(1)
    print(f"shapes {tuple(clean.shape)}; positions changed per pair: {changed.tolist()}")
    print(f"  {shown_clean!r}\n  {shown_noise!r}")
    assert clean.shape == noise.shape and (changed == 1).all() and (answer != wrong).all()
