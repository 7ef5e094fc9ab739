"""Every bad input gets a clear error naming what is wrong (or the right answer), never a raw error from deep
inside and never a silently wrong number; and no call changes the caller's tensors or the model's weights.
Run `pytest -s tests/test_errors.py` to read each message."""

import json
import os

import pytest
import torch

import atp_minimal as atp
import demo
from model import GPT, GPTConfig


def tiny():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=8, n_positions=8, vocab_size=12)).double()
    clean = torch.randint(0, 12, (3, 5), generator=torch.Generator().manual_seed(1))
    noise = clean.clone()
    noise[:, 2] = (noise[:, 2] + 1) % 12
    return model, clean, noise


MODEL, CLEAN, NOISE = tiny()
METRIC = atp.logit_diff(1, 2)
SCORES = {k: v.mean(0) for k, v in atp.atp_star(MODEL, CLEAN, NOISE, METRIC).items()}
RANKING, VALUES = atp.rank_nodes(SCORES)


def not_row_wise(logits):
    values = METRIC(logits)
    return values - values.mean()


def reads_position_0_but_says_last(logits):
    return logits[:, 0, 1] - logits[:, 0, 2]


reads_position_0_but_says_last.last_position_only = True


def mixes_the_last_two_rows(logits):
    values = METRIC(logits)
    return torch.cat([values[:-2], values[-2:] - values[-2:].mean()])

every_api = {
    "activation_patching": lambda **kw: atp.activation_patching(MODEL, **kw),
    "atp_estimates": lambda **kw: atp.atp_estimates(MODEL, **kw),
    "atp_star": lambda **kw: atp.atp_star(MODEL, **kw),
}

