"""The boot engine's Python side: build its disk image with nasm, boot it in QEMU, or emulate it with unicorn.

`sectorllm.boot.emulator` (Emulator, emulate) is imported on its own: it needs the optional unicorn package.
"""

from __future__ import annotations

from .image import (AssembledCode, DiskLayout, End, EngineOutput, ImageInfo, RunBlock, SerialDecoder, Status, Token,
                    Value, assemble, build_image, pack_run_block, unpack_run_block)
from .qemu import BootResult, boot

__all__ = ["AssembledCode", "BootResult", "DiskLayout", "End", "EngineOutput", "ImageInfo", "RunBlock",
           "SerialDecoder", "Status", "Token", "Value", "assemble", "boot", "build_image", "pack_run_block",
           "unpack_run_block"]
