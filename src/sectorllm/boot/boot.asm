; boot.asm - sectorllm boot sector: loads the run block and the engine with INT 13h extensions, then jumps to the engine.
;
; Disk image (512-byte sectors, LBA; image.py writes it, docs there):
;   LBA 0                 this boot sector
;   LBA 1                 run block: magic "SLRB", engine sector count, model LBA and length, generation parameters
;   LBA 2 .. 2+E-1        engine binary, E = run block engine_sectors (at most 64: 32 KiB)
;   LBA model_lba ..      model blob, model_bytes long (sector-aligned start)
;
; Memory when the engine starts (physical addresses):
;   0x07C00  this sector          0x07E00  run block          0x08000  engine (entered at its first byte)
;   CS=DS=ES=SS=0, SP=0x7C00, DL = BIOS drive number we booted from, interrupts on, direction flag clear.
;
; On failure it prints a one-line reason to COM1 and the screen and ends the run through QEMU's isa-debug-exit
; (port 0xF4; QEMU exits with status (v << 1) | 1), then halts for machines without that device.
; The status values are shared with engine.asm and image.py (Status).

        bits 16
        cpu 386
        org 0x7C00

STACK_TOP           equ 0x7C00
RUN_BLOCK           equ 0x7E00
ENGINE_BASE         equ 0x8000
RUN_BLOCK_LBA       equ 1
ENGINE_LBA          equ 2
MAX_ENGINE_SECTORS  equ 64              ; the engine lives in 0x8000..0xFFFF: 16-bit offsets with DS=0
RB_MAGIC            equ 0               ; run block field offsets (image.py RUN_BLOCK_FORMAT)
RB_ENGINE_SECTORS   equ 6
RUN_MAGIC           equ 'SLRB'

COM1                equ 0x3F8
DEBUG_EXIT_PORT     equ 0xF4
STATUS_NO_EDD        equ 0x01
STATUS_DISK_ERROR    equ 0x02
STATUS_BAD_RUN_BLOCK equ 0x03

start:
        cli
        xor ax, ax
        mov ds, ax
        mov es, ax
        mov ss, ax
        mov sp, STACK_TOP
        sti
        cld
        jmp 0:normalized_cs             ; some BIOSes enter at 07C0:0000; the engine expects CS=0
normalized_cs:
        mov [boot_drive], dl
        call serial_init

        mov ah, 0x41                    ; INT 13h extensions present, with the packet (AH=42h) interface?
        mov bx, 0x55AA
        mov dl, [boot_drive]
        int 0x13
        jc no_extensions
        cmp bx, 0xAA55
        jne no_extensions
        test cl, 1
        jz no_extensions

        mov eax, RUN_BLOCK_LBA
        mov cx, 1
        mov bx, RUN_BLOCK
        call read_sectors
        cmp dword [RUN_BLOCK + RB_MAGIC], RUN_MAGIC
        jne bad_run_block
        mov cx, [RUN_BLOCK + RB_ENGINE_SECTORS]
        jcxz bad_run_block
        cmp cx, MAX_ENGINE_SECTORS
        ja bad_run_block

        mov eax, ENGINE_LBA
        mov bx, ENGINE_BASE
        call read_sectors
        mov dl, [boot_drive]
        jmp 0:ENGINE_BASE

no_extensions:
        mov si, msg_no_extensions
        mov al, STATUS_NO_EDD
        jmp fail
bad_run_block:
        mov si, msg_bad_run_block
        mov al, STATUS_BAD_RUN_BLOCK
        jmp fail

; ---------------------------------------------------------------------------------------------------------------
; read_sectors: read CX sectors starting at LBA EAX into 0:BX with INT 13h AH=42h; fails the boot on a disk error.
; Entry:    EAX = first LBA, CX = sector count (1..64), BX = destination offset in segment 0
; Output:   the sectors in memory
; Clobbers: AX, SI, DL
; ---------------------------------------------------------------------------------------------------------------
read_sectors:
        mov [dap.count], cx
        mov [dap.offset], bx
        mov [dap.lba], eax
        mov si, dap
        mov dl, [boot_drive]
        mov ah, 0x42
        int 0x13
        jc .error
        ret
