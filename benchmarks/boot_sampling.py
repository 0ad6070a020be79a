"""Boot engine: sampled decode against greedy on a random-weight model of a published shape (default stories15M).

Builds two images of the same model, greedy from BOS and sampled (temperature 1, top-p 0.9, seed 1), and measures
each two ways:
- instructions per token under the unicorn emulator (exact and repeatable), over --emulated-tokens tokens;
- tok/s under QEMU (TCG, pc, IDE), median of --repeats boots, from the first generated token's record to the
  last (session.result_of's rule). Every byte a token prints costs a trip to real mode and INT 10h, and the
  two runs print different tokens, so this figure carries the screen's cost as a user sees it.

    python benchmarks/boot_sampling.py [--shape stories15M] [--tokens 64] [--repeats 3] [--emulated-tokens 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from sectorllm.boot import session
from sectorllm.boot.emulator import Emulator
from sectorllm.boot.image import build_image
from sectorllm.checkpoint import random_weights, write_checkpoint
from sectorllm.config import STORIES_SHAPES
from sectorllm.sampling import SamplerConfig

SAMPLERS = {"greedy": SamplerConfig(temperature=0.0), "top-p 0.9": SamplerConfig(temperature=1.0, topp=0.9, seed=1)}


def instructions_per_token(image: Path, generate: int) -> float:
    """Unicorn's instruction count from the first forward pass (the engine's `generate`) to the last token's
    record, per generated token."""
    emulator = Emulator(image.read_bytes(), memory_mib=session.read_image(image).memory_mib)
    if emulator.run(until=generate) != "breakpoint":
        raise SystemExit(f"{image}: the engine stopped before generating")
    start = emulator.instructions
    emulator.run()
    result = emulator.result()
    return (result.token_instructions[-1] - start) / len(result.tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="stories15M", choices=sorted(STORIES_SHAPES))
    parser.add_argument("--tokens", type=int, default=64, help="generated tokens per QEMU boot")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--emulated-tokens", type=int, default=4, help="generated tokens under unicorn")
    args = parser.parse_args()
    models = Path(os.environ.get("SECTORLLM_MODELS", "../shared/models"))
    config = STORIES_SHAPES[args.shape]
    tokenizer = models / ("tok512.bin" if config.vocab_size == 512 else "tokenizer.bin")
    with tempfile.TemporaryDirectory(prefix="sectorllm-sampling-") as scratch:
        checkpoint = Path(scratch) / "random.bin"
        write_checkpoint(checkpoint, config, random_weights(config), version=0)
        blob, packed = session.packed_model(checkpoint, tokenizer, "row")
        images, generate = {}, 0
        for name, sampler in SAMPLERS.items():
            for steps, kind in ((args.tokens, "qemu"), (args.emulated_tokens, "unicorn")):
                images[name, kind] = Path(scratch) / f"{name.replace(' ', '')}-{kind}.img"
                info = build_image(blob, session.run_block(packed, "", steps, sampler), images[name, kind])
                generate = info.engine.symbols["generate"]
        instructions = {name: instructions_per_token(images[name, "unicorn"], generate) for name in SAMPLERS}
        speeds: dict[str, list[float]] = {name: [] for name in SAMPLERS}
        for _ in range(args.repeats):
            for name in SAMPLERS:
                speeds[name].append(session.run_image(images[name, "qemu"], timeout=1800).result.tok_per_s)
    greedy = "greedy"
    print(f"random {args.shape}: instructions/token over {args.emulated_tokens} tokens (unicorn); "
          f"tok/s over {args.tokens} tokens, median of {args.repeats} (QEMU TCG)")
    for name in SAMPLERS:
        print(f"{name:<10} {instructions[name]:>14,.0f} instructions/token ({instructions[name] / instructions[greedy]:.3f}"
              f" x greedy)   {statistics.median(speeds[name]):8.2f} tok/s "
              f"({statistics.median(speeds[name]) / statistics.median(speeds[greedy]):.3f} x greedy)")


if __name__ == "__main__":
    main()
