"""Run a boot image in-process on the unicorn CPU emulator, with a small BIOS shim, counting guest instructions.

The shim answers the BIOS interrupts and I/O ports the image uses (INT 10h teletype, INT 13h: the extensions'
check and extended reads from the image as a hard disk, INT 14h serial initialization, INT 15h: A20 and the memory
map (E820h), INT 16h keys from a string, INT 1Ah ticks; COM1, port 0x92, isa-debug-exit) from Python hooks, so no
BIOS code runs in the guest: every counted instruction is the image's own. The runner's side of COM1 does what
`sectorllm boot` does: SERIAL_RECORDS before the start, SERIAL_GO after the end record.

Counting: a block hook adds each translation block's instruction count, which unicorn reports for the block
(ctl_request_cache), so the count is exact at a fraction of the cost of a hook per instruction. A rep-prefixed
string instruction counts once per iteration: unicorn re-enters it for each one.

Modes: unicorn is QEMU's TCG, which handles lgdt, mov cr0, far jumps and descriptor loads as a CPU does, so the
engine's switches between real and protected mode run here as on a PC; like TCG it checks no segment limits in
real mode (only KVM or real hardware do). All of memory is RAM here, with A20 always open.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from unicorn import UC_ARCH_X86, UC_HOOK_BLOCK, UC_HOOK_CODE, UC_HOOK_INSN, UC_HOOK_INTR, UC_MODE_16, Uc, UcError
from unicorn import x86_const as x86

from ..errors import BootError
from .image import MODEL_BASE, SECTOR, SERIAL_GO, SERIAL_RECORDS, End, EngineOutput, SerialDecoder, Token, sectors

BOOT_ADDRESS = 0x7C00
BOOT_DRIVE = 0x80
CONVENTIONAL_TOP = 0x9FC00  # 639 KiB, the usual start of the EBDA
INSTRUCTIONS_PER_TICK = 770_000  # ~14 M instructions/s (QEMU TCG here) / 18.2 BIOS ticks/s
COM1 = 0x3F8
DEBUG_EXIT_PORT = 0xF4
SYSTEM_CONTROL_A = 0x92
CARRY = 1 << 0
ZERO = 1 << 6

REGISTERS = {name: getattr(x86, f"UC_X86_REG_{name.upper()}") for name in (
    "eax", "ebx", "ecx", "edx", "esi", "edi", "ebp", "esp", "eip", "eflags", "cs", "ds", "es", "fs", "gs", "ss")}


@dataclass(frozen=True)
class EmulatorResult(EngineOutput):
    """One emulated run: the decoded serial stream, how it stopped, and exact instruction counts."""

    status: int | None  # the end record's status, else the byte written to isa-debug-exit
    stop: str  # "exit" (isa-debug-exit), "halt", "key" (INT 16h with no keys left), "limit", "breakpoint"
    instructions: int
    token_instructions: tuple[int, ...]  # the count when each token's record and bytes were complete
    screen: bytes  # what INT 10h teletype was given (log text and token bytes; "\n" arrives as CR LF)

    @property
    def instructions_between_tokens(self) -> list[int]:
        t = self.token_instructions
        return [b - a for a, b in zip(t, t[1:])]


@dataclass
class _Machine:
    """The shim's device state."""

    serial: SerialDecoder = field(default_factory=SerialDecoder)
    serial_input: bytearray = field(default_factory=bytearray)
    keys: bytearray = field(default_factory=bytearray)
    screen: bytearray = field(default_factory=bytearray)
    line_control: int = 0
    system_control_a: int = 0
    exit_status: int | None = None
    token_instructions: list[int] = field(default_factory=list)