# (what the user did, call, error type, words the message must contain)
CASES = [
    *[(f"{name}: metric not row-wise (x - x.mean())",
       lambda f=f: f(clean=CLEAN, noise=NOISE, metric=not_row_wise), ValueError, "not row-wise")
      for name, f in every_api.items()],
    *[(f"{name}: last_position_only metric reads position 0", lambda f=f: f(
        clean=CLEAN, noise=NOISE, metric=reads_position_0_but_says_last), ValueError, "last_position_only")
      for name, f in every_api.items()],
    ("metric mixing the last two pairs only",
     lambda: atp.atp_star(MODEL, CLEAN, NOISE, mixes_the_last_two_rows),
     ValueError, "not row-wise"),
    ("atp_star kinds=('q', 'q')", lambda: atp.atp_star(MODEL, CLEAN, NOISE, METRIC, kinds=("q", "q")),
     ValueError, "each node kind once"),
    ("kinds='bogus' (an unknown kind by name)",
     lambda: atp.atp_estimates(MODEL, CLEAN, NOISE, METRIC, kinds="bogus"),
     ValueError, "unknown: ['bogus']"),
    ("B = 0", lambda: atp.atp_star(MODEL, CLEAN[:0], NOISE[:0], METRIC),
     ValueError, "at least one prompt pair"),
    ("integer-valued metric", lambda: atp.atp_estimates(MODEL, CLEAN, NOISE, lambda lg: lg[:, -1].argmax(-1)),
     TypeError, "floating-point"),
    ("metric detached from the logits",
     lambda: atp.atp_estimates(MODEL, CLEAN, NOISE, lambda lg: METRIC(lg).detach()),
     RuntimeError, "does not require grad"),  # torch's own words
    ("float token ids", lambda: atp.atp_star(MODEL, CLEAN.double(), NOISE.double(), METRIC), ValueError,
     "integer tensor"),  # model.py's own check
    ("tokens on another device", lambda: atp.atp_star(MODEL, CLEAN.to("meta"), NOISE.to("meta"), METRIC),
     ValueError, "move them with .to('cpu')"),
    ("logit_diff: answer id out of the vocabulary",
     lambda: atp.atp_star(MODEL, CLEAN, NOISE, atp.logit_diff(12, 1)),
     ValueError, "below the vocabulary size 12"),
    ("logit_diff: wrong number of ids", lambda: atp.atp_star(MODEL, CLEAN, NOISE, atp.logit_diff([1, 2], 3)),
     ValueError, "one per prompt pair (3)"),
    ("logit_diff: float ids", lambda: atp.logit_diff(1.5, 2), ValueError, "non-negative integers"),
    ("logit_diff: negative id", lambda: atp.logit_diff(-1, 2), ValueError, "non-negative integers"),
    ("logit_diff: position past the end",
     lambda: atp.atp_star(MODEL, CLEAN, NOISE, atp.logit_diff(1, 2, position=5)),
     ValueError, "position 5 is outside the sequence of length 5"),
    ("neg_log_prob: float position", lambda: atp.neg_log_prob(1, position=1.0), TypeError, "position"),
    ("neg_log_prob: target out of the vocabulary",
     lambda: atp.activation_patching(MODEL, CLEAN, NOISE, atp.neg_log_prob(99)),
     ValueError, "below the vocabulary size"),
    ("rank_nodes: a NaN score", lambda: atp.rank_nodes({"q": torch.tensor([[[float("nan"), 1.0]]])}),
     ValueError, "NaN"),
    ("rank_nodes: a 0-d tensor", lambda: atp.rank_nodes({"q": torch.tensor(1.0)}),
     ValueError, "one value per node"),
    ("rank_nodes: per-pair scores", lambda: atp.rank_nodes(atp.atp_star(MODEL, CLEAN, NOISE, METRIC)),
     ValueError, "s.mean(0)"),
    ("rank_nodes({})", lambda: atp.rank_nodes({}), ValueError, "non-empty dict"),
    ("verify: (nodes, values) passed whole",
     lambda: atp.verify(MODEL, CLEAN, NOISE, METRIC, (RANKING, VALUES), 3),
     TypeError, "rank_nodes(...)[0]"),
    ("verify: a node twice", lambda: atp.verify(MODEL, CLEAN, NOISE, METRIC, [RANKING[0], RANKING[0]], 2),
     ValueError, "more than once"),
    ("verify: layer out of range", lambda: atp.verify(MODEL, CLEAN, NOISE, METRIC, [("q", 2, 0, 0)], 1),
     ValueError, "bad node"),
    ("verify: position out of range", lambda: atp.verify(MODEL, CLEAN, NOISE, METRIC, [("q", 0, 5, 0)], 1),
     ValueError, "bad node"),
    ("verify: head out of range", lambda: atp.verify(MODEL, CLEAN, NOISE, METRIC, [("z", 0, 0, 2)], 1),
     ValueError, "bad node"),
    ("verify: float index", lambda: atp.verify(MODEL, CLEAN, NOISE, METRIC, [("q", 0, 1.0, 0)], 1),
     ValueError, "integer indices"),
    ("verify: mixed node forms",
     lambda: atp.verify(MODEL, CLEAN, NOISE, METRIC, [("q", 0, 1, 0), ("q", 0, 1)], 2),
     ValueError, "all of one form"),
    ("verify: float budget", lambda: atp.verify(MODEL, CLEAN, NOISE, METRIC, RANKING, 2.0),
     TypeError, "budget must be an integer"),
    ("verify: budget above the node count", lambda: atp.verify(MODEL, CLEAN, NOISE, METRIC, RANKING[:3], 4),
     ValueError, "budget must be between 0 and the number of nodes given (3)"),
    ("activation_patching: float chunk_size",
     lambda: atp.activation_patching(MODEL, CLEAN, NOISE, METRIC, chunk_size=8.0),
     TypeError, "chunk_size must be an integer"),
    ("false_negative_bound: K above the node count", lambda: atp.false_negative_bound(
        MODEL, CLEAN, NOISE, METRIC, RANKING[:5], K=6),
     ValueError, "K must be between 0 and the number of nodes given (5)"),
    ("rank_nodes: per-pair scores of whole-position nodes (B, L, U)", lambda: atp.rank_nodes(
        atp.atp_star(MODEL, CLEAN, NOISE, METRIC, positions="all")), ValueError, "per-pair results"),
    ("patch_nodes: a position out of range",
     lambda: atp.patch_nodes(MODEL, CLEAN, NOISE, METRIC, [("z", 0, -1, 0)]),
     ValueError, "bad node"),
    ("false_negative_bound: (nodes, values) passed whole", lambda: atp.false_negative_bound(
        MODEL, CLEAN, NOISE, METRIC, (RANKING, VALUES), K=3), TypeError, "rank_nodes(...)[0]"),
    ("atp_estimates_reference: metric not row-wise", lambda: atp.atp_estimates_reference(
        MODEL, CLEAN, NOISE, not_row_wise), ValueError, "not row-wise"),
    ("model call: hooks as a list", lambda: MODEL(CLEAN, hooks=[lambda t: None]),
     TypeError, "hooks must be a dict"),
    ("model call: a hook that is not callable", lambda: MODEL(CLEAN, hooks={"blocks.0.attn.hook_z": 3}),
     TypeError, "not callable"),
]


@pytest.mark.parametrize("what, call, error, words", CASES, ids=[c[0] for c in CASES])
def test_a_bad_input_gets_a_clear_error(what, call, error, words):
    with pytest.raises(error) as raised:
        call()
    print(f"  {what}: {type(raised.value).__name__}: {raised.value}")
    assert words in str(raised.value)


