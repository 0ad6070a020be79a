; boot.asm - sectorllm boot sector: sets up COM1, loads the run block and the engine, opens A20, checks that the RAM
; holds what the run needs, loads the model above 1 MiB with BIOS services only and jumps to the engine.
;
; Disk image (512-byte sectors, LBA; image.py writes it, docs there):
;   LBA 0                 this boot sector
;   LBA 1                 run block: magic "SLRB", version, engine sector count, model LBA and length, generation
;                         parameters, memory_end (the end of the model, the engine's buffers and its KV cache)
;   LBA 2 .. 2+E-1        engine binary, E = run block engine_sectors (at most 64: 32 KiB)
;   LBA model_lba ..      model blob, model_bytes long (sector-aligned start)
;
; Memory when the engine starts (physical addresses):
;   0x00500  MEM_TOP: u32, the end of the RAM that starts at 1 MiB (INT 15h E801h)
;   0x07C00  this sector          0x07E00  run block          0x08000  engine (entered at its first byte)
;   0x10000  DISK_BUFFER, where each chunk is read before INT 15h AH=87h copies it up
;   0x100000 MODEL_BASE: the model, its last sector padded with what the disk holds there
;   A20 open, CS=DS=ES=SS=0, ESP=0x7C00, interrupts on, direction flag clear.
;
; On failure it prints a one-line reason to COM1 and the screen and ends the run through QEMU's isa-debug-exit
; (port 0xF4; QEMU exits with status (v << 1) | 1), then halts for machines without that device.
; The status values are shared with engine.asm and image.py (Status).

        bits 16
        cpu 386
        org 0x7C00

STACK_TOP           equ 0x7C00
MEM_TOP             equ 0x0500          ; u32 for the engine: the end of the RAM that starts at 1 MiB
A20_PROBE           equ 0x0504
MOVE_GDT            equ 0x0600          ; INT 15h AH=87h's six descriptors; the BIOS fills in four
RUN_BLOCK           equ 0x7E00
ENGINE_BASE         equ 0x8000
DISK_BUFFER         equ 0x10000
MODEL_BASE          equ 0x100000
RUN_BLOCK_LBA       equ 1
ENGINE_LBA          equ 2
MAX_ENGINE_SECTORS  equ 64              ; the engine lives in 0x8000..0xFFFF
LOAD_CHUNK_SECTORS  equ 64              ; 32 KiB: fits DISK_BUFFER, under the 127-sector limit of some BIOSes
RB_MAGIC            equ 0               ; run block field offsets (image.py RUN_BLOCK_FORMAT)
RB_VERSION          equ 4
RB_ENGINE_SECTORS   equ 6
RB_MODEL_LBA        equ 8
RB_MODEL_BYTES      equ 12
RB_MEMORY_END       equ 46              ; u32: the end of all the engine will use (image.py memory_end)
RUN_MAGIC           equ 'SLRB'
RUN_VERSION         equ 4

COM1                equ 0x3F8
SYSTEM_CONTROL_A    equ 0x92            ; "fast A20" port
DEBUG_EXIT_PORT     equ 0xF4
STATUS_DISK_ERROR       equ 0x02
STATUS_BAD_RUN_BLOCK    equ 0x03
STATUS_A20_CLOSED       equ 0x04
STATUS_MODEL_TOO_LARGE  equ 0x05

start:
        cli
        xor ax, ax
        mov ds, ax
        mov es, ax
        mov ss, ax
        mov esp, STACK_TOP              ; all of ESP: the engine's protected mode uses it
        sti
        cld
        jmp 0:normalized_cs             ; some BIOSes enter at 07C0:0000
normalized_cs:
        mov [dap.drive], dl
        mov ax, 0x00E3                  ; COM1 at 9600 baud, 8N1 (INT 14h AH=00h); no FIFOs, which would drop a
        xor dx, dx                      ; byte the runner sent before we started (SERIAL_HOLD)
        int 0x14

        xor eax, eax
        mov al, RUN_BLOCK_LBA
        mov cx, 1
        mov bx, RUN_BLOCK >> 4
        call read_sectors
        mov si, msg_bad_run_block
        mov al, STATUS_BAD_RUN_BLOCK
        cmp dword [RUN_BLOCK + RB_MAGIC], RUN_MAGIC
        jne fail
        cmp word [RUN_BLOCK + RB_VERSION], RUN_VERSION
        jne fail
        mov cx, [RUN_BLOCK + RB_ENGINE_SECTORS]
        dec cx                          ; 1..MAX_ENGINE_SECTORS
        cmp cx, MAX_ENGINE_SECTORS - 1
        ja fail
        inc cx
        mov al, ENGINE_LBA
        mov bx, ENGINE_BASE >> 4
        call read_sectors

        in al, SYSTEM_CONTROL_A         ; open A20
        or al, 0x02
        and al, 0xFE                    ; bit 0 would reset the machine
        out SYSTEM_CONTROL_A, al
        push 0xFFFF
        pop es
        mov byte [A20_PROBE], 0         ; with A20 closed, 1 MiB higher is the same byte
        mov byte [es:A20_PROBE + 0x10], 1
        push ds
        pop es
        mov si, msg_a20_closed
        mov al, STATUS_A20_CLOSED
        cmp byte [A20_PROBE], 0
        jne fail

        mov ax, 0xE801                  ; the RAM from 1 MiB: KiB up to 16 MiB, 64 KiB blocks above
        xor cx, cx
        xor dx, dx
        int 0x15
        jnc .answer
        xor ax, ax
.answer:
        jcxz .ax_bx                     ; BIOSes answer in AX/BX, CX/DX or both
        xchg ax, cx
        mov bx, dx
.ax_bx: movzx eax, ax
        shl eax, 10
        add eax, MODEL_BASE
        bt eax, 24                      ; below 16 MiB (it is at most 16 MiB here): a hole; what lies above it
        jnc .top                        ; is not contiguous
        movzx ebx, bx
        shl ebx, 16
        add eax, ebx
.top:   mov [MEM_TOP], eax
        mov si, msg_out_of_memory
        mov al, STATUS_MODEL_TOO_LARGE
        cmp [RUN_BLOCK + RB_MEMORY_END], eax
        ja fail                         ; the model, the engine's buffers and its KV cache would not fit

        mov ebp, [RUN_BLOCK + RB_MODEL_BYTES]
        add ebp, 511
        shr ebp, 9                      ; sectors left to load
        mov si, move_descriptors        ; source (DISK_BUFFER) and destination descriptors
        mov di, MOVE_GDT + 0x10
        mov cx, 8
        rep movsw
        mov edi, MODEL_BASE
        mov eax, [RUN_BLOCK + RB_MODEL_LBA]
.chunk: mov ecx, LOAD_CHUNK_SECTORS
        cmp ebp, ecx
        jae .read
        mov cx, bp
.read:  mov bx, DISK_BUFFER >> 4
        call read_sectors
        mov [MOVE_GDT + 0x1A], di       ; destination base, bits 0..15, 16..23 and 24..31
        ror edi, 16
        mov bx, di
        mov [MOVE_GDT + 0x1C], bl
        mov [MOVE_GDT + 0x1F], bh
        ror edi, 16
        pushad
        mov si, MOVE_GDT
        shl cx, 8                       ; sectors -> words
        mov ah, 0x87
        int 0x15                        ; copy to extended memory (the BIOS opens A20 for it)
        popad
        jc disk_error
        add eax, ecx
        shl ecx, 9
        add edi, ecx
        shr ecx, 9
        sub ebp, ecx
        jnz .chunk
        jmp 0:ENGINE_BASE

; ---------------------------------------------------------------------------------------------------------------
; read_sectors: read CX sectors starting at LBA EAX to BX:0 with INT 13h AH=42h; fails the boot on a disk error.
; Entry:    EAX = first LBA, CX = sector count (1..64), BX = destination segment
; Output:   the sectors in memory
; Clobbers: nothing
; ---------------------------------------------------------------------------------------------------------------
read_sectors:
        pushad
        mov [dap.count], cx
        mov [dap.segment], bx
        mov [dap.lba], eax
        mov si, dap
        mov dl, [dap.drive]
        mov ah, 0x42
        int 0x13
        jc disk_error
        popad
        ret

disk_error:
        mov si, msg_disk_error
        mov al, STATUS_DISK_ERROR
        ; fall through into fail

; ---------------------------------------------------------------------------------------------------------------
; fail: print "sectorllm: " and a NUL-terminated message to COM1 and the screen, end the run with a status.
; Entry:    SI = message, AL = status for isa-debug-exit
; ---------------------------------------------------------------------------------------------------------------
fail:
        push ax
        push si
        mov si, msg_prefix
        call print
        pop si
        call print
        pop ax
        out DEBUG_EXIT_PORT, al
.halt:  cli
        hlt
        jmp .halt

; print: a NUL-terminated string at SI to COM1 and the screen ("\n" as CR LF there). Clobbers: AX, BX, CX, DX, SI
print:  lodsb
        test al, al
        jz .done
        mov cl, al
        mov dx, COM1 + 5
.wait:  in al, dx                       ; line status bit 5: transmit holding register empty
        test al, 0x20
        jz .wait
        mov dl, COM1 & 0xFF
        mov al, cl
        out dx, al
        xor bx, bx
        cmp al, 10
        jne .screen
        mov ax, 0x0E0D
        int 0x10
        mov al, 10
.screen:
        mov ah, 0x0E
        int 0x10
        jmp print
.done:  ret

dap:                                    ; INT 13h AH=42h disk address packet
                    db 16, 0
.count:             dw 0
.offset:            dw 0
.segment:           dw 0
.lba:               dq 0
.drive:             db 0                ; (not part of the packet) the BIOS drive we booted from

move_descriptors:                       ; INT 15h AH=87h source and destination: 64 KiB, present writable data
                    dw 0xFFFF, DISK_BUFFER & 0xFFFF
                    db DISK_BUFFER >> 16, 0x93, 0, 0
                    dw 0xFFFF, 0
                    db 0, 0x93, 0, 0

msg_prefix:         db "sectorllm: ", 0
msg_bad_run_block:  db "bad image", 10, 0
msg_a20_closed:     db "A20 closed", 10, 0
msg_out_of_memory:  db "out of memory", 10, 0
msg_disk_error:     db "disk error", 10, 0

code_end:
        times 510 - ($ - $$) db 0
        dw 0xAA55
