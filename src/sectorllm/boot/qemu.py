"""Boot an image under QEMU (headless, TCG) and stream the engine's serial records back as they arrive."""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..atomic import write_atomically
from ..errors import BootError, UsageError
from .image import SERIAL_GO, SERIAL_RECORDS, End, EngineOutput, Record, SerialDecoder, Token

QEMU = "qemu-system-i386"
QEMU_INSTALL = "apt-get install qemu-system-x86"
DEFAULT_MEMORY_MIB = 128
DEFAULT_TIMEOUT = 60.0
TEXT_PAGE = 0xB8000  # VGA text mode's first page: 80 x 25 (character, attribute) pairs
TEXT_COLUMNS, TEXT_ROWS = 80, 25


@dataclass(frozen=True)
class BootResult(EngineOutput):
    """One QEMU boot: the decoded serial stream, how QEMU ended, and the screenshot if one was asked for."""

    status: int | None  # the end record's status, else isa-debug-exit's; None if neither (reset, crash)
    exit_code: int  # QEMU's: (status << 1) | 1 after isa-debug-exit
    stderr: str
    seconds: float
    screenshot: Path | None
    screen_text: str | None  # with a screenshot: the characters of the 80x25 text screen, a line each

    @property
    def ok(self) -> bool:
        return self.status == 0


MACHINES = ("pc", "q35", "isapc")
FIRMWARES = ("bios", "uefi")
DRIVES = ("ide", "floppy", "virtio", "usb", "usb-uhci", "usb-ehci")
ACCELS = ("tcg", "kvm")
USB_CONTROLLERS = {"usb": "qemu-xhci", "usb-uhci": "piix3-usb-uhci", "usb-ehci": "usb-ehci"}


@dataclass(frozen=True)
class MachineConfig:
    """The PC QEMU emulates: the machine type, RAM, how the image is attached, the CPU and extra QEMU arguments."""

    machine: str = "pc"
    memory_mib: int | None = None  # None: enough for the image (session.memory_mib)
    drive: str = "ide"
    cpu: str | None = None  # QEMU's default CPU model for the machine
    accel: str = "tcg"
    extra: tuple[str, ...] = ()
    firmware: str = "bios"  # SeaBIOS, or OVMF (UEFI: qemu-system-x86_64, an image with an EFI System Partition)

    def validate(self) -> None:
        """Refuse what QEMU's machines cannot do; raises UsageError naming the option."""
        for name, value, choices in (("machine", self.machine, MACHINES), ("drive", self.drive, DRIVES),
                                     ("accel", self.accel, ACCELS), ("firmware", self.firmware, FIRMWARES)):
            if value not in choices:
                raise UsageError(f"--{name} {value!r} is not one of {', '.join(choices)}")
        if self.machine == "isapc" and self.drive not in ("ide", "floppy"):
            raise UsageError(f"--machine isapc has no PCI bus for --drive {self.drive}: use ide or floppy")
        if self.firmware == "uefi" and (self.machine == "isapc" or self.drive == "floppy"):
            raise UsageError("--firmware uefi needs a PCI machine (pc or q35) and a disk: not isapc, not a floppy")
        if self.memory_mib is not None and not 1 <= self.memory_mib <= 3072:
            raise UsageError(f"--memory {self.memory_mib} MiB is outside 1..3072")


def drive_arguments(image: Path, drive: str) -> list[str]:
    """QEMU arguments that attach the image (copy-on-write: the guest may write, the file stays as built)."""
    media = f"file={image},format=raw,snapshot=on"
    if drive in ("ide", "floppy", "virtio"):
        return ["-drive", f"{media},if={drive}"] + (["-boot", "a"] if drive == "floppy" else [])
    return ["-device", f"{USB_CONTROLLERS[drive]},id=usb", "-drive", f"{media},if=none,id=stick",
            "-device", "usb-storage,bus=usb.0,drive=stick,bootindex=0"]


def qemu_command(binary: str, image: Path, machine: MachineConfig, memory_mib: int, monitor: Path) -> list[str]:
    """The QEMU command line: headless, serial on stdio, a QMP socket, isa-debug-exit, the image attached; under
    UEFI, OVMF as the firmware with a copy of its variable store beside the QMP socket."""
    firmware = []
    if machine.firmware == "uefi":
        from .uefi import copy_ovmf_vars, ovmf_qemu_args

        firmware = ovmf_qemu_args(copy_ovmf_vars(monitor.parent))
    command = [binary, *firmware, "-machine", f"{machine.machine},accel={machine.accel}", "-m", str(memory_mib),
               "-display", "none", "-serial", "stdio", "-qmp", f"unix:{monitor},server=on,wait=off",
               "-no-reboot", "-nic", "none", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
               *drive_arguments(image, machine.drive)]
    return command + (["-cpu", machine.cpu] if machine.cpu else []) + list(machine.extra)


