"""
A toy indirect-object-identification (IOI) task, and a small GPT-2 trained on it.

The trained model ships in toy_model/ (a Hugging Face GPT-2 directory: config.json + model.safetensors,
plus vocab.json for readers), so AtP and AtP* can be run and checked against exact activation patching
in seconds on a CPU, with no download. Its attention saturates (some heads put > 99% of their weight on
one key), which is the failure mode the paper's QK fix is for.

References:
1) the AtP* paper: Kramar, Lieberum, Shah, Nanda (2024), https://arxiv.org/abs/2403.00745
   (§4 Experiments, IOI-PP)
2) the IOI task: Wang et al. (2022), https://arxiv.org/abs/2211.00593

The task. The vocabulary is word-level: every word and every punctuation mark is one token, and each
prompt starts with "<bos>". Five templates, all 15 tokens long, so every prompt has the same length T:

    pos: 0     1     2    3   4    5    6  7   8      9 10  11     12 13     14
         <bos> When  {N1} and {N2} went to the store  , {S} gave   a  drink  to
         <bos> When  {N1} and {N2} went to the park   , {S} gave   a  ball   to
         <bos> When  {N1} and {N2} went to the school , {S} handed a  book   to
         <bos> When  {N1} and {N2} got  to the office , {S} passed a  letter to
         <bos> While {N1} and {N2} were at the house  , {S} sent   a  gift   to

Two different names fill the slots: the indirect object IO and the subject S.
  - ABBA order: N1 = IO, N2 = S  ("When Mary and John went to the store , John gave a drink to")
  - BABA order: N1 = S, N2 = IO  ("When John and Mary went to the store , John gave a drink to")
  The answer, the next token after the final "to", is IO ("Mary" in both examples; "<bos>" not shown).

Clean/noise pairs. The noise prompt is the clean prompt with the second-clause subject (position 10,
S_POS) replaced by the other name, IO:
    clean "When Mary and John went to the store , John gave a drink to"  -> Mary  (answer_ids)
    noise "When Mary and John went to the store , Mary gave a drink to"  -> John  (wrong_ids)
So the two prompts differ at exactly one position, have the same length by construction, and the
answer flips: the noise prompt is itself a valid IOI prompt whose answer is the clean prompt's wrong name.

Train/test split. The 24 names give 276 unordered pairs {X, Y}. A fixed, seeded 20% of them (55 pairs)
is held out for the test split; every prompt built from such a pair (either name as IO, both orders,
every template) is test data, and the training split never sees these two names together. Holding out
ordered pairs instead would not test generalisation: the model sees (Y, X) in training and memorises it.

Usage:
    python toy_ioi.py                  # retrain and write out/toy_model/ (git-ignored; ~45 s on 2 idle
                                       # CPU cores)
    python toy_ioi.py --out DIR        # write the checkpoint somewhere else
    python toy_ioi.py --out toy_model  # rewrite the shipped checkpoint (every number in the repository
                                       # comes from it: see the README before doing this)
    python toy_ioi.py --seed N         # try another training seed
    python toy_ioi.py --n-layer 8 --d-model 64 --lr 1e-3 --steps 1200 --out DIR   # another recipe
                                       # (experiments/depth_study.py trains its models this way)
"""

import argparse
import itertools
import json
import os
import random
import sys
import time
from typing import List, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from model import GPT, GPTConfig

HERE = os.path.dirname(os.path.abspath(__file__))
TOY_MODEL_DIR = os.path.join(HERE, "toy_model")  # the shipped checkpoint, read by load_toy_model()
RETRAIN_DIR = os.path.join(HERE, "out", "toy_model")  # where `python toy_ioi.py` writes (git-ignored)

# --- the vocabulary and the templates

NAMES = ["Mary", "John", "Alice", "Bob", "Tom", "Anna", "James", "Kate", "Paul", "Lisa", "Mark", "Sarah",
         "David", "Emma", "Peter", "Laura", "Sam", "Julia", "Max", "Rose", "Dan", "Nina", "Leo", "Eve"]

