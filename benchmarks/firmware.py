"""Decode speed of one boot image under SeaBIOS and under OVMF: the same file, the same QEMU (TCG) on this machine.

Builds stories260K greedy from BOS (--steps forward passes) as an image that boots both ways (uefi.hybrid_image),
boots it --repeats times under each firmware and prints the median tok/s of each: token records' arrival times on
COM1, from the first generated token to the last (session.result_of's rule), so firmware start-up is not counted.

    python benchmarks/firmware.py [--steps 256] [--repeats 3]

SeaBIOS runs the engine as a BIOS boots it (qemu-system-i386, pc, IDE); OVMF through the UEFI loader
(qemu-system-x86_64, q35, virtio). Each byte shown costs a trip to real mode and INT 10h under SeaBIOS, a trip to
64-bit mode and ConOut under OVMF.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from sectorllm.boot import session, uefi
from sectorllm.boot.image import build_image
from sectorllm.sampling import SamplerConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    models = Path(os.environ.get("SECTORLLM_MODELS", "../shared/models"))
    blob, packed = session.packed_model(models / "stories260K.bin", models / "tok512.bin")
    with tempfile.TemporaryDirectory(prefix="sectorllm-firmware-") as scratch:
        legacy = Path(scratch) / "legacy.img"
        info = build_image(blob, session.run_block(packed, "", args.steps, SamplerConfig(temperature=0.0)), legacy)
        image = Path(scratch) / "both.img"
        image.write_bytes(uefi.hybrid_image(legacy.read_bytes(), info.engine, info.disk)[0])
        boot_image = session.read_image(image)
        seabios, ovmf = [], []
        for _ in range(args.repeats):
            seabios.append(session.run_image(image, timeout=600).result.tok_per_s)
            run = uefi.run_ovmf(image, memory_mib=uefi.ovmf_memory_mib(boot_image.memory.memory_end), timeout=600)
            ovmf.append(session.result_of(boot_image, list(run.output.tokens), list(run.token_times)).tok_per_s)
    print(f"stories260K, greedy from BOS, {args.steps} steps, median of {args.repeats}")
    print(f"SeaBIOS (qemu-system-i386, pc, IDE): {statistics.median(seabios):8.1f} tok/s")
    print(f"OVMF (qemu-system-x86_64, q35, virtio): {statistics.median(ovmf):8.1f} tok/s")


if __name__ == "__main__":
    main()