class Emulator:
    """A PC with memory_mib MiB of RAM booting image; run() it, stop at breakpoints, read its memory."""

    def __init__(self, image: bytes, *, memory_mib: int = 64, keys: bytes = b"",
                 serial_input: bytes = bytes((SERIAL_RECORDS,)),
                 on_token: Callable[[Token], None] | None = None) -> None:
        if memory_mib < 2:
            raise BootError(f"the emulated machine needs at least 2 MiB of memory, not {memory_mib}")
        if len(image) < SECTOR or image[510:512] != b"\x55\xaa":
            raise BootError("the image has no boot sector (no 0x55AA signature at byte 510)")
        self.image = bytes(image)
        self.memory_bytes = memory_mib << 20
        self.on_token = on_token
        self.instructions = 0
        self.stop = ""
        self._machine = _Machine(serial_input=bytearray(serial_input), keys=bytearray(keys))
        self._block_start = BOOT_ADDRESS  # the translation block running now
        self._tb_counts: dict[tuple[int, int], int] = {}
        self._limit: int | None = None
        self._breakpoints: dict[int, int] = {}  # address -> hook handle
        self._resume_at_breakpoint = False
        self.uc = Uc(UC_ARCH_X86, UC_MODE_16)
        self.uc.mem_map(0, self.memory_bytes)
        self.uc.mem_write(BOOT_ADDRESS, self.image[:SECTOR])  # what the BIOS does before jumping to 0:7C00
        self.uc.reg_write(x86.UC_X86_REG_EDX, BOOT_DRIVE)
        self.uc.reg_write(x86.UC_X86_REG_ESP, BOOT_ADDRESS)
        self.uc.reg_write(x86.UC_X86_REG_EIP, BOOT_ADDRESS)
        self.uc.hook_add(UC_HOOK_BLOCK, self._on_block)
        self.uc.hook_add(UC_HOOK_INTR, self._on_interrupt)
        self.uc.hook_add(UC_HOOK_INSN, self._on_in, None, 1, 0, x86.UC_X86_INS_IN)
        self.uc.hook_add(UC_HOOK_INSN, self._on_out, None, 1, 0, x86.UC_X86_INS_OUT)

    # ----------------------------------------------------------------------------------------------- control

    def run(self, until: int | None = None, max_instructions: int | None = None) -> str:
        """Run until the image ends the run, halts, waits for a key, reaches address `until` (before executing it)
        or has executed max_instructions in total; returns the reason (also in self.stop). Call again to go on."""
        if until is not None and until not in self._breakpoints:
            self._breakpoints[until] = self.uc.hook_add(UC_HOOK_CODE, self._on_breakpoint, None, until, until)
            self.uc.ctl_flush_tb()  # code translated before the hook existed would never call it
        self._limit = max_instructions
        self.stop = ""
        self._resume_at_breakpoint = self._linear_pc() in self._breakpoints
        # A 16-bit unicorn sets EIP = begin - 16 * CS, in protected mode too: give it what makes EIP stay.
        begin = (self.uc.reg_read(x86.UC_X86_REG_CS) << 4) + self.uc.reg_read(x86.UC_X86_REG_EIP)
        try:
            self.uc.emu_start(begin, 0)
        except UcError as error:
            raise BootError(f"the emulated CPU stopped at {self.location()}: {error}") from None
        if not self.stop:
            self.stop = "halt"  # unicorn returns from hlt with no hook involved
        return self.stop

    def result(self) -> EmulatorResult:
        """The run so far."""
        output = self._machine.serial.output()
        status = output.end_status if output.end_status is not None else self._machine.exit_status
        return EmulatorResult(**vars(output), status=status, stop=self.stop, instructions=self.instructions,
                              token_instructions=tuple(self._machine.token_instructions),
                              screen=bytes(self._machine.screen))

    def type_keys(self, keys: bytes) -> None:
        """Queue more key presses for INT 16h (one ASCII byte each)."""
        self._machine.keys += keys

    def read_memory(self, address: int, n: int) -> bytes:
        """n bytes of guest memory at a physical address."""
        return bytes(self.uc.mem_read(address, n))

    def registers(self) -> dict[str, int]:
        """The general, pointer, flag and segment registers by lower-case name."""
        return {name: self.uc.reg_read(register) for name, register in REGISTERS.items()}

    def _protected(self) -> bool:
        return bool(self.uc.reg_read(x86.UC_X86_REG_CR0) & 1)

    def _linear_pc(self) -> int:
        """The address of the next instruction: the engine's protected-mode code segment is flat (base 0)."""
        base = 0 if self._protected() else self.uc.reg_read(x86.UC_X86_REG_CS) << 4
        return base + self.uc.reg_read(x86.UC_X86_REG_EIP)

    def location(self) -> str:
        """CS:IP (real mode) or CS:EIP (protected mode), for messages."""
        ip = self.uc.reg_read(x86.UC_X86_REG_EIP)
        return f"{self.uc.reg_read(x86.UC_X86_REG_CS):04x}:{ip:08x}" if self._protected() else \
            f"{self.uc.reg_read(x86.UC_X86_REG_CS):04x}:{ip:04x}"

    def _halt(self, reason: str) -> None:
        self.stop = reason
        self.uc.emu_stop()

    # ------------------------------------------------------------------------------------------------ counting

    def _tb_instructions(self, address: int) -> tuple[int, int]:
        """Instruction count and end address of the translation block that starts at address."""
        _, count, size = self.uc.ctl_request_cache(address)
        return count, address + size

    def _on_block(self, uc: Uc, address: int, size: int, _: object) -> None:
        key = (address, size)
        count = self._tb_counts.get(key)
        if count is None:
            count = self._tb_counts[key] = self._tb_instructions(address)[0]
        if self._limit is not None and self.instructions + count > self._limit:
            self._halt("limit")  # before this block runs: the count stays at most the limit
            return
        self._block_start = address
        self.instructions += count

    def _instructions_from(self, start: int, end: int) -> int:
        """Instructions in the straight-line code [start, end), where end is the end of a block through start."""
        count, tb_end = self._tb_instructions(start)
        # A block that starts later may run further before hitting its size limit: take off the overshoot.
        return count if tb_end == end else count - self._instructions_from(end, tb_end)

    def _uncount_from(self, address: int) -> None:
        """Stopping before address: take back the running block's instructions from there on, which the block
        hook counted in advance (on resume, the block from address is counted anew)."""
        _, block_end = self._tb_instructions(self._block_start)
        self.instructions -= self._instructions_from(address, block_end)

    def _on_breakpoint(self, uc: Uc, address: int, size: int, _: object) -> None:
        if self._resume_at_breakpoint:
            self._resume_at_breakpoint = False
            return
        self._uncount_from(address)
        self._halt("breakpoint")

    # ------------------------------------------------------------------------------------------------ devices

    def _on_out(self, uc: Uc, port: int, size: int, value: int, _: object) -> None:
        m = self._machine
        if port == COM1 and not m.line_control & 0x80:  # with DLAB set, 0x3F8 is the baud divisor
            for record in m.serial.feed(bytes([value & 0xFF])):
                if isinstance(record, End):
                    m.serial_input.append(SERIAL_GO)
                if isinstance(record, Token):
                    m.token_instructions.append(self.instructions)
                    if self.on_token is not None:
                        self.on_token(record)
        elif port == COM1 + 3:
            m.line_control = value & 0xFF
        elif port == SYSTEM_CONTROL_A:
            m.system_control_a = value & 0xFE  # bit 0 would reset the machine
        elif port == DEBUG_EXIT_PORT:
            m.exit_status = value & 0xFF
            self._uncount_from(self._linear_pc())  # the hook runs before the out: it counts as executed
            self.instructions += 1
            self._halt("exit")

    def _on_in(self, uc: Uc, port: int, size: int, _: object) -> int:
        m = self._machine
        if port == COM1 + 5:
            return 0x60 | (1 if m.serial_input else 0)  # transmitter always empty, data ready if input is left
        if port == COM1 and not m.line_control & 0x80:
            return m.serial_input.pop(0) if m.serial_input else 0
        if port == COM1 + 3:
            return m.line_control
        if port == SYSTEM_CONTROL_A:
            return m.system_control_a
        return 0xFF  # an empty ISA bus

    # ---------------------------------------------------------------------------------------------- BIOS shim

    def _on_interrupt(self, uc: Uc, number: int, _: object) -> None:
        handler = {0x10: self._int10, 0x13: self._int13, 0x14: self._int14, 0x15: self._int15, 0x16: self._int16,
                   0x1A: self._int1a}.get(number)
        if handler is None:
            self._halt(f"interrupt {number:#04x}")
            raise BootError(f"interrupt {number:#04x} at {self.location()}: the BIOS shim does not provide it "
                            "(or the CPU raised an exception)")
        handler()

    def _reg(self, name: str) -> int:
        return self.uc.reg_read(REGISTERS[name])

    def _set(self, **values: int) -> None:
        for name, value in values.items():
            register = getattr(x86, f"UC_X86_REG_{name.upper()}")
            self.uc.reg_write(register, value)

    def _flags(self, carry: bool | None = None, zero: bool | None = None) -> None:
        flags = self._reg("eflags")
        if carry is not None:
            flags = flags | CARRY if carry else flags & ~CARRY
        if zero is not None:
            flags = flags | ZERO if zero else flags & ~ZERO
        self._set(eflags=flags)

    def _int10(self) -> None:
        ah = self._reg("eax") >> 8 & 0xFF
        if ah == 0x0E:
            self._machine.screen.append(self._reg("eax") & 0xFF)
        elif ah == 0x0F:  # video mode: 80x25 colour text, page 0
            self._set(ax=0x5003, bh=0)

    def _int14(self) -> None:
        """Serial port services: AH=00h (initialize) sets the line control from AL; the status comes back in AX."""
        if self._reg("eax") >> 8 & 0xFF == 0x00:
            self._machine.line_control = self._reg("eax") & 0x1F
        self._set(ax=0x6000)  # transmitter empty, no modem lines

    def _int13(self) -> None:
        ah = self._reg("eax") >> 8 & 0xFF
        drive = self._reg("edx") & 0xFF
        if drive != BOOT_DRIVE:
            self._set(ah=0x01)
            self._flags(carry=True)
        elif ah == 0x41 and self._reg("ebx") & 0xFFFF == 0x55AA:  # EDD 1.1 with the packet calls
            self._set(bx=0xAA55, ah=0x01, cx=0x0001)
            self._flags(carry=False)
        elif ah == 0x42:
            self._flags(carry=not self._extended_read())
        else:
            self._set(ah=0x01)  # invalid function
            self._flags(carry=True)

    def _extended_read(self) -> bool:
        """INT 13h AH=42h: copy sectors from the image to the DAP's buffer; False (and AH=04h) past its end."""
        dap = (self._reg("ds") << 4) + (self._reg("esi") & 0xFFFF)
        _, _, count, offset, segment, lba = struct.unpack("<BBHHHQ", self.read_memory(dap, 16))
        if lba + count > sectors(len(self.image)):
            self.uc.mem_write(dap + 2, b"\0\0")  # sectors transferred
            self._set(ah=0x04)
            return False
        data = self.image[lba * SECTOR:(lba + count) * SECTOR]
        self.uc.mem_write((segment << 4) + offset, data.ljust(count * SECTOR, b"\0"))
        self._set(ah=0)
        return True

    def _int15(self) -> None:
        ax = self._reg("eax") & 0xFFFF
        if ax == 0xE820 and self._reg("edx") == 0x534D4150:
            self._memory_map_entry()
        elif ax == 0x2401:  # A20 is always open here
            self._set(ah=0)
            self._flags(carry=False)
        else:
            self._set(ah=0x86)  # unsupported function
            self._flags(carry=True)

    def _memory_map_entry(self) -> None:
        """INT 15h E820h: the ranges of a PC with this much RAM, one per call (EBX: the next one, 0 after the last)."""
        ranges = ((0, CONVENTIONAL_TOP, 1), (CONVENTIONAL_TOP, 0xA0000 - CONVENTIONAL_TOP, 2),
                  (0xF0000, 0x10000, 2), (MODEL_BASE, self.memory_bytes - MODEL_BASE, 1))
        index = self._reg("ebx")
        base, length, kind = ranges[index]
        entry = (self._reg("es") << 4) + (self._reg("edi") & 0xFFFF)
        self.uc.mem_write(entry, struct.pack("<QQI", base, length, kind))
        self._set(eax=0x534D4150, ecx=20, ebx=(index + 1) % len(ranges))
        self._flags(carry=False)

    def _int16(self) -> None:
        ah = self._reg("eax") >> 8 & 0xFF
        keys = self._machine.keys
        if ah in (0x00, 0x10):
            if not keys:
                # A real BIOS waits for a key: stop at the int instruction, so run() after type_keys() repeats it.
                self._set(eip=self._reg("eip") - 2)
                self.instructions -= 1
                self._halt("key")
                return
            self._set(ax=keys.pop(0))
        elif ah in (0x01, 0x11):
            self._flags(zero=not keys)
            if keys:
                self._set(ax=keys[0])

    def _int1a(self) -> None:
        if self._reg("eax") >> 8 & 0xFF == 0x00:
            ticks = self.instructions // INSTRUCTIONS_PER_TICK
            self._set(al=0, cx=ticks >> 16 & 0xFFFF, dx=ticks & 0xFFFF)


def emulate(image: Path | bytes, *, memory_mib: int = 64, keys: bytes = b"", max_instructions: int | None = None,
            on_token: Callable[[Token], None] | None = None) -> EmulatorResult:
    """Run an image to its end in the emulator; raises BootError if it stops for another reason than the end."""
    data = Path(image).read_bytes() if isinstance(image, Path) else image
    emulator = Emulator(data, memory_mib=memory_mib, keys=keys, on_token=on_token)
    stop = emulator.run(max_instructions=max_instructions)
    result = emulator.result()
    if stop != "exit":
        raise BootError(f"the emulated run stopped ({stop}) at {emulator.location()} after {result.instructions} "
                        f"instructions without ending: {result.log.strip()[-200:]!r}")
    return result