# {N1} {N2}: the two names of the first clause; {S}: the subject of the second clause.
TEMPLATES = [
    "<bos> When {N1} and {N2} went to the store , {S} gave a drink to",
    "<bos> When {N1} and {N2} went to the park , {S} gave a ball to",
    "<bos> When {N1} and {N2} went to the school , {S} handed a book to",
    "<bos> When {N1} and {N2} got to the office , {S} passed a letter to",
    "<bos> While {N1} and {N2} were at the house , {S} sent a gift to",
]
T = 15  # tokens per prompt, the same for every template
N1_POS, N2_POS, S_POS = 2, 4, 10  # where the names sit in every template

_TEMPLATE_WORDS = sorted({w for t in TEMPLATES for w in t.split() if not w.startswith("{")} - {"<bos>"})
VOCAB: List[str] = ["<bos>"] + _TEMPLATE_WORDS + NAMES  # token id = index in this list
TOKEN_ID = {w: i for i, w in enumerate(VOCAB)}
NAME_IDS = [TOKEN_ID[n] for n in NAMES]

for _t in TEMPLATES:  # every template must put the names at the same positions and have length T
    _w = _t.split()
    assert len(_w) == T and (_w[N1_POS], _w[N2_POS], _w[S_POS]) == ("{N1}", "{N2}", "{S}"), _t


def encode(words: Union[str, Sequence[str]]) -> List[int]:
    """Words (a list, or one string split on spaces) -> token ids. Every word is one token."""
    words = words.split() if isinstance(words, str) else words
    unknown = [w for w in words if w not in TOKEN_ID]
    if unknown:
        raise KeyError(f"words not in the toy vocabulary: {unknown}")
    return [TOKEN_ID[w] for w in words]


def decode(ids: Sequence[int]) -> str:
    """Token ids (list or 1-d tensor) -> the words joined by spaces."""
    return " ".join(VOCAB[int(i)] for i in ids)


# --- prompt pairs and the train/test split

SPLIT_SEED = 0  # fixes which unordered name pairs are held out; independent of the training seed
TEST_FRACTION = 0.2


def name_pairs(split: str) -> List[Tuple[str, str]]:
    """The unordered name pairs {X, Y} (as sorted tuples) that belong to `split`, "train" or "test"."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    pairs = list(itertools.combinations(sorted(NAMES), 2))  # 276 unordered pairs
    random.Random(SPLIT_SEED).shuffle(pairs)
    n_test = round(TEST_FRACTION * len(pairs))
    chosen = pairs[:n_test] if split == "test" else pairs[n_test:]
    return sorted(chosen)


def all_pairs(split: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every clean/noise prompt pair of `split`, in a fixed order: each unordered name pair, with either
    name as IO, in ABBA and BABA order, in every template (20 prompts per name pair).
    Returns clean (N, T), noise (N, T), answer_ids (N,), wrong_ids (N,)."""
    clean, noise, answer, wrong = [], [], [], []
    for x, y in name_pairs(split):
        for io, s in ((x, y), (y, x)):
            for n1, n2 in ((io, s), (s, io)):  # ABBA, then BABA
                for template in TEMPLATES:
                    clean.append(encode(template.format(N1=n1, N2=n2, S=s)))
                    # the subject switched to the other name: the answer flips
                    noise.append(encode(template.format(N1=n1, N2=n2, S=io)))
                    answer.append(TOKEN_ID[io])
                    wrong.append(TOKEN_ID[s])
    return torch.tensor(clean), torch.tensor(noise), torch.tensor(answer), torch.tensor(wrong)


def make_pairs(n: int, split: str = "test", seed: int = 0):
    """n distinct clean/noise prompt pairs drawn (seeded, without replacement) from `split`.
    Returns clean (n, T) and noise (n, T) LongTensors, answer_ids (n,) = the clean answer (IO), and
    wrong_ids (n,) = the noise answer, i.e. the other name (S)."""
    clean, noise, answer, wrong = all_pairs(split)
    if not 1 <= n <= len(clean):
        raise ValueError(f"the {split} split has {len(clean)} prompt pairs; asked for {n}")
    pick = torch.randperm(len(clean), generator=torch.Generator().manual_seed(seed))[:n]  # (n,)
    return clean[pick], noise[pick], answer[pick], wrong[pick]


