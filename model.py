"""
GPT-2 in plain torch, with every activation the AtP* paper talks about exposed as a named site.

References:
1) the AtP* paper: Kramar, Lieberum, Shah, Nanda (2024), https://arxiv.org/abs/2403.00745
2) Hugging Face's GPT-2, which this file matches number for number:
   https://github.com/huggingface/transformers/blob/main/src/transformers/models/gpt2/modeling_gpt2.py
3) site names follow TransformerLens (blocks.{l}.attn.hook_z, blocks.{l}.mlp.hook_post, ...)

Dimension legend (used in every shape comment):
  B batch, T query position, S key position, H heads, D d_model (n_embd), Dh d_head,
  M d_mlp (MLP width), V vocab, L layers

Hooks are passed to each call, never registered on modules:

    logits = model(idx, hooks={"blocks.3.attn.hook_z": fn})   # fn(tensor) -> tensor or None

A hook sees the tensor at its site and returns either None (leave it as it is: caching) or a tensor of
the same shape that replaces it for everything downstream (patching; GradDrop's `t.detach()`).
"""

import json
import math
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
Hooks = Optional[Dict[str, Callable[[torch.Tensor], Optional[torch.Tensor]]]]

# --- config


@dataclass
class GPTConfig:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_positions: int = 1024  # context length
    vocab_size: int = 50257
    layer_norm_epsilon: float = 1e-5
    n_inner: Optional[int] = None  # MLP width; GPT-2 uses 4 * n_embd when this is None

    def __post_init__(self):
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")

    @property
    def d_head(self) -> int:
        return self.n_embd // self.n_head

    @property
    def d_mlp(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @classmethod
    def from_hf(cls, hf: dict) -> "GPTConfig":
        """Build from a Hugging Face GPT-2 config.json dict; refuse variants this file does not implement."""
        unsupported = {
            "activation_function": ("gelu_new", "the tanh GELU"),
            "scale_attn_weights": (True, "scaling scores by 1/sqrt(d_head)"),
            "scale_attn_by_inverse_layer_idx": (False, "no per-layer score scaling"),
            "reorder_and_upcast_attn": (False, "no reordered attention"),
            "add_cross_attention": (False, "no cross attention"),
        }
        for key, (want, what) in unsupported.items():
            if key in hf and hf[key] != want:
                raise ValueError(f"config.json has {key}={hf[key]!r}; model.py implements GPT-2 with "
                                 f"{key}={want!r} ({what}) only")
        if hf.get("model_type", "gpt2") != "gpt2":
            raise ValueError(f"config.json is for model_type={hf['model_type']!r}; model.py implements gpt2 "
                             "only")
        return cls(n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                   n_positions=hf["n_positions"], vocab_size=hf["vocab_size"],
                   layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5), n_inner=hf.get("n_inner"))

    def to_hf(self) -> dict:
        """The config.json that Hugging Face's GPT2LMHeadModel reads for this model."""
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": self.n_layer,
                "n_head": self.n_head, "n_embd": self.n_embd, "n_positions": self.n_positions,
                "n_ctx": self.n_positions, "vocab_size": self.vocab_size,
                "layer_norm_epsilon": self.layer_norm_epsilon, "n_inner": self.n_inner,
                "activation_function": "gelu_new", "resid_pdrop": 0.0, "embd_pdrop": 0.0,
                "attn_pdrop": 0.0, "tie_word_embeddings": True}


# --- the hook mechanism


def run_hook(name: str, x: torch.Tensor, hooks: Hooks) -> torch.Tensor:
    """Pass activation x through the hook for site `name`, if the caller gave one."""
    if not hooks or name not in hooks:
        return x
    out = hooks[name](x)
    if out is None:  # a reading hook (caching, printing) leaves x untouched
        return x
    if not isinstance(out, torch.Tensor) or out.shape != x.shape or out.dtype != x.dtype:
        got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"hook for {name} must return None or a tensor of shape {tuple(x.shape)} "
                         f"and dtype {x.dtype}, got {got}")
    return out


# --- the model


