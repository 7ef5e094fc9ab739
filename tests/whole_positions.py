"""Part I's estimates for whole-position nodes (kind, layer, unit), a unit at every position at once,
composed from atp_minimal's Part I pieces, for the twin tests of Part II's positions="all":
  - AtP is linear in the node, so a unit's estimate at every position is the sum of its per-position ones;
  - the query fix recomputes each softmax row alone, and rows do not interact: the sum again;
  - moving every key of a head moves every logit of every row at once: atp.key_fix_all_positions, on the
    clean run's q and k and dL/dpattern (the literal recomputation)."""

import torch

import atp_minimal as atp


def whole_position_atp(model, clean, noise, metric, kinds=atp.KINDS):
    """AtP of whole-position nodes: kind -> (B, L, U)."""
    return {k: v.sum(2) for k, v in atp.atp_estimates_reference(model, clean, noise, metric, kinds).items()}


def whole_position_estimates(model, clean, noise, metric, kinds=atp.KINDS):
    """AtP with the QK fix of whole-position nodes: kind -> (B, L, U)."""
    est = {k: v.sum(2) for k, v in atp.atp_qk_fix_reference(model, clean, noise, metric, kinds).items()}
    if "k" in kinds:
        L = model.config.n_layer
        pattern = [f"blocks.{l}.attn.hook_pattern" for l in range(L)]
        names = [n for l in range(L) for n in (atp.site("q", l), atp.site("k", l), pattern[l])]
        with torch.no_grad():
            _, noise_acts = atp.run_with_cache(model, noise, names)
        clean_acts, grads = atp.clean_gradients(model, clean, metric, names)
        est["k"] = torch.stack([atp.key_fix_all_positions(
            clean_acts[atp.site("q", l)], clean_acts[atp.site("k", l)], noise_acts[atp.site("k", l)],
            grads[pattern[l]], model.attention_scale(l)) for l in range(L)], 1)  # (B, L, Hkv)
    return est