# --- the model, its training and its evaluation

CONFIG = GPTConfig(n_layer=4, n_head=4, n_embd=128, n_positions=24, vocab_size=len(VOCAB))
# Seed 0 reaches 100% held-out accuracy by step 200 of STEPS. Not every seed generalises that fast:
# seeds 3, 4 and 5 end 400 steps at 83-90% on held-out pairs (seed 4 with training loss 0.002: it fits
# the training pairs without generalising), which is why main() exits non-zero below 99% held-out.
TRAIN_SEED = 0
STEPS = 400
BATCH_SIZE = 128
LR = 3e-3


def train(seed: int = TRAIN_SEED, steps: int = STEPS, log_every: int = 100, config: GPTConfig = CONFIG,
          lr: float = LR, batch_size: int = BATCH_SIZE) -> GPT:
    """Train a fresh `config` model (default: the shipped model's CONFIG) on the train split: AdamW,
    cross-entropy of the answer name at the last position only (the earlier positions are never asked
    for a prediction). Seeded: the same seed gives the same weights (main() also switches torch to
    deterministic algorithms)."""
    torch.manual_seed(seed)  # the initial weights
    model = GPT(config)
    model.train()  # no dropout in this model, so this only records intent
    clean, _, answer, _ = all_pairs("train")  # (N, T), (N,); every noise prompt is also a clean prompt here
    batches = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for step in range(1, steps + 1):
        idx = torch.randint(len(clean), (batch_size,), generator=batches)  # (B,)
        logits = model(clean[idx])[:, -1, :]  # (B, V): the prediction after the final "to"
        loss = F.cross_entropy(logits, answer[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % log_every == 0 or step == 1:
            print(f"step {step:5d}  loss {loss.item():.4f}")
    model.eval()
    return model


@torch.no_grad()
def accuracy(model: GPT, split: str = "test") -> float:
    """Fraction of every prompt of `split` whose top next-token prediction (over the whole vocabulary)
    is the IO name. The split's noise prompts are among its clean prompts, so this covers them too."""
    clean, _, answer, _ = all_pairs(split)
    logits = model(clean)[:, -1, :]  # (N, V)
    return (logits.argmax(-1) == answer).float().mean().item()


@torch.no_grad()
def logit_diff(model: GPT, prompts: torch.Tensor, answer_ids: torch.Tensor, wrong_ids: torch.Tensor):
    """Per-prompt logit(answer) - logit(wrong) at the last position: (N, T) prompts -> (N,)."""
    logits = model(prompts)[:, -1, :]  # (N, V)
    rows = torch.arange(len(prompts))
    return logits[rows, answer_ids] - logits[rows, wrong_ids]  # (N,)


# --- saving and loading the checkpoint


def save(model: GPT, out_dir: str):
    """Write a Hugging Face GPT-2 directory: config.json, model.safetensors (float32) and vocab.json."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    hf_config = model.config.to_hf()
    # Hugging Face defaults both to GPT-2's 50256, which is outside this vocabulary; ours is "<bos>" = 0.
    hf_config.update(bos_token_id=TOKEN_ID["<bos>"], eos_token_id=TOKEN_ID["<bos>"])
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    # Keys are already Hugging Face's (transformer.h.0.attn.c_attn.weight, ...); lm_head is tied to wte.
    weights = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "vocab.json"), "w") as f:
        json.dump(VOCAB, f, indent=0)  # token id = index; one word per line


def load_toy_model(path: str = TOY_MODEL_DIR) -> GPT:
    """The trained toy model, loaded through the same loader as real GPT-2 checkpoints."""
    model = GPT.from_pretrained(path)
    if model.config.vocab_size != len(VOCAB):
        raise ValueError(f"{path} has vocab_size {model.config.vocab_size}, the toy vocabulary has "
                         f"{len(VOCAB)}")
    return model


def check_saved(model: GPT, out_dir: str):
    """Reload out_dir with GPT.from_pretrained (and Hugging Face's GPT2LMHeadModel, when transformers is
    installed) and check that both give the trained model's logits."""
    clean, _, _, _ = make_pairs(64, "test")
    with torch.no_grad():
        want = model(clean)  # (B, T, V)
        torch.testing.assert_close(load_toy_model(out_dir)(clean), want, rtol=0, atol=0)
        print("reloaded with GPT.from_pretrained: logits identical")
        try:
            from transformers import GPT2LMHeadModel
        except ImportError:
            print("transformers not installed: skipped the Hugging Face check")
            return
        hf = GPT2LMHeadModel.from_pretrained(out_dir).eval()
        got = hf(clean).logits  # (B, T, V)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        print(f"reloaded with transformers.GPT2LMHeadModel: max |logit diff| {(got - want).abs().max():.2e}")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train the toy IOI model and write its checkpoint. The "
                                     "defaults are the shipped model's recipe.")
    parser.add_argument("--out", default=RETRAIN_DIR, help="output directory (default: out/toy_model/; "
                        "--out toy_model replaces the shipped checkpoint)")
    parser.add_argument("--seed", type=int, default=TRAIN_SEED, help="training seed")
    parser.add_argument("--steps", type=int, default=STEPS, help="optimizer steps")
    parser.add_argument("--n-layer", type=int, default=CONFIG.n_layer, help="transformer blocks")
    parser.add_argument("--d-model", type=int, default=CONFIG.n_embd,
                        help="residual width (n_embd; d_mlp = 4x)")
    parser.add_argument("--n-head", type=int, default=CONFIG.n_head, help="attention heads per layer")
    parser.add_argument("--lr", type=float, default=LR, help="AdamW learning rate")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="prompts per step")
    parser.add_argument("--min-accuracy", type=float, default=0.99,
                        help="write nothing (and exit non-zero) below this held-out accuracy")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    config = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.d_model,
                       n_positions=CONFIG.n_positions, vocab_size=CONFIG.vocab_size)

    torch.set_num_threads(args.threads)  # the default recipe's timing below is for 2 CPU cores
    torch.use_deterministic_algorithms(True)  # same seed, same checkpoint (costs nothing measurable here)
    # As attention saturates, some floats become subnormal (< 1.2e-38; probabilities reach 1e-45), and CPU
    # arithmetic on them is very slow: steps 100-175 ran at 1-3 s instead of 0.1 s. Flushing them to zero
    # cuts training from ~4.5 min to ~45 s and leaves this checkpoint bit-for-bit the same.
    torch.set_flush_denormal(True)
    if os.path.exists(os.path.join(args.out, "model.safetensors")):  # said before training, not after
        print(f"{args.out} holds a checkpoint: this run replaces it if the model reaches "
              f"{args.min_accuracy:.0%} held-out accuracy")
    print(f"{len(VOCAB)} tokens, {len(NAMES)} names, {len(TEMPLATES)} templates, T={T}; "
          f"{len(name_pairs('train'))} train / {len(name_pairs('test'))} test name pairs")
    print("example clean:", decode(make_pairs(1)[0][0]))
    print("example noise:", decode(make_pairs(1)[1][0]))
    start = time.time()
    model = train(args.seed, args.steps, config=config, lr=args.lr, batch_size=args.batch_size)
    print(f"trained in {time.time() - start:.1f} s")
    train_acc, test_acc = accuracy(model, "train"), accuracy(model, "test")
    print(f"accuracy: train {train_acc:.4f}, held-out {test_acc:.4f}")
    if test_acc < args.min_accuracy:  # checked before saving: a failed run never overwrites a good checkpoint
        sys.exit(f"held-out accuracy {test_acc:.4f} < {args.min_accuracy}: this seed did not converge "
                 f"(nothing written); try another --seed")
    save(model, args.out)
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"wrote {args.out} ({size / 1e6:.2f} MB)")
    check_saved(model, args.out)


if __name__ == "__main__":
    main()
