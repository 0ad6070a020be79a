"""The boot engine's Python side: build its disk image with nasm, boot it in QEMU or Bochs, or emulate it with
unicorn (`sectorllm.boot.emulator`, imported on its own: unicorn loads slowly)."""

from __future__ import annotations

from .image import (AssembledCode, DiskLayout, End, EngineOutput, ImageInfo, MemoryLayout, RunBlock, SerialDecoder,
                    Status, Token, Value, assemble, build_image, memory_layout, pack_run_block, unpack_run_block)
from .qemu import BootResult, MachineConfig, boot

__all__ = ["AssembledCode", "BootResult", "DiskLayout", "End", "EngineOutput", "ImageInfo", "MachineConfig",
           "MemoryLayout", "RunBlock", "SerialDecoder", "Status", "Token", "Value", "assemble", "boot", "build_image",
           "memory_layout", "pack_run_block", "unpack_run_block"]
