"""Exploration, not part of the format: how to spend ~70 KB of extra weight bits (issue 12), run by the unchanged
fixed engine code on int16 weight arrays.

    python benchmarks/wide_weights.py CANDIDATE [CANDIDATE ...] [--prompts FILE ...]

A candidate is comma-separated settings: `q=1,k=1,v=1,o=1,1=3,3=3,2=3` gives the extra bits per weight kind (wq,
wk, wv, wo, w1, w3, w2; default 0), `emb=res` makes the embedding lookup add the classifier residual row (zero
bytes, shared classifier), `round=nearest` rounds the wide weights to nearest instead of calibrated's method,
`cal=2001` rounds on the stories of seeds 2001-2008 instead of calibrate.py's 1001-1008, `act=l1` bounds
act_bits by each matrix's largest row L1 norm instead of n times its largest weight, `act=15` forces act_bits
(a diagnostic: the 32-bit sums are then not proven not to overflow). `int8` alone is the landed calibrated model.

Measured (docs/precision.md has the table):

    python benchmarks/wide_weights.py int8 emb=res q=2,k=2,v=2,o=2,1=3,3=3,2=2,emb=res,act=l1 ... \
        --prompts benchmarks/heldout_prompts.txt

A weight with e extra bits is the integer w' (|w'| <= 127 * 2**e) on the row step s' / 2**S' with
s' = round(absmax / (127 * 2**e) * 2**S') and S' = S + (the matrix's largest e), capped at 31; the file would
store w' >> e as the int8 plane and w' & (2**e - 1) as e low bits. The engine multiplies int16 w' exactly as it
multiplies int8 q today. Calibration text stays the model's own samples (calibrate.py), disjoint from every
evaluation prompt.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

import sectorllm.quantize as quantize
from sectorllm.api import checkpoint_tokenizer
from sectorllm.calibrate import calibration_texts, input_grams
from sectorllm.checkpoint import load_checkpoint
from sectorllm.engines.fixed import FixedEngine
from sectorllm.engines.float32 import FloatEngine
from sectorllm.evaluate import BUILTIN_PROMPTS, LOGIT_ONE, _logits, eval_texts, reference_text, score, teacher_forced
from sectorllm.hub import resolve_model
from sectorllm.packed import QuantizedMatrix, packed_bytes

KINDS = ("q", "k", "v", "o", "1", "3", "2")
MATRIX_KINDS = {"wqkv": ("q", "k", "v"), "wo": ("o",), "w13": ("1", "3"), "w2": ("2",)}
WATCH = (185, 235, 420)  # BOS positions where the float engine's top two logits nearly tie


def parse(spec: str) -> dict:
    """A candidate's settings from its comma-separated text (module docstring)."""
    out = {"bits": dict.fromkeys(KINDS, 0), "emb": "int8", "round": "calibrated", "act": "worst", "cal": "1001"}
    for item in filter(None, spec.split(",")):
        if item == "int8":
            continue
        key, value = item.split("=")
        if key in KINDS:
            out["bits"][key] = int(value)
        else:
            out[key] = value
    return out


def row_kinds(name: str, c) -> list[tuple[str, int]]:
    """The weight kinds of a packed matrix's rows, with their row counts, in row order."""
    return {"wqkv": [("q", c.dim), ("k", c.kv_dim), ("v", c.kv_dim)], "wo": [("o", c.dim)],
            "w13": [("1", c.hidden_dim), ("3", c.hidden_dim)], "w2": [("2", c.dim)]}[name]