def test_token_ids_of_any_integer_dtype_give_the_same_metric():
    logits = torch.randn(2, 3, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    want = atp.neg_log_prob([1, 2])(logits)
    for ids in (torch.tensor([1, 2], dtype=torch.uint8), torch.tensor([1, 2], dtype=torch.int32)):
        got = atp.neg_log_prob(ids)(logits)
        print(f"  neg_log_prob with {ids.dtype} ids: equal to int64 ids: {torch.equal(got, want)}")
        assert torch.equal(got, want)


def test_kinds_as_a_set_or_one_name_give_the_same_answer_as_a_tuple():
    as_set = atp.atp_estimates(MODEL, CLEAN, NOISE, METRIC, kinds={"k", "q"})
    as_tuple = atp.atp_estimates(MODEL, CLEAN, NOISE, METRIC, kinds=("q", "k"))
    assert list(as_set) == ["q", "k"]
    print("  kinds={'k', 'q'} == kinds=('q', 'k'):",
          all(torch.equal(as_set[k], as_tuple[k]) for k in as_tuple))
    assert all(torch.equal(as_set[k], as_tuple[k]) for k in as_tuple)
    by_name = atp.atp_estimates(MODEL, CLEAN, NOISE, METRIC, kinds="neuron")
    as_one = atp.atp_estimates(MODEL, CLEAN, NOISE, METRIC, kinds=("neuron",))
    print("  kinds='neuron' == kinds=('neuron',):", list(by_name) == ["neuron"] and torch.equal(
        by_name["neuron"], as_one["neuron"]))
    assert list(by_name) == ["neuron"] and torch.equal(by_name["neuron"], as_one["neuron"])


def test_no_call_changes_the_callers_tensors_or_the_model_weights():
    clean, noise = CLEAN.clone(), NOISE.clone()
    weights = {k: v.clone() for k, v in MODEL.state_dict().items()}
    atp.activation_patching(MODEL, clean, noise, METRIC)
    for unit in ("layer", "sublayer"):
        atp.atp_star(MODEL, clean, noise, METRIC, unit=unit)
    atp.false_negative_bound(MODEL, clean, noise, METRIC, RANKING, K=5, n_samples=30, p=0.3)
    atp.activation_patching_reference(MODEL, clean, noise, METRIC, kinds=("z",))
    unchanged = torch.equal(clean, CLEAN) and torch.equal(noise, NOISE) and all(
        torch.equal(v, weights[k]) for k, v in MODEL.state_dict().items())
    print(f"  tokens and weights unchanged after every public call: {unchanged}")
    assert unchanged


# --- the loader: a damaged checkpoint directory names the file


def damaged_checkpoint(tmp_path, damage):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, n_positions=8, vocab_size=12)
    hf = transformers.GPT2LMHeadModel(config)
    hf.save_pretrained(tmp_path)
    damage(tmp_path)
    return str(tmp_path)


def truncate_safetensors(d):
    path = os.path.join(d, "model.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def garbage_bin(d):
    os.remove(os.path.join(d, "model.safetensors"))
    open(os.path.join(d, "pytorch_model.bin"), "wb").write(b"this is not a checkpoint")


def invalid_json(d):
    open(os.path.join(d, "config.json"), "w").write("{ not json")


def config_without_n_layer(d):
    path = os.path.join(d, "config.json")
    cfg = json.load(open(path))
    del cfg["n_layer"]
    json.dump(cfg, open(path, "w"))


@pytest.mark.parametrize("damage, words", [(truncate_safetensors, "model.safetensors could not be read"),
                                           (garbage_bin, "pytorch_model.bin could not be read"),
                                           (invalid_json, "config.json is not valid JSON"),
                                           (config_without_n_layer, "config.json lacks ['n_layer']")])
def test_a_damaged_checkpoint_gets_an_error_naming_the_file(tmp_path, damage, words):
    directory = damaged_checkpoint(tmp_path, damage)
    with pytest.raises(ValueError) as raised:
        GPT.from_pretrained(directory)
    print(f"  {damage.__name__}: {raised.value}")
    assert words in str(raised.value)


# --- the worked example's command line: refused before any work is done


@pytest.mark.parametrize("argv, words", [(["--top", "-1"], "--top must be at least 1"),
                                         (["--top", "0"], "--top must be at least 1"),
                                         (["--top", "2000"], "--top 2000 exceeds"),
                                         (["--verify", "0"], "--verify must be at least 1"),
                                         (["--verify", "960"], "must leave some"),
                                         (["--pairs", "0"], "--pairs must be at least 1")])
def test_the_demo_refuses_impossible_arguments_before_running(argv, words, capsys):
    with pytest.raises(SystemExit):
        demo.main(argv)
    captured = capsys.readouterr()
    print(f"  {' '.join(argv)}: {captured.err.strip().splitlines()[-1]}")
    assert words in captured.err and "time:" not in captured.out


def test_the_demo_refuses_zero_pairs_on_a_gpt2_directory(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, n_positions=32,
                                                         vocab_size=50257)).save_pretrained(tmp_path)
    with pytest.raises(SystemExit):
        demo.main(["--model", str(tmp_path), "--pairs", "0"])
    assert "--pairs must be at least 1" in capsys.readouterr().err
