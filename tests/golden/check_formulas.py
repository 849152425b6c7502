"""Check the golden logits in this folder against the position rules written in
shared/FACTS.md section 2, using transformers 5 and a plain dense attention.

Standalone script (not collected by pytest, does not import oodlens):

    .venv/bin/python tests/golden/check_formulas.py

For every golden file it
  1. rebuilds a transformers-5 LlamaForCausalLM from the stored sizes and state
     dict and compares its ordinary forward with the stored vanilla logits;
  2. recomputes the whole model with a dense n x n attention in which every
     (query i, key j) pair gets the query/key positions, visibility and query
     scale that the rule prescribes, rotating the raw q and k with the model's
     own rotary module, and compares with the stored official logits.
Exits non-zero if any difference exceeds its tolerance.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

HERE = Path(__file__).resolve().parent
VANILLA_TOL = 1e-5
FORMULA_TOL = 1e-4


def load(path: Path):
    z = np.load(path, allow_pickle=False)
    sd = {k[len("state_dict/") :]: torch.from_numpy(z[k]) for k in z.files if k.startswith("state_dict/")}
    return dict(
        state_dict=sd,
        config=json.loads(str(z["config_json"])),
        params=json.loads(str(z["params_json"])),
        input_ids=torch.from_numpy(z["input_ids"]),
        logits=torch.from_numpy(z["logits"]),
        vanilla=torch.from_numpy(z["vanilla_logits"]),
        logits_decode=torch.from_numpy(z["logits_decode"]) if "logits_decode" in z.files else None,
    )


def build(cfg: dict, sd: dict) -> LlamaForCausalLM:
    config = LlamaConfig(**cfg)
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).eval().float()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all("inv_freq" in k for k in missing), (missing, unexpected)
    return model


# ---- position rules: for query i, return per-key (q_pos, k_pos, visible) and a query scale ----


def rule_vanilla(i: int, n: int, p: dict):
    j = torch.arange(n, dtype=torch.float64)
    return torch.full((n,), float(i), dtype=torch.float64), j, j <= i, 1.0


def rule_streaming(i: int, n: int, p: dict):
    S, R = p["sinks"], p["window"] + 1  # window W kept after each step -> R = W + 1 recent incl. query
    j = torch.arange(n)
    visible = (j <= i) & ((j < S) | (i - j < R))
    qp = min(i, S + R - 1)
    recent = i - j < R
    k_pos = torch.where(recent, qp - (i - j), j).to(torch.float64)
    return torch.full((n,), float(qp), dtype=torch.float64), k_pos, visible, 1.0


def rule_selfextend(i: int, n: int, p: dict):
    G, W, base = p["group_size"], p["window"], p.get("scale_base", -1)
    j = torch.arange(n)
    neighbour = (i - j) < W
    gq = math.floor(i / G) + W - W / G
    f64 = torch.float64
    q_pos = torch.where(neighbour, torch.tensor(float(i), dtype=f64), torch.tensor(gq, dtype=f64))
    k_pos = torch.where(neighbour, j.to(f64), torch.div(j, G, rounding_mode="floor").to(f64))
    scale = max(1.0, math.log(i + 1) / math.log(base)) if base and base > 0 else 1.0
    return q_pos, k_pos, j <= i, scale


RULES = {"vanilla": rule_vanilla, "streamingllm": rule_streaming, "selfextend": rule_selfextend}


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def rope(model, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x [H, n, D] rotated at float positions pos [n] by the model's own rotary module."""
    cos, sin = model.model.rotary_emb(x, pos.to(torch.float32)[None])  # [1, n, D]
    return x * cos[0] + rotate_half(x) * sin[0]


@torch.no_grad()
def dense_forward(model, ids: torch.Tensor, rule, params: dict) -> torch.Tensor:
    cfg = model.config
    n, Hq, Hk, D = ids.numel(), cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    rows = [rule(i, n, params) for i in range(n)]
    h = model.model.embed_tokens(ids)  # [n, hidden]
    for layer in model.model.layers:
        att = layer.self_attn
        x = layer.input_layernorm(h)
        q = att.q_proj(x).view(n, Hq, D).transpose(0, 1)  # [Hq, n, D], raw (unrotated)
        k = att.k_proj(x).view(n, Hk, D).transpose(0, 1)
        v = att.v_proj(x).view(n, Hk, D).transpose(0, 1)
        k = k.repeat_interleave(Hq // Hk, dim=0)
        v = v.repeat_interleave(Hq // Hk, dim=0)
        out = torch.empty(Hq, n, D)
        for i, (q_pos, k_pos, visible, qscale) in enumerate(rows):
            # query i, rotated at the position the rule uses for each key
            qi = rope(model, q[:, i : i + 1].expand(Hq, n, D), q_pos)
            kj = rope(model, k, k_pos)
            s = (qi * qscale * kj).sum(-1) / math.sqrt(D)  # [Hq, n]
            s = s.masked_fill(~visible, float("-inf"))
            out[:, i] = torch.einsum("hj,hjd->hd", torch.softmax(s, dim=-1), v)
        h = h + att.o_proj(out.transpose(0, 1).reshape(n, Hq * D))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(model.model.norm(h))


def main() -> int:
    torch.manual_seed(0)
    ok = True
    files = sorted(HERE.glob("*.npz"))
    if not files:
        print("no golden files found")
        return 1
    for path in files:
        g = load(path)
        model = build(g["config"], g["state_dict"])
        ids = g["input_ids"]
        with torch.no_grad():
            van = model(ids[None]).logits[0]
        d_van = (van - g["vanilla"]).abs().max().item()
        method = g["params"]["method"]
        mine = dense_forward(model, ids, RULES[method], g["params"])
        d_rule = (mine - g["logits"]).abs().max().item()
        line = f"{path.name:36s} vanilla reload {d_van:.2e}   formula vs official {d_rule:.2e}"
        if g["logits_decode"] is not None:
            d_dec = (mine - g["logits_decode"]).abs().max().item()
            line += f"   formula vs official decode {d_dec:.2e}"
            ok &= d_dec <= FORMULA_TOL
        if method != "vanilla":
            line += f"   (official vs vanilla {(g['logits'] - g['vanilla']).abs().max().item():.2f})"
        print(line)
        ok &= d_van <= VANILLA_TOL and d_rule <= FORMULA_TOL
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