def extra_bytes(bits: dict, c) -> int:
    """The low-bit planes' bytes (each kind's plane packed e bits per weight), without section padding."""
    count = {"q": c.dim * c.dim, "k": c.kv_dim * c.dim, "v": c.kv_dim * c.dim, "o": c.dim * c.dim,
             "1": c.hidden_dim * c.dim, "3": c.hidden_dim * c.dim, "2": c.dim * c.hidden_dim}
    return sum(-(-c.n_layers * count[k] * bits[k] // 8) for k in KINDS)


def widened(checkpoint, packed, grams, cand: dict):
    """The packed model with the candidate's wide layer matrices (int16 arrays), embedding and act_bits."""
    c, w = checkpoint.config, checkpoint.weights
    f64 = lambda a: np.asarray(a, dtype=np.float64)  # noqa: E731
    exact = {"wqkv": np.concatenate([f64(w.wq) / np.sqrt(c.head_size), f64(w.wk), f64(w.wv)], axis=1),
             "wo": f64(w.wo), "w13": np.concatenate([f64(w.w1), f64(w.w3)], axis=1), "w2": f64(w.w2)}
    bits = cand["bits"]
    matrices = {}
    for name, want in exact.items():
        m = getattr(packed, name)
        e = np.concatenate([np.full(n, bits[k]) for k, n in row_kinds(name, c)])
        if not e.any():
            matrices[name] = m
            continue
        shift = min(31, m.shift + int(e.max()))
        top = (quantize.Q << e).astype(np.float64)  # per row: |w'| <= 127 * 2**e
        s = np.round(np.abs(want).max(axis=-1) / top * 2.0 ** shift).astype(np.int64)
        assert s.max() < 2 ** 31
        step = np.where(s == 0, 1.0, s / 2.0 ** shift)
        if cand["round"] == "nearest":
            q = np.clip(np.round(want / step[..., None]), -top[:, None], top[:, None])
        else:
            quantize.Q = top  # round_to_inputs clips to +-Q, here per row
            try:
                q = np.stack([quantize.round_to_inputs(want[l], step[l], grams[name][l]) for l in range(c.n_layers)])
            finally:
                quantize.Q = 127
        matrices[name] = QuantizedMatrix(q.astype(np.int16), s.astype(np.int32), shift)
    if cand["emb"] == "res":  # x = (q s >> (S - 16)) + (r s_r >> (S_r - 16)): held as an int32 "matrix" with s = 1
        e, r = packed.token_embedding, packed.wcls_residual
        x = ((e.q.astype(np.int64) * e.s[:, None]) >> (e.shift - 16)) + ((r.q.astype(np.int64) * r.s[:, None])
                                                                         >> (r.shift - 16))
        matrices["token_embedding"] = QuantizedMatrix(x.astype(np.int32), np.ones(c.vocab_size, np.int32), 16)
    wide = {n: matrices.get(n, getattr(packed, n)) for n in MATRIX_KINDS}
    if cand["act"] == "l1":  # |act| <= 2**b, so |sum| <= 2**b * the row's L1 norm
        bound = lambda names: max(int(np.abs(wide[n].q.astype(np.int64)).sum(-1).max()) for n in names)  # noqa
        dim_l1 = max(bound(("wqkv", "wo", "w13")), int(np.abs(packed.wcls.q.astype(np.int64)).sum(-1).max()),
                     int(np.abs(packed.wcls_residual.q.astype(np.int64)).sum(-1).max()))
        bits_dim, bits_hidden = l1_bits(dim_l1), l1_bits(bound(("w2",)))
    elif cand["act"].isdigit():  # diagnostic only: sums may overflow 32 bits (the model would wrap them)
        bits_dim = bits_hidden = int(cand["act"])
    else:
        wmax = lambda names: max(int(np.abs(wide[n].q.astype(np.int64)).max()) for n in names)  # noqa
        bits_dim = quantize.act_bits(c.dim, max(127, wmax(("wqkv", "wo", "w13"))))
        bits_hidden = quantize.act_bits(c.hidden_dim, wmax(("w2",)))
    for n in MATRIX_KINDS if not cand["act"].isdigit() else ():
        assert wide[n].shift >= 33 - min(bits_dim, bits_hidden), (n, wide[n].shift)
    quant = dataclasses.replace(packed.quant, act_bits_dim=bits_dim, act_bits_hidden=bits_hidden)
    return dataclasses.replace(packed, quant=quant, **matrices)


def l1_bits(l1: int) -> int:
    """The largest b <= 15 with 2**b * l1 < 2**31: inputs of at most 2**b then cannot overflow a 32-bit sum."""
    b = 15
    while b > 1 and l1 << b > (1 << 31) - 1:
        b -= 1
    return b


def weight_error(checkpoint, model) -> str:
    """Relative RMS error of each kind's weights (wide or int8) against the float checkpoint."""
    c = checkpoint.config
    out = []
    for name in MATRIX_KINDS:
        m = getattr(model, name)
        deq = m.q.astype(np.float64) * (m.s.astype(np.float64) / 2.0 ** m.shift)[..., None]
        lo = 0
        for k, n in row_kinds(name, c):
            want = {"q": np.asarray(checkpoint.weights.wq) / np.sqrt(c.head_size), "k": checkpoint.weights.wk,
                    "v": checkpoint.weights.wv, "o": checkpoint.weights.wo, "1": checkpoint.weights.w1,
                    "3": checkpoint.weights.w3, "2": checkpoint.weights.w2}[k]
            err = deq[:, lo:lo + n] - want
            out.append(f"{k}:{np.sqrt((err ** 2).sum() / (np.asarray(want, np.float64) ** 2).sum()):.4f}")
            lo += n
    return " ".join(out)


def margins(engine, bos) -> str:
    """At each watched BOS position: the float engine's top-two gap and the fixed engine's for the same two tokens."""
    fixed = _logits(engine, bos.tokens) / LOGIT_ONE
    out = []
    for p in WATCH:
        if p < len(bos.tokens) - 1:
            a, b = np.argsort(-bos.reference[p])[:2]
            out.append(f"@{p}: float {bos.reference[p, a] - bos.reference[p, b]:.4f} "
                       f"fixed {fixed[p, a] - fixed[p, b]:.4f}")
    return "; ".join(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("candidates", nargs="+")
    parser.add_argument("--prompts", action="append", default=[], help="a prompt file (built-in prompts always)")
    args = parser.parse_args()
    path = resolve_model("stories260K")
    checkpoint = load_checkpoint(path)
    c = checkpoint.config
    tokenizer = checkpoint_tokenizer(checkpoint, path)
    sets = {"built-in": list(BUILTIN_PROMPTS)}
    for f in args.prompts:
        sets[f] = [p for p in open(f).read().split("\n") if p.strip()]
    texts = {name: eval_texts(checkpoint, tokenizer, prompts, 128, None) for name, prompts in sets.items()}
    packed = quantize.quantize_model(checkpoint, tokenizer, "calibrated")
    base = packed_bytes(packed)
    stories = calibration_texts(checkpoint)
    grams = input_grams(checkpoint, stories)
    float_engine = FloatEngine(checkpoint)
    calibration = [reference_text(float_engine, tokens, 0, False) for tokens in stories]
    print(f"float file {checkpoint.file_bytes:,} bytes; int8 packed {base:,}; 40% = {0.4 * checkpoint.file_bytes:,.0f}")
    seed_grams = {"1001": grams}
    for spec in args.candidates:
        t0 = time.time()
        cand = parse(spec)
        if cand["cal"] not in seed_grams:
            first = int(cand["cal"])
            seeds = tuple(range(first, first + 8))
            seed_grams[cand["cal"]] = input_grams(checkpoint, calibration_texts(checkpoint, seeds))
        model = widened(checkpoint, packed, seed_grams[cand["cal"]], cand)
        extra = extra_bytes(cand["bits"], c)
        engine = FixedEngine(model, threads=1)
        q = model.quant
        print(f"\n== {spec}: +{extra:,} bytes, {(base + extra) / checkpoint.file_bytes:.1%} of the float file; "
              f"act_bits dim {q.act_bits_dim} hidden {q.act_bits_hidden}; shifts "
              + " ".join(f"{n} {getattr(model, n).shift}" for n in MATRIX_KINDS) + "; max |w'| "
              + " ".join(f"{n} {np.abs(getattr(model, n).q.astype(np.int64)).max()}" for n in MATRIX_KINDS)
              + "; min s' " + " ".join(f"{n} {getattr(model, n).s.min()}" for n in MATRIX_KINDS))
        print("   rel RMS weight error " + weight_error(checkpoint, model))
        for name, (bos, tx) in texts.items():
            prefix_bos, runs, prefixes = score(engine, bos, tx)
            agree = np.concatenate([r.agree for r in runs]).mean()
            kl = np.concatenate([r.kl for r in runs]).mean()
            print(f"   {name:<32} top-1 {agree:.2%}  KL {kl:.6f}  greedy BOS {prefix_bos}  "
                  f"greedy mean {np.mean(prefixes):.1f}")
        runs = [teacher_forced(t, engine) for t in calibration]
        print(f"   {'calibration stories (in-sample)':<32} top-1 {np.concatenate([r.agree for r in runs]).mean():.2%}  "
              f"KL {np.concatenate([r.kl for r in runs]).mean():.6f}")
        print("   BOS near-ties " + margins(engine, texts["built-in"][0]) + f"   ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
