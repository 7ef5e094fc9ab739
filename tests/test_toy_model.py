"""
Checks on the shipped toy IOI model (toy_model/, written by `python toy_ioi.py --out toy_model`): its
prompt pairs are well formed, it solves IOI prompts for name pairs it never saw together, and its
attention saturates, the regime the AtP* QK fix (paper §3 Methods) is for. `pytest -s
tests/test_toy_model.py` prints the numbers.
"""

import itertools
from collections import Counter

import pytest
import torch

import toy_ioi  # conftest.py puts the repository root on sys.path
from toy_ioi import (N1_POS, N2_POS, NAMES, S_POS, T, TOY_MODEL_DIR, VOCAB, accuracy, all_pairs, decode,
                     load_toy_model, logit_diff, make_pairs, name_pairs)


@pytest.fixture(scope="module")
def model():
    return load_toy_model()  # GPT.from_pretrained on toy_model/, the same path real checkpoints take


def test_clean_and_noise_prompts_have_equal_length_and_differ_only_at_the_subject():
    for split in ("train", "test"):
        clean, noise, answer, wrong = all_pairs(split)
        N = len(clean)
        assert clean.dtype == noise.dtype == torch.long
        assert clean.shape == noise.shape == (N, T) and answer.shape == wrong.shape == (N,)
        differs = clean != noise  # (N, T)
        assert differs[:, S_POS].all() and differs.sum().item() == N, "exactly one differing token per pair"
        # clean says "..., S gave ... to" -> IO; noise says "..., IO gave ... to" -> S: the answer flips.
        assert torch.equal(clean[:, S_POS], wrong) and torch.equal(noise[:, S_POS], answer)
        assert (answer != wrong).all()
        print(f"{split}: {N} pairs of length {T}, each differing only at position {S_POS}")
    clean, noise, answer, wrong = make_pairs(8, "test", seed=1)
    assert clean.shape == noise.shape == (8, T) and answer.shape == wrong.shape == (8,)
    assert torch.equal(make_pairs(8, "test", seed=1)[0], clean), "make_pairs must be seeded"
    assert len({tuple(row.tolist()) for row in clean}) == 8, "make_pairs draws distinct prompts"
    print("clean:", decode(clean[0]), "->", VOCAB[answer[0]])
    print("noise:", decode(noise[0]), "->", VOCAB[wrong[0]])


def test_training_split_never_contains_a_held_out_name_pair(monkeypatch):
    train_pairs, test_pairs = set(name_pairs("train")), set(name_pairs("test"))
    everything = set(itertools.combinations(sorted(NAMES), 2))
    assert not train_pairs & test_pairs
    assert train_pairs | test_pairs == everything
    # The training loop must take its prompts from the train split only: run one step and record.
    asked = []

    def recording_all_pairs(split):
        asked.append(split)
        return all_pairs(split)

    monkeypatch.setattr(toy_ioi, "all_pairs", recording_all_pairs)
    toy_ioi.train(steps=1)
    assert asked == ["train"], f"train() read the splits {asked}"
    # ...and the names in those very prompts never form a held-out pair.
    clean, _, answer, wrong = all_pairs("train")
    seen = {tuple(sorted((VOCAB[a], VOCAB[w]))) for a, w in zip(answer.tolist(), wrong.tolist())}
    seen |= {tuple(sorted((VOCAB[x], VOCAB[y]))) for x, y in clean[:, [N1_POS, N2_POS]].tolist()}
    assert seen == train_pairs and not seen & test_pairs
    print(f"{len(train_pairs)} train / {len(test_pairs)} held-out unordered name pairs, disjoint; "
          f"every name appears in training: {all(any(n in p for p in train_pairs) for n in NAMES)}")


def test_toy_model_solves_held_out_name_pairs(model):
    test_acc = accuracy(model, "test")  # every held-out prompt
    # Training prompts: a seeded sample of 512 of the 4,420 is enough to see that it learned the task.
    clean, _, answer, _ = all_pairs("train")
    sample = torch.randperm(len(clean), generator=torch.Generator().manual_seed(0))[:512]
    with torch.no_grad():
        train_acc = (model(clean[sample])[:, -1].argmax(-1) == answer[sample]).float().mean().item()
    print(f"accuracy: held-out {test_acc:.4f} ({len(all_pairs('test')[0])} prompts), "
          f"train {train_acc:.4f} (512 of {len(clean)} prompts)")
    assert test_acc >= 0.99 and train_acc >= 0.99


def test_logit_diff_is_positive_on_clean_and_negative_on_noise(model):
    clean, noise, answer, wrong = all_pairs("test")
    clean_diff = logit_diff(model, clean, answer, wrong)  # (N,): logit(IO) - logit(S)
    noise_diff = logit_diff(model, noise, answer, wrong)  # (N,)
    print(f"logit(answer) - logit(wrong): clean mean {clean_diff.mean():.2f} (min {clean_diff.min():.2f}), "
          f"noise mean {noise_diff.mean():.2f} (max {noise_diff.max():.2f})")
    assert clean_diff.mean() > 0 and noise_diff.mean() < 0


def key_roles(clean: torch.Tensor, answer: torch.Tensor) -> list:
    """For every prompt, a name for the role of each key position: (N, T) -> N lists of T strings."""
    roles = []
    for row, io in zip(clean.tolist(), answer.tolist()):
        names = {N1_POS: "IO" if row[N1_POS] == io else "S1", N2_POS: "IO" if row[N2_POS] == io else "S1",
                 S_POS: "S2"}
        roles.append([names.get(s, repr(VOCAB[row[s]])) for s in range(len(row))])
    return roles


def test_attention_saturates_at_the_last_position(model):
    clean, _, answer, _ = all_pairs("test")
    roles = key_roles(clean, answer)
    last = {}  # layer -> (N, H, S): the attention pattern of the final query position

    def keep(layer):
        def hook(pattern):  # (N, H, T, S)
            last[layer] = pattern[:, :, -1, :]
        return hook

    L, H = model.config.n_layer, model.config.n_head
    with torch.no_grad():
        model(clean, hooks={f"blocks.{l}.attn.hook_pattern": keep(l) for l in range(L)})
    heads = []
    for l in range(L):
        top, where = last[l].max(dim=-1)  # (N, H) each: a head's largest probability and its key, per prompt
        for h in range(H):
            picked = Counter(roles[i][s] for i, s in enumerate(where[:, h].tolist())).most_common(1)[0]
            heads.append((top[:, h].mean().item(), top[:, h].max().item(), f"L{l}H{h}", picked))
    heads.sort(reverse=True)  # most saturated on average first
    print(f"most saturated heads at the last position, over {len(clean)} held-out prompts:")
    for top_mean, top_max, head, (role, count) in heads[:6]:
        print(f"  {head}: max prob {top_max:.6f} (1 - max = {1 - top_max:.1e}), "
              f"mean of per-prompt max {top_mean:.4f}, top key is {role} in {count / len(clean):.0%} "
              "of prompts")
    probs = torch.cat([last[l].flatten() for l in range(L)])  # every last-position probability
    print(f"smallest nonzero probability seen: {probs[probs > 0].min().item():.3e}")
    assert max(top_max for _, top_max, _, _ in heads) > 0.99


def test_shipped_checkpoint_matches_hugging_face_gpt2(model):
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel.from_pretrained(TOY_MODEL_DIR).eval()
    clean, _, _, _ = make_pairs(64, "test")
    with torch.no_grad():
        ours, ref = model(clean), hf(clean).logits  # (B, T, V) each
    print(f"max |ours - Hugging Face| logit: {(ours - ref).abs().max():.2e}")
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
