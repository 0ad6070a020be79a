"""Side-by-side speed of llama2.c (run.c, runq.c: -O3, -Ofast -march=native, OpenMP) and our engines.

Builds the given llama2.c checkout's run.c and runq.c into a scratch directory (never into this tree), writes the
models they read (stories260K from $SECTORLLM_MODELS, random-weight 15M and 110M shapes, each also as a
version-2 Q8_0 file for runq.c), runs everything on the same models and prints one table: decode and prefill
tok/s, medians of --repeats runs, and our engines' speed as a multiple of each llama2.c build's.

    python benchmarks/llama2c.py /path/to/llama2.c [--shapes stories260K stories15M stories110M] [--repeats 3]

llama2.c's programs report "achieved tok/s" over all positions after the first. Decode: greedy from BOS for
--decode steps. Prefill: a prompt of --prefill tokens and no generated token (-n prompt length): llama2.c has no
batched prompt path, so this is its speed token by token; ours is one batched pass (sectorllm.bench). Programs take
turns, one run each per round, so that a busy machine's changing load falls on all of them alike; our engines run
on one thread and on --threads.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numba

from sectorllm.api import checkpoint_tokenizer
from sectorllm.bench import bench_engine
from sectorllm.checkpoint import load_checkpoint, random_weights, write_checkpoint
from sectorllm.config import STORIES_SHAPES, ModelConfig
from sectorllm.engines.fixed import FixedEngine, FixedSampler, FixedSamplerConfig
from sectorllm.engines.float32 import FloatEngine
from sectorllm.quantize import quantize_model
from sectorllm.sampling import Sampler, SamplerConfig
from sectorllm.tokenizer import load_tokenizer

BUILDS = {"-O3": ["-O3"], "-Ofast -march=native": ["-Ofast", "-march=native"],
          "-Ofast -march=native -fopenmp": ["-Ofast", "-march=native", "-fopenmp"]}
PROMPT_WORD = " Once upon a time there was a little dog."  # repeated until the prompt has enough tokens


@dataclass(frozen=True)
class Row:
    program: str
    threads: int
    decode: float
    prefill: float


def build(checkout: Path, out: Path) -> dict[str, Path]:
    """run.c and runq.c in every build of BUILDS: {"run.c -O3": binary, ...}."""
    binaries = {}
    for source in ("run.c", "runq.c"):
        for name, flags in BUILDS.items():
            binary = out / f"{source[:-2]}{len(binaries)}"
            subprocess.run(["gcc", *flags, "-o", str(binary), str(checkout / source), "-lm"], check=True)
            binaries[f"{source} {name}"] = binary
    return binaries


def q8_group_size(config: ModelConfig) -> int:
    """The largest power of two up to export.py's 64 dividing every matmul input width (dim and hidden_dim)."""
    width = math.gcd(config.dim, config.hidden_dim)
    return math.gcd(width, 64)


def write_models(shape: str, models_dir: Path, checkout: Path, out: Path) -> tuple[Path, Path, Path]:
    """(float32 checkpoint, Q8_0 checkpoint, tokenizer) of a shape; random weights but for stories260K."""
    if shape == "stories260K":
        checkpoint = load_checkpoint(models_dir / "stories260K.bin")
        config, weights, tokenizer = checkpoint.config, checkpoint.weights, models_dir / "tok512.bin"
    else:
        config = STORIES_SHAPES[shape]
        weights, tokenizer = random_weights(config), checkout / "tokenizer.bin"
    folder = out / shape
    folder.mkdir()
    float_path, q8_path = folder / f"{shape}.bin", folder / f"{shape}_q80.bin"
    write_checkpoint(float_path, config, weights)
    write_checkpoint(q8_path, config, weights, version=2, group_size=q8_group_size(config))
    shutil.copy(tokenizer, folder / tokenizer.name)  # beside the model, where our loader looks for it
    return float_path, q8_path, folder / tokenizer.name