def boot(image: Path, *, timeout: float = DEFAULT_TIMEOUT, machine: MachineConfig = MachineConfig(),
         memory_mib: int = DEFAULT_MEMORY_MIB, screenshot: Path | None = None,
         on_token: Callable[[Token], None] | None = None) -> BootResult:
    """Boot image in qemu-system-i386 until the engine ends the run; raises BootError on timeout or QEMU failure.

    memory_mib is used unless machine.memory_mib is set. TCG is the default accelerator: it ran real-mode code
    faster than KVM here, and boots SeaBIOS in a fraction of the time; but only KVM runs the guest on the CPU
    itself, with its segment checks and mode switches. The runner asks for records (SERIAL_RECORDS) before the
    machine starts; on_token is called for each token as soon as its record and bytes have arrived. The engine
    waits after its end record: with screenshot the runner saves the VGA screen as PNG (and its text) first, then
    lets it exit (SERIAL_GO).
    """
    machine.validate()
    if machine.firmware == "uefi":
        from .uefi import HANDSHAKE_CUE, QEMU64 as program
    else:
        program, HANDSHAKE_CUE = QEMU, None
    binary = shutil.which(program)
    if binary is None:
        raise BootError(f"{program} is not installed, the boot image cannot be run: {QEMU_INSTALL}")
    image = Path(image).resolve()
    if not image.is_file():
        raise BootError(f"boot image {image} does not exist: build it first")
    started = time.monotonic()
    deadline = started + timeout
    with tempfile.TemporaryDirectory(prefix="sectorllm-qemu-") as scratch:
        monitor = Path(scratch) / "qmp.sock"
        stderr_path = Path(scratch) / "stderr.txt"
        command = qemu_command(binary, image, machine, machine.memory_mib or memory_mib, monitor)
        with open(stderr_path, "wb") as stderr_file:
            process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr_file)
        try:
            if HANDSHAKE_CUE is None:
                send_serial(process, SERIAL_RECORDS)  # the UART holds it until the engine looks
            decoder = SerialDecoder()
            shot = screen_text = None
            for record in stream_records(process, decoder, deadline, timeout, HANDSHAKE_CUE):
                if isinstance(record, Token) and on_token is not None:
                    on_token(record)
                elif isinstance(record, End):
                    if screenshot is not None:  # (OVMF's console is graphics: no VGA text page to read)
                        shot, screen_text = take_screenshot(monitor, Path(scratch), Path(screenshot), deadline,
                                                            text_page=machine.firmware == "bios")
                    send_serial(process, SERIAL_GO)
            exit_code = process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            raise BootError(f"QEMU did not exit within {timeout:g} s after the engine's output ended: "
                            "raise the timeout or check the engine's end of run") from None
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()
            process.stdout.close()
            process.stdin.close()
        stderr = stderr_path.read_text(errors="replace")
    output = decoder.output()
    # Without an end record only isa-debug-exit (an odd exit code) says the guest ended the run; QEMU's own
    # errors also exit with 1, but say so on stderr.
    if output.end_status is None and (exit_code & 1 == 0 or program in stderr):
        raise BootError(f"QEMU ended (exit code {exit_code}) without the engine ending the run: "
                        f"{stderr.strip() or output.log.strip() or 'no output'}")
    status = output.end_status if output.end_status is not None else exit_code >> 1
    return BootResult(**vars(output), status=status, exit_code=exit_code, stderr=stderr,
                      seconds=time.monotonic() - started, screenshot=shot, screen_text=screen_text)


def send_serial(process: subprocess.Popen, byte: int) -> None:
    """One byte to the guest's COM1; if QEMU is gone already, its exit code and stderr tell why."""
    try:
        process.stdin.write(bytes([byte]))
        process.stdin.flush()
    except BrokenPipeError:
        pass


def stream_records(process: subprocess.Popen, decoder: SerialDecoder, deadline: float, timeout: float,
                   cue: bytes | None = None) -> Iterator[Record]:
    """Yield the records of QEMU's serial output as they complete, until QEMU closes it; BootError at deadline.
    With cue (the UEFI loader's line: the firmware resets the UART, so nothing sent earlier survives), send
    SERIAL_RECORDS once the log text holds it."""
    fd = process.stdout.fileno()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BootError(f"the boot did not finish within {timeout:g} s (QEMU killed): raise the timeout, "
                            f"or look at the output so far: {decoder.output().log[-200:]!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return
        yield from decoder.feed(chunk)
        if cue is not None and cue in decoder.log:
            send_serial(process, SERIAL_RECORDS)
            cue = None


def take_screenshot(monitor: Path, scratch: Path, png: Path, deadline: float,
                    text_page: bool = True) -> tuple[Path, str | None]:
    """Ask QEMU, through QMP, for a PNG screendump of the screen and (text_page) for the VGA text page's memory: the
    screenshot's path and the screen's text (None without text_page)."""
    from qemu.qmp import QMPError  # (asyncio underneath: loaded only when a screenshot is asked for)
    from qemu.qmp.legacy import QEMUMonitorProtocol

    shot, page = scratch / "screen.png", scratch / "text.bin"
    client = QEMUMonitorProtocol(str(monitor))
    try:
        client.connect()
        client.settimeout(max(deadline - time.monotonic(), 0.1))
        client.cmd("screendump", filename=str(shot), format="png")
        if text_page:
            client.cmd("pmemsave", val=TEXT_PAGE, size=TEXT_COLUMNS * TEXT_ROWS * 2, filename=str(page))
    except (OSError, QMPError) as error:
        raise BootError(f"cannot take the screenshot through QEMU's QMP: {error}") from None
    finally:
        client.close()
    write_atomically(png, (shot.read_bytes(),))
    if not text_page:
        return png, None
    characters = page.read_bytes()[::2].decode("cp437")  # (character, attribute) pairs
    lines = (characters[i:i + TEXT_COLUMNS].rstrip() for i in range(0, len(characters), TEXT_COLUMNS))
    return png, "\n".join(lines)