.error:
        mov al, ah                      ; BIOS status byte, printed so a failing disk can be looked up
        call hex_byte_into_message
        mov si, msg_disk_error
        mov al, STATUS_DISK_ERROR
        ; fall through into fail

; ---------------------------------------------------------------------------------------------------------------
; fail: print a NUL-terminated message to COM1 and the screen, end the run with a status, never return.
; Entry:    SI = message, AL = status for isa-debug-exit
; ---------------------------------------------------------------------------------------------------------------
fail:
        mov bl, al
.next:
        lodsb
        test al, al
        jz .end
        call put_char
        jmp .next
.end:
        mov al, bl
        out DEBUG_EXIT_PORT, al
.halt:
        cli
        hlt
        jmp .halt

; ---------------------------------------------------------------------------------------------------------------
; hex_byte_into_message: write AL as two hex digits into the disk error message.
; Entry:    AL = byte
; Clobbers: AX
; ---------------------------------------------------------------------------------------------------------------
hex_byte_into_message:
        mov ah, al
        shr al, 4
        call .digit
        mov [msg_disk_status], al
        mov al, ah
        and al, 0x0F
        call .digit
        mov [msg_disk_status + 1], al
        ret
.digit:
        add al, '0'
        cmp al, '9'
        jbe .done
        add al, 'A' - '0' - 10
.done:
        ret

; ---------------------------------------------------------------------------------------------------------------
; serial_init: COM1 at 115200 baud, 8 data bits, no parity, 1 stop bit, no FIFOs, no interrupts.
; Clobbers: AL, DX
; ---------------------------------------------------------------------------------------------------------------
serial_init:
        mov dx, COM1 + 1                ; interrupt enable: none, we poll
        xor al, al
        out dx, al
        add dx, 2                       ; line control: DLAB on to set the divisor
        mov al, 0x80
        out dx, al
        sub dx, 3                       ; divisor 1 = 115200 baud
        mov al, 1
        out dx, al
        inc dx
        xor al, al
        out dx, al
        add dx, 2                       ; line control: 8N1, DLAB off
        mov al, 0x03
        out dx, al
        dec dx                          ; FIFO control: FIFOs off; turning them on would flush a byte
        xor al, al                      ; the runner sent before we started (SERIAL_HOLD)
        out dx, al
        add dx, 2                       ; modem control: DTR and RTS
        mov al, 0x03
        out dx, al
        ret

; ---------------------------------------------------------------------------------------------------------------
; put_char: send AL to COM1 (raw) and to the screen (BIOS teletype; "\n" becomes CR LF there only).
; Entry:    AL = byte
; Clobbers: nothing
; ---------------------------------------------------------------------------------------------------------------
put_char:
        pusha
        mov cl, al
        mov dx, COM1 + 5
.wait_thr:
        in al, dx                       ; line status bit 5: transmit holding register empty
        test al, 0x20
        jz .wait_thr
        mov dx, COM1
        mov al, cl
        out dx, al
        cmp al, 10
        jne .screen
        mov ax, 0x0E0D
        xor bx, bx
        int 0x10
        mov al, 10
.screen:
        mov ah, 0x0E
        xor bx, bx
        int 0x10
        popa
        ret

boot_drive:         db 0
dap:                                    ; INT 13h AH=42h disk address packet
                    db 16, 0
.count:             dw 0
.offset:            dw 0
.segment:           dw 0
.lba:               dq 0

msg_no_extensions:  db "sectorllm boot: this BIOS has no INT 13h extensions (AH=42h)", 10, 0
msg_bad_run_block:  db "sectorllm boot: sector 1 is not a sectorllm run block (rebuild the image)", 10, 0
msg_disk_error:     db "sectorllm boot: disk read failed, INT 13h status 0x"
msg_disk_status:    db "??", 10, 0

code_end:
        times 510 - ($ - $$) db 0
        dw 0xAA55