def achieved(binary: Path, model: Path, tokenizer: Path, steps: int, prompt: str, threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([str(binary), str(model), "-z", str(tokenizer), "-t", "0", "-n", str(steps), "-i", prompt],
                          capture_output=True, env=env, check=True)
    found = re.search(rb"achieved tok/s: ([0-9.]+|inf)", proc.stderr)  # inf: under run.c's 1 ms clock tick
    if found is None:
        raise SystemExit(f"{binary.name} printed no 'achieved tok/s' (it reports none below 2 positions)")
    return float(found.group(1))


def prompt_of(tokenizer_path: Path, vocab_size: int, n_tokens: int) -> tuple[str, int]:
    """A prompt of about n_tokens tokens (BOS included) and its exact length."""
    tokenizer = load_tokenizer(tokenizer_path, vocab_size)
    text = PROMPT_WORD.strip()
    while len(tokenizer.encode(text + PROMPT_WORD)) <= n_tokens:
        text += PROMPT_WORD
    return text, len(tokenizer.encode(text))


def our_engines(float_path: Path, threads: int) -> dict[tuple[str, int], tuple]:
    """(engine, threads) -> (engine, greedy sampler): float and fixed, on one thread and on `threads`."""
    checkpoint = load_checkpoint(float_path)
    packed = quantize_model(checkpoint, checkpoint_tokenizer(checkpoint, float_path), "row")  # as sectorllm bench
    engines = {}
    for n in sorted({1, threads}):
        engines["float", n] = FloatEngine(checkpoint, n), Sampler(SamplerConfig(temperature=0))
        engines["fixed", n] = FixedEngine(packed, n), FixedSampler(FixedSamplerConfig(0), packed)
    return engines


def measure(shape: str, binaries: dict[str, Path], models_dir: Path, checkout: Path, out: Path,
            args: argparse.Namespace) -> list[Row]:
    """Every program in turn, --repeats rounds: a machine whose load changes slows every program alike."""
    float_path, q8_path, tokenizer = write_models(shape, models_dir, checkout, out)
    config = load_checkpoint(float_path).config
    decode = min(args.decode, config.seq_len)
    prompt, prompt_tokens = prompt_of(tokenizer, config.vocab_size, min(args.prefill, config.seq_len - 1))
    programs = [(program, threads) for program in binaries for threads in
                ([args.threads] if "openmp" in program else [1])]
    ours = our_engines(float_path, args.threads)
    runs: dict[tuple[str, int], list[tuple[float, float]]] = {key: [] for key in [*programs, *ours]}
    for round_ in range(args.repeats):
        for program, threads in programs:
            model = q8_path if program.startswith("runq") else float_path
            runs[program, threads].append((achieved(binaries[program], model, tokenizer, decode, "", threads),
                                           achieved(binaries[program], model, tokenizer, prompt_tokens, prompt,
                                                    threads)))
        for (engine, threads), (instance, sampler) in ours.items():
            result = bench_engine(instance, sampler, shape, engine, decode, prompt_tokens, repeats=1)
            runs[engine, threads].append((result.decode_tok_per_s, result.prefill_tok_per_s))
        print(f"  {shape}: round {round_ + 1} of {args.repeats} done", file=sys.stderr, flush=True)
    return [Row(program if program in binaries else f"sectorllm {program}", threads,
                statistics.median(d for d, _ in results), statistics.median(p for _, p in results))
            for (program, threads), results in runs.items()]


def table(shape: str, rows: list[Row], threads: int) -> str:
    """Markdown; the x columns are our engines' decode speed (on `threads`) over each row's."""
    ours = {r.program: r for r in rows if r.program.startswith("sectorllm") and r.threads == threads}
    lines = [f"### {shape}", "",
             "| program | threads | decode tok/s | prefill tok/s | float decode x | fixed decode x |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratios = [f"{ours[f'sectorllm {e}'].decode / r.decode:.2f}" for e in ("float", "fixed")]
        lines.append(f"| {r.program} | {r.threads} | {r.decode:,.1f} | {r.prefill:,.1f} | {' | '.join(ratios)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("llama2c", type=Path, help="a llama2.c checkout (run.c, runq.c, tokenizer.bin)")
    parser.add_argument("--shapes", nargs="+", default=["stories260K", "stories15M", "stories110M"],
                        choices=["stories260K", *STORIES_SHAPES])
    parser.add_argument("--models", type=Path, default=Path(os.environ.get("SECTORLLM_MODELS", "../shared/models")),
                        help="folder with stories260K.bin and tok512.bin (default $SECTORLLM_MODELS)")
    parser.add_argument("--decode", type=int, default=256, help="decode steps (default 256)")
    parser.add_argument("--prefill", type=int, default=200, help="prompt tokens (default 200)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per program, the median is shown (default 3)")
    parser.add_argument("--threads", type=int, default=numba.config.NUMBA_NUM_THREADS,
                        help="threads for OpenMP builds and our engines (default: all cores)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sectorllm-bench-") as scratch:
        out = Path(scratch)
        binaries = build(args.llama2c.resolve(), out)
        tables = [table(shape, measure(shape, binaries, args.models, args.llama2c.resolve(), out, args),
                        args.threads) for shape in args.shapes]
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