class Conv1D(nn.Module):
    """GPT-2's linear layer. Unlike nn.Linear the weight is stored (in, out), so y = x @ W + b
    with no transpose; keeping that layout lets real checkpoints load without renaming or copying."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x):
        return x @ self.weight + self.bias


def gelu_new(x):
    # GPT-2's tanh approximation of GELU (Hugging Face calls it "gelu_new"). nn.GELU() defaults to the
    # exact erf form, which differs by ~1e-3 and would not match the checkpoints.
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.d_head = cfg.n_head, cfg.d_head
        self.scale = cfg.d_head ** -0.5  # scores are q.k * scale, exactly as Hugging Face computes them
        self.c_attn = Conv1D(cfg.n_embd, 3 * cfg.n_embd)  # q, k, v for all heads in one product
        self.c_proj = Conv1D(cfg.n_embd, cfg.n_embd)  # W_O

    def forward(self, x, prefix: str, hooks: Hooks, past_kv=None):
        B, T, D = x.shape
        H, Dh = self.n_head, self.d_head
        q, k, v = self.c_attn(x).split(D, dim=2)  # each (B, T, D)
        q = run_hook(prefix + "hook_q", q.view(B, T, H, Dh), hooks)  # (B, T, H, Dh)
        k = run_hook(prefix + "hook_k", k.view(B, T, H, Dh), hooks)  # (B, S, H, Dh)
        v = run_hook(prefix + "hook_v", v.view(B, T, H, Dh), hooks)  # (B, S, H, Dh)
        if past_kv is not None:  # keys and values of P earlier positions, reused: x holds positions P..
            k = torch.cat([past_kv[0], k], dim=1)  # (B, S, H, Dh), S = P + T
            v = torch.cat([past_kv[1], v], dim=1)
        # Manual attention, never a fused kernel: AtP* needs the scores and the pattern as tensors
        # (the QK fix recomputes this softmax exactly and needs dL/dpattern).
        scores = (q.transpose(1, 2) @ k.permute(0, 2, 3, 1)) * self.scale  # (B, H, T, S)
        S = k.shape[1]
        causal = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)  # (T, S): key s <= query t
        scores = scores.masked_fill(~causal, float("-inf"))
        scores = run_hook(prefix + "hook_attn_scores", scores, hooks)  # (B, H, T, S)
        pattern = run_hook(prefix + "hook_pattern", F.softmax(scores, dim=-1), hooks)  # (B, H, T, S)
        z = (pattern @ v.transpose(1, 2)).transpose(1, 2)  # (B, T, H, Dh): per-head output before W_O
        z = run_hook(prefix + "hook_z", z, hooks)  # (B, T, H, Dh)
        return self.c_proj(z.reshape(B, T, D))  # (B, T, D)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = Conv1D(cfg.n_embd, cfg.d_mlp)
        self.c_proj = Conv1D(cfg.d_mlp, cfg.n_embd)

    def forward(self, x, prefix: str, hooks: Hooks):
        pre = run_hook(prefix + "hook_pre", self.c_fc(x), hooks)  # (B, T, M)
        post = run_hook(prefix + "hook_post", gelu_new(pre), hooks)  # (B, T, M): the neurons
        return self.c_proj(post)  # (B, T, D)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x, layer: int, hooks: Hooks, past_kv=None):
        # GPT-2 blocks are sequential: the MLP reads the residual stream after attention has written.
        p = f"blocks.{layer}."
        x = run_hook(p + "hook_resid_pre", x, hooks)  # (B, T, D)
        attn_out = run_hook(p + "hook_attn_out", self.attn(self.ln_1(x), p + "attn.", hooks, past_kv), hooks)
        x = run_hook(p + "hook_resid_mid", x + attn_out, hooks)  # (B, T, D)
        mlp_out = run_hook(p + "hook_mlp_out", self.mlp(self.ln_2(x), p + "mlp.", hooks), hooks)
        return run_hook(p + "hook_resid_post", x + mlp_out, hooks)  # (B, T, D)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        # Module names are Hugging Face's, so a checkpoint's state_dict loads without a rename table.
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.n_positions, cfg.n_embd),
            h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
            ln_f=nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon),
        ))
        nn.init.normal_(self.transformer.wte.weight, std=0.02)
        nn.init.normal_(self.transformer.wpe.weight, std=0.01)
        # model.py is forward-only: it has no training loop and no dropout, so train and eval mode compute
        # the same. (toy_ioi.py trains a GPT through this forward pass with autograd.)
        self.eval()

    def site_names(self) -> List[str]:
        """Every hookable site, in forward order."""
        names = ["hook_embed", "hook_pos_embed"]
        for l in range(self.config.n_layer):
            p = f"blocks.{l}."
            names += [p + "hook_resid_pre"]
            names += [p + "attn." + s for s in ("hook_q", "hook_k", "hook_v", "hook_attn_scores",
                                                "hook_pattern", "hook_z")]
            names += [p + "hook_attn_out", p + "hook_resid_mid", p + "mlp.hook_pre", p + "mlp.hook_post",
                      p + "hook_mlp_out", p + "hook_resid_post"]
        return names + ["ln_final.hook_normalized"]

    def check_tokens(self, idx: torch.Tensor):
        """Refuse token ids that would silently index out of range or past the context."""
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype not in (torch.long, torch.int):
            raise ValueError("token ids must be an integer tensor of shape (B, T)")
        T = idx.shape[1]
        if T == 0 or T > self.config.n_positions:
            raise ValueError(f"sequence length {T} must be between 1 and "
                             f"n_positions={self.config.n_positions}")
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}); "
                             f"got min {int(idx.min())}, max {int(idx.max())}")

    def check_hooks(self, hooks: Hooks):
        if hooks is None:
            return
        if not isinstance(hooks, dict):
            raise TypeError(f"hooks must be a dict {{site name: fn(tensor) -> tensor or None}}, "
                            f"got {type(hooks).__name__}")
        unknown = sorted(set(hooks) - set(self.site_names()))
        if unknown:
            raise KeyError(f"unknown hook site(s) {unknown}; model.site_names() lists the valid ones")
        not_callable = sorted(name for name, fn in hooks.items() if not callable(fn))
        if not_callable:
            raise TypeError(f"the hooks for {not_callable} are not callable: each must be "
                            "fn(tensor) -> tensor or None")

    def attention_scale(self, layer: int) -> float:
        """The factor in scores = (q . k) * scale: 1/sqrt(d_head) in every layer of GPT-2."""
        return self.transformer.h[layer].attn.scale

    def forward(self, idx: torch.Tensor, hooks: Hooks = None) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, V) at every position."""
        self.check_tokens(idx)
        self.check_hooks(hooks)
        B, T = idx.shape
        tok = run_hook("hook_embed", self.transformer.wte(idx), hooks)  # (B, T, D)
        # A real (B, T, D) copy, not a stride-0 view, so a hook can patch one row in place safely.
        pos = self.transformer.wpe(torch.arange(T, device=idx.device)).expand(B, T, -1).contiguous()
        pos = run_hook("hook_pos_embed", pos, hooks)
        return self.forward_from(0, tok + pos, hooks)

    def forward_from(self, layer: int, resid_pre: torch.Tensor, hooks: Hooks = None, past_kv=None,
                     last_position_only: bool = False) -> torch.Tensor:
        """Run blocks layer..L-1 and the unembedding on a given residual stream (B, T, D) -> (B, T, V).
        Exhaustive patching uses this to resume from the cached clean stream at the patched layer.
        past_kv: optional [(k, v) each (B, P, H, Dh)] for layers layer..L-1, the keys and values of P
        earlier positions; resid_pre then holds positions P..P+T-1 only, and so do the logits. Attention
        is causal, so a patch at position >= P leaves everything before P as it was: reuse it.
        last_position_only: unembed only the last position, (B, 1, V), for metrics that read nothing else."""
        if not 0 <= layer <= self.config.n_layer:
            raise ValueError(f"layer must be in [0, {self.config.n_layer}], got {layer}")
        if resid_pre.dim() != 3 or resid_pre.shape[-1] != self.config.n_embd:
            raise ValueError(f"resid_pre must be (B, T, {self.config.n_embd}), got {tuple(resid_pre.shape)}")
        self.check_hooks(hooks)
        if past_kv is not None and len(past_kv) != self.config.n_layer - layer:
            raise ValueError(f"past_kv needs one (k, v) pair per layer from {layer} on, got {len(past_kv)}")
        x = resid_pre
        for l in range(layer, self.config.n_layer):
            x = self.transformer.h[l](x, l, hooks, None if past_kv is None else past_kv[l - layer])
        x = run_hook("ln_final.hook_normalized", self.transformer.ln_f(x), hooks)  # (B, T, D)
        if last_position_only:
            x = x[:, -1:]  # (B, 1, D)
        # Tied unembedding: GPT-2 reuses the token embedding matrix, so logits = x @ wte^T.
        return x @ self.transformer.wte.weight.T  # (B, T, V)

    # --- loading Hugging Face checkpoints

    @classmethod
    def from_pretrained(cls, path_or_name: str) -> "GPT":
        """Load a Hugging Face GPT-2 checkpoint: a directory with config.json and model.safetensors or
        pytorch_model.bin, or a hub name ("gpt2", "gpt2-medium", ...) when huggingface_hub is installed
        and the machine is online. The files are only read, never written."""
        directory = path_or_name if os.path.isdir(path_or_name) else _download(path_or_name)
        config_path = os.path.join(directory, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{directory} has no config.json; expected a Hugging Face GPT-2 "
                                    "directory")
        try:
            with open(config_path) as f:
                hf = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{config_path} is not valid JSON ({e})") from None
        if not isinstance(hf, dict):
            raise ValueError(f"{config_path} must hold a JSON object, got {type(hf).__name__}")
        needed = [k for k in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size") if k not in hf]
        if needed:
            raise ValueError(f"{config_path} lacks {needed}: not a Hugging Face GPT-2 config")
        cfg = GPTConfig.from_hf(hf)
        model = cls(cfg)
        model.load_hf_state_dict(_read_weights(directory))
        return model

    def load_hf_state_dict(self, sd: Dict[str, torch.Tensor]):
        """Copy a Hugging Face GPT-2 state_dict into this model, checking every key and shape."""
        sd = {(k if k.startswith("transformer.") or k.startswith("lm_head.") else "transformer." + k): v
              for k, v in sd.items()}
        # Causal-mask buffers of older checkpoints are not weights.
        sd = {k: v for k, v in sd.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        lm_head = sd.pop("lm_head.weight", None)  # tied to wte in GPT-2; checked below, not loaded
        ours = self.state_dict()
        missing = sorted(set(ours) - set(sd))
        unexpected = sorted(set(sd) - set(ours))
        wrong = sorted(f"{k}: checkpoint {tuple(sd[k].shape)}, model {tuple(ours[k].shape)}"
                       for k in set(ours) & set(sd) if sd[k].shape != ours[k].shape)
        if missing or unexpected or wrong:
            raise ValueError("checkpoint does not match the GPT-2 config:"
                             + (f"\n  missing keys: {missing}" if missing else "")
                             + (f"\n  unexpected keys: {unexpected}" if unexpected else "")
                             + (f"\n  wrong shapes: {wrong}" if wrong else ""))
        wte = sd["transformer.wte.weight"]
        if lm_head is not None and (lm_head.shape != wte.shape or not torch.equal(lm_head, wte)):
            raise ValueError("checkpoint's lm_head.weight differs from transformer.wte.weight; "
                             "GPT-2 ties them and model.py only supports the tied form")
        with torch.no_grad():
            for k, v in ours.items():
                v.copy_(sd[k].to(v.dtype))


def _read_weights(directory: str) -> Dict[str, torch.Tensor]:
    st = os.path.join(directory, "model.safetensors")
    bin_ = os.path.join(directory, "pytorch_model.bin")
    if os.path.isfile(st):
        from safetensors.torch import load_file  # lazy: only needed for this file format
        try:
            return load_file(st)
        except Exception as e:  # truncated or not a safetensors file at all
            raise ValueError(f"{st} could not be read as a safetensors file "
                             f"({type(e).__name__}: {e})") from None
    if os.path.isfile(bin_):
        try:
            sd = torch.load(bin_, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated, garbage, or a pickle of something other than tensors
            raise ValueError(f"{bin_} could not be read as a PyTorch state_dict "
                             f"({type(e).__name__})") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise ValueError(f"{bin_} does not hold a state_dict of tensors")
        return sd
    raise FileNotFoundError(f"{directory} has neither model.safetensors nor pytorch_model.bin")


def _download(name: str) -> str:
    """Resolve a hub name to a local directory through huggingface_hub, with a clear error offline."""
    how = (f"'{name}' is not a local directory. To use it, download it where you have internet, e.g. "
           f"`python -c \"from transformers import GPT2LMHeadModel as M; M.from_pretrained('{name}')"
           f".save_pretrained('{name}-local')\"`, then pass that directory.")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(how + " (huggingface_hub is not installed, so hub names cannot be fetched)")
    try:
        return snapshot_download(name, allow_patterns=["config.json", "model.safetensors"])
    except Exception as e:  # offline, unknown repo, gated repo...: all end the same way for the user
        raise FileNotFoundError(how + f" (fetching it from the hub failed: {type(e).__name__})") from e


# --- tokenizer

TOKENIZER_FILE = os.path.join(HERE, "assets", "gpt2.tiktoken.gz")
TOKENIZER_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"  # of the unzipped file


def get_tokenizer():
    """tiktoken's GPT-2 encoding, built offline from the vendored BPE ranks (assets/, MIT, from
    openai-whisper's gpt2.tiktoken, identical to r50k_base). Checked against its sha256."""
    import base64, gzip, hashlib
    import tiktoken  # lazy: model.py itself needs only torch

    with gzip.open(TOKENIZER_FILE, "rb") as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != TOKENIZER_SHA256:
        raise ValueError(f"{TOKENIZER_FILE} is corrupt (sha256 mismatch)")
    ranks = {base64.b64decode(tok): int(rank)  # each line: "<base64 token> <rank>"
             for tok, rank in (line.split() for line in data.splitlines() if line)}
    return tiktoken.Encoding(
        name="gpt2",
        # GPT-2's pre-tokenisation regex, as tiktoken writes it for r50k_base
        pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""",
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": 50256},
        explicit_n_vocab=50257,
    )
