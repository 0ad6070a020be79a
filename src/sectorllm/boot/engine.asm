; engine.asm - sectorllm boot engine: start-up, unreal mode, model loading, serial and screen output, end of run.
;
; The boot sector (boot.asm) loads this file at ENGINE_BASE and jumps to its first byte. The forward pass and the
; sampling loop go where the FORWARD PASS banner in engine_start says; everything they need is set up before it.
;
; MEMORY MAP (physical addresses)
;   0x00000 - 0x004FF   interrupt vectors, BIOS data area                                      BIOS
;   0x00500 - 0x07BFF   stack: SS:SP = 0:STACK_TOP, grows down (about 29 KiB)
;   0x07C00 - 0x07DFF   boot sector                                                            done with
;   0x07E00 - 0x07FFF   RUN_BLOCK: the run block sector, fields at RB_* (image.py RunBlock)    read only
;   0x08000 - 0x0FFFF   ENGINE_BASE: this program, code and data (at most 32 KiB: 16-bit offsets with DS=0)
;   0x10000 - 0x17FFF   DISK_BUFFER: INT 13h reads land here, LOAD_CHUNK_SECTORS at a time
;   0x18000 - 0x1FFFF   free
;   0x20000 - 0x7FFFF   LOW_WORK: 384 KiB free for the forward pass (below any EBDA)
;   0x80000 - 0xFFFFF   EBDA, VGA memory, option ROMs, BIOS                                    not ours
;   0x100000            MODEL_BASE: the model blob, [RUN_BLOCK + RB_MODEL_BYTES] long, loaded in whole sectors
;   [heap_base, mem_top) free high memory for the KV cache and activations; heap_base is the end of the model
;                       rounded up to 4 KiB, mem_top the end of the RAM that starts at 1 MiB (INT 15h E801/88h)
;
; REGISTER CONVENTIONS
;   CS = DS = ES = FS = GS = SS = 0 always. DS, ES, FS and GS are "unreal": their hidden limits are 4 GiB, so a
;   32-bit offset is a physical address (mov eax, [esi]; a32 rep movsd) and the model above 1 MiB is reachable.
;   Code and stack stay 16-bit: near calls, IP and SP below 0x10000.
;   Direction flag clear. Interrupts on, except inside enter_unreal_mode.
;   Routines take their arguments in registers as their banner says and preserve every register their banner does
;   not list under Clobbers; flags are always clobbered.
;   A BIOS call may come back with 64 KiB segment limits (see enter_unreal_mode), so every BIOS call site calls
;   enter_unreal_mode right after it; the output routines here already do. New BIOS calls must do the same.
;
; SERIAL PROTOCOL (COM1, 115200 8N1; image.py SerialDecoder parses it)
;   Outside records the stream is log text: ASCII, never STX. A record is STX, one tag letter, fields, ETX:
;     STX 'T' id ',' n ETX  b1 .. bn   a token: decimal id and byte count, then its n bytes raw (any values)
;     STX 'M' name '=' value ETX       a named value (decimal, unsigned 32-bit), e.g. checksums, memory size
;     STX 'E' status ETX               end of run; the status also goes to isa-debug-exit (port 0xF4)
;   Screen (BIOS teletype) shows log text and token bytes, "\n" as CR LF; never records.
;   Input: if the runner sent SERIAL_HOLD before the end, end_run waits for SERIAL_GO before port 0xF4, so the runner
;   can take a screenshot while the final screen is still there.

        bits 16
        cpu 386

STACK_TOP           equ 0x7C00
RUN_BLOCK           equ 0x7E00
ENGINE_BASE         equ 0x8000
DISK_BUFFER         equ 0x10000
LOW_WORK            equ 0x20000
LOW_WORK_END        equ 0x80000
MODEL_BASE          equ 0x100000
LOAD_CHUNK_SECTORS  equ 64              ; 32 KiB: fits DISK_BUFFER, under the 127-sector limit of some BIOSes
HEAP_ALIGN          equ 4096

RB_MAGIC            equ 0               ; run block fields (image.py RUN_BLOCK_FORMAT, little-endian)
RB_VERSION          equ 4               ; u16
RB_ENGINE_SECTORS   equ 6               ; u16
RB_MODEL_LBA        equ 8               ; u32
RB_MODEL_BYTES      equ 12              ; u32
RB_TEMPERATURE      equ 16              ; u32, temperature * 65536 (0 = greedy)
RB_TOPP             equ 20              ; u32, top-p * 65536
RB_SEED             equ 24              ; u64
RB_STEPS            equ 32              ; u16
RB_PROMPT_COUNT     equ 34              ; u16
RB_PROMPT_IDS       equ 36              ; u16[RB_PROMPT_COUNT]
RUN_MAGIC           equ 'SLRB'
RUN_VERSION         equ 1

COM1                equ 0x3F8
UART_LSR            equ COM1 + 5
LSR_DATA_READY      equ 0x01
LSR_THR_EMPTY       equ 0x20
SYSTEM_CONTROL_A    equ 0x92            ; "fast A20" port
DEBUG_EXIT_PORT     equ 0xF4

STX                 equ 0x02
ETX                 equ 0x03
SERIAL_HOLD         equ 0x12
SERIAL_GO           equ 0x14

STATUS_OK               equ 0x00        ; image.py Status mirrors these
STATUS_DISK_ERROR       equ 0x02
STATUS_BAD_RUN_BLOCK    equ 0x03
STATUS_A20_CLOSED       equ 0x04
STATUS_MODEL_TOO_LARGE  equ 0x05
STATUS_NO_FORWARD_PASS  equ 0x06

        org ENGINE_BASE

; ---------------------------------------------------------------------------------------------------------------
; engine_start: the entry point; sets up the machine, loads the model and runs (for now: the self-test) to the end.
; Entry:    CS=0, IP=ENGINE_BASE, DL = BIOS boot drive, run block at RUN_BLOCK
; Output:   never returns: end_run
; ---------------------------------------------------------------------------------------------------------------
engine_start:
        cli
        xor ax, ax
        mov ds, ax
        mov es, ax
        mov fs, ax
        mov gs, ax
        mov ss, ax
        mov sp, STACK_TOP
        sti
        cld
        mov [boot_drive], dl
        call serial_init
        mov si, msg_banner
        call print_string

        cmp dword [RUN_BLOCK + RB_MAGIC], RUN_MAGIC
        jne .bad_run_block
        cmp word [RUN_BLOCK + RB_VERSION], RUN_VERSION
        jne .bad_run_block
        call enable_a20
        call enter_unreal_mode
        call check_a20
        call detect_memory
        call place_model
        call load_model

%ifdef SELFTEST
        call selftest
        mov al, STATUS_OK
%else
        ; ===========================================================================================================
        ; FORWARD PASS AND SAMPLING LOOP GO HERE.
        ; Ready at this point: the packed model at MODEL_BASE (its header gives dims and section offsets), free
        ; memory [heap_base, mem_top) and LOW_WORK, the run block (prompt ids, steps, temperature, top-p, seed).
        ; Per generated token: forward pass, sample, report_token. Then AL = STATUS_OK and on to end_run.
        ; ===========================================================================================================
        mov si, msg_no_forward_pass
        call print_string
        mov al, STATUS_NO_FORWARD_PASS
%endif
        jmp end_run

.bad_run_block:
        mov si, msg_bad_run_block
        mov al, STATUS_BAD_RUN_BLOCK
        jmp fail

; ---------------------------------------------------------------------------------------------------------------
; fail: print a reason (log text on COM1 and the screen) and end the run with a status.
; Entry:    SI = NUL-terminated message, AL = status
; Output:   never returns
; ---------------------------------------------------------------------------------------------------------------
fail:
        call print_string
        ; fall through into end_run

; ---------------------------------------------------------------------------------------------------------------
; end_run: send the end record, let a runner that asked for it take its screenshot, then leave through QEMU's
; isa-debug-exit (QEMU exits with status (AL << 1) | 1) and halt where that device does not exist.
; Entry:    AL = status (0..127)
; Output:   never returns
; ---------------------------------------------------------------------------------------------------------------
end_run:
        mov bl, al
        mov al, STX
        call serial_put
        mov al, 'E'
        call serial_put
        movzx eax, bl
        call serial_decimal
        mov al, ETX
        call serial_put
        call wait_for_runner
        mov al, bl
        out DEBUG_EXIT_PORT, al
.halt:
        cli
        hlt
        jmp .halt

; ---------------------------------------------------------------------------------------------------------------
; wait_for_runner: if the first byte waiting on COM1 is SERIAL_HOLD, wait until SERIAL_GO arrives; otherwise
; return at once (nothing waiting, another byte, or no UART at all: its status register then reads 0xFF).
; Clobbers: AL, DX
; ---------------------------------------------------------------------------------------------------------------
wait_for_runner:
        mov dx, UART_LSR
        in al, dx
        test al, LSR_DATA_READY
        jz .done
        mov dx, COM1
        in al, dx
        cmp al, SERIAL_HOLD
        jne .done
.wait:
        mov dx, UART_LSR
.poll:
        in al, dx
        test al, LSR_DATA_READY
        jz .poll
        mov dx, COM1
        in al, dx
        cmp al, SERIAL_GO
        jne .wait
.done:
        ret

; ---------------------------------------------------------------------------------------------------------------
; enable_a20: open the A20 gate through the "fast A20" port so odd megabytes are not aliased to even ones.
; Clobbers: AL
; ---------------------------------------------------------------------------------------------------------------
enable_a20:
        in al, SYSTEM_CONTROL_A
        test al, 0x02
        jnz .done
        or al, 0x02
        and al, 0xFE                    ; bit 0 would reset the machine
        out SYSTEM_CONTROL_A, al
.done:
        ret

; ---------------------------------------------------------------------------------------------------------------
; check_a20: fail the run if addresses 1 MiB apart still alias (A20 closed).
; Entry:    unreal mode
; Clobbers: EAX, ESI, EDI
; ---------------------------------------------------------------------------------------------------------------
check_a20:
        mov esi, a20_probe
        lea edi, [esi + 0x100000]
        mov word [esi], 0
        mov word [edi], 0xA20A
        cmp word [esi], 0
        jne .closed
        ret
.closed:
        mov si, msg_a20_closed
        mov al, STATUS_A20_CLOSED
        jmp fail

; ---------------------------------------------------------------------------------------------------------------
; enter_unreal_mode: give DS, ES, FS and GS 4 GiB limits and return to real mode with all of them 0 again.
; Measured (QEMU 7.2, SeaBIOS 1.16.2, IDE disk; hidden limits read with the monitor's info registers): INT 13h
; AH=42h, INT 10h AH=0Eh, INT 15h E801h, INT 16h and INT 1Ah all kept the 4 GiB limits, under TCG and KVM.
; But BIOSes that run drivers in protected mode (SeaBIOS's call32 for AHCI/virtio/USB disks, many firmware
; CSMs) come back with 64 KiB limits, so every BIOS call site here calls this again afterwards. Note TCG (QEMU
; and unicorn) never checks real-mode limits: only KVM or real hardware would catch a lost unreal mode.
; Clobbers: nothing
; ---------------------------------------------------------------------------------------------------------------
enter_unreal_mode:
        pushf
        push eax
        push bx
        cli                             ; an interrupt handler would run with protected-mode segment semantics
        lgdt [gdt_descriptor]
        mov eax, cr0
        or al, 1
        mov cr0, eax
        jmp .protected                  ; the 386 needs its prefetch queue flushed after a mode switch
.protected:
        mov bx, FLAT_DATA_SELECTOR      ; loading a selector in protected mode fills the hidden 4 GiB limit
        mov ds, bx
        mov es, bx
        mov fs, bx
        mov gs, bx
        and al, 0xFE
        mov cr0, eax
        jmp .real
.real:
        xor bx, bx                      ; back in real mode the bases return to 0; the limits stay
        mov ds, bx
        mov es, bx
        mov fs, bx
        mov gs, bx
        pop bx
        pop eax
        popf
        ret

; ---------------------------------------------------------------------------------------------------------------
; detect_memory: find where the RAM that starts at 1 MiB ends, with INT 15h E801h, else INT 15h AH=88h.
; Output:   [mem_top] = physical end address of that RAM (0x100000 if the BIOS reports none)
; Clobbers: EAX, EBX, ECX, EDX
; ---------------------------------------------------------------------------------------------------------------
detect_memory:
        mov ax, 0xE801
        xor bx, bx
        xor cx, cx
        xor dx, dx
        int 0x15
        jc .try_88
        jcxz .ax_bx                     ; BIOSes answer in AX/BX, CX/DX or both
        mov ax, cx
        mov bx, dx
.ax_bx:
        movzx eax, ax                   ; KiB between 1 MiB and 16 MiB
        shl eax, 10
        add eax, MODEL_BASE
        cmp eax, 0x1000000
        jb .store                       ; a hole below 16 MiB: what lies above it is not contiguous
        movzx ebx, bx                   ; 64 KiB blocks above 16 MiB
        shl ebx, 16
        add eax, ebx
        jmp .store
.try_88:
        mov ah, 0x88
        int 0x15
        mov ebx, MODEL_BASE
        jc .none
        movzx eax, ax
        shl eax, 10
        add eax, ebx
        jmp .store
.none:
        mov eax, ebx
.store:
        mov [mem_top], eax
        jmp enter_unreal_mode

; ---------------------------------------------------------------------------------------------------------------
; place_model: size the model in sectors, check that it fits the RAM above 1 MiB, and put the heap after it.
; Output:   [model_sectors], [heap_base]; fails the run with the sizes when the model does not fit
; Clobbers: EAX, EBX, SI
; ---------------------------------------------------------------------------------------------------------------
place_model:
        mov eax, [RUN_BLOCK + RB_MODEL_BYTES]
        mov ebx, eax
        shr eax, 9
        test bx, 511
        jz .whole
        inc eax
.whole:
        mov [model_sectors], eax
        shl eax, 9
        add eax, MODEL_BASE
        cmp eax, [mem_top]
        ja .too_large
        add eax, HEAP_ALIGN - 1
        and eax, -HEAP_ALIGN
        mov [heap_base], eax

        mov si, msg_model
        call print_string
        mov eax, [RUN_BLOCK + RB_MODEL_BYTES]
        call print_decimal
        mov si, msg_model_memory
        call print_string
        mov eax, [mem_top]
        sub eax, MODEL_BASE
        shr eax, 10
        call print_decimal
        mov si, msg_kib_above_1mib
        jmp print_string

.too_large:
        mov si, msg_too_large
        call print_string
        mov eax, [model_sectors]
        shl eax, 9
        add eax, 1023
        shr eax, 10
        call print_decimal
        mov si, msg_too_large_has
        call print_string
        mov eax, [mem_top]
        sub eax, MODEL_BASE
        shr eax, 10
        call print_decimal
        mov si, msg_kib_above_1mib
        mov al, STATUS_MODEL_TOO_LARGE
        jmp fail

; ---------------------------------------------------------------------------------------------------------------
; load_model: read the model from disk to MODEL_BASE, LOAD_CHUNK_SECTORS at a time through DISK_BUFFER.
; Entry:    [model_sectors] set (place_model)
; Output:   the model at MODEL_BASE; unreal mode; fails the run on a disk error
; Clobbers: EAX, EBX, ECX, EDX, ESI, EDI, EBP
; ---------------------------------------------------------------------------------------------------------------
load_model:
        mov edi, MODEL_BASE
        mov ebx, [RUN_BLOCK + RB_MODEL_LBA]
        mov ebp, [model_sectors]
.next_chunk:
        test ebp, ebp
        jz .done
        mov ecx, LOAD_CHUNK_SECTORS
        cmp ebp, ecx
        jae .read
        mov ecx, ebp
.read:
        mov [dap.count], cx
        mov [dap.lba], ebx
        mov si, dap
        mov dl, [boot_drive]
        mov ah, 0x42
        pushad                          ; BIOSes differ in which registers they keep
        int 0x13
        mov [disk_status], ah
        popad
        jc .disk_error                  ; popad leaves the flags alone
        call enter_unreal_mode
        add ebx, ecx
        sub ebp, ecx
        mov esi, DISK_BUFFER
        shl ecx, 7                      ; sectors -> dwords
        a32 rep movsd
        jmp .next_chunk
.done:
        ret
.disk_error:
        mov si, msg_disk_error
        call print_string
        movzx eax, byte [disk_status]
        call print_decimal
        mov si, msg_newline
        mov al, STATUS_DISK_ERROR
        jmp fail

; ---------------------------------------------------------------------------------------------------------------
; serial_init: COM1 at 115200 baud, 8 data bits, no parity, 1 stop bit, no FIFOs, no interrupts (we poll).
; Clobbers: AL, DX
; ---------------------------------------------------------------------------------------------------------------
serial_init:
        mov dx, COM1 + 1                ; interrupt enable: none
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
; serial_put: send one byte to COM1 once its transmit holding register is empty.
; Entry:    AL = byte
; Clobbers: nothing
; ---------------------------------------------------------------------------------------------------------------
serial_put:
        push dx
        push ax
        mov dx, UART_LSR
.wait:
        in al, dx
        test al, LSR_THR_EMPTY
        jz .wait
        pop ax
        mov dx, COM1
        out dx, al
        pop dx
        ret

; ---------------------------------------------------------------------------------------------------------------
; screen_put: show one byte with the BIOS teletype; "\n" becomes CR LF.
; Entry:    AL = byte
; Clobbers: nothing
; ---------------------------------------------------------------------------------------------------------------
screen_put:
        pusha
        xor bx, bx                      ; page 0, colour 0 (only used in graphics modes)
        cmp al, 10
        jne .show
        mov ax, 0x0E0D
        int 0x10
        mov al, 10
.show:
        mov ah, 0x0E
        int 0x10
        call enter_unreal_mode
        popa
        ret

; ---------------------------------------------------------------------------------------------------------------
; put_char: one byte of log text to COM1 and the screen.
; Entry:    AL = byte
; Clobbers: nothing
; ---------------------------------------------------------------------------------------------------------------
put_char:
        call serial_put
        jmp screen_put

; ---------------------------------------------------------------------------------------------------------------
; print_string: log text to COM1 and the screen.
; Entry:    SI = NUL-terminated string (offset in segment 0)
; Clobbers: nothing
; ---------------------------------------------------------------------------------------------------------------
print_string:
        push si
        push ax
.next:
        lodsb
        test al, al
        jz .done
        call put_char
        jmp .next
.done:
        pop ax
        pop si
        ret

; ---------------------------------------------------------------------------------------------------------------
; serial_string: a string to COM1 only (record fields).
; Entry:    SI = NUL-terminated string (offset in segment 0)
; Clobbers: nothing
; ---------------------------------------------------------------------------------------------------------------
serial_string:
        push si
        push ax
.next:
        lodsb
        test al, al
        jz .done
        call serial_put
        jmp .next
.done:
        pop ax
        pop si
        ret

; ---------------------------------------------------------------------------------------------------------------
; format_decimal: unsigned decimal digits of EAX, in a buffer that the next call overwrites.
; Entry:    EAX = number
; Output:   SI = NUL-terminated digits
; Clobbers: nothing
; ---------------------------------------------------------------------------------------------------------------
format_decimal:
        push eax
        push ebx
        push edx
        mov si, decimal_end
        mov ebx, 10
.digit:
        xor edx, edx
        div ebx
        add dl, '0'
        dec si
        mov [si], dl
        test eax, eax
        jnz .digit
        pop edx
        pop ebx
        pop eax
        ret

; ---------------------------------------------------------------------------------------------------------------
; print_decimal: EAX in decimal as log text to COM1 and the screen.
; Entry:    EAX = number
; Clobbers: nothing
; ---------------------------------------------------------------------------------------------------------------
print_decimal:
        push si
        call format_decimal
        call print_string
        pop si
        ret

; ---------------------------------------------------------------------------------------------------------------
; serial_decimal: EAX in decimal to COM1 only (record fields).
; Entry:    EAX = number
; Clobbers: nothing
; ---------------------------------------------------------------------------------------------------------------
serial_decimal:
        push si
        call format_decimal
        call serial_string
        pop si
        ret

; ---------------------------------------------------------------------------------------------------------------
; report_token: a generated token: its record (id, byte count, bytes) to COM1, its bytes to the screen.
; Entry:    EAX = token id, ESI = physical address of its bytes, ECX = byte count
; Clobbers: nothing
; ---------------------------------------------------------------------------------------------------------------
report_token:
        push eax
        push ecx
        push esi
        push eax
        mov al, STX
        call serial_put
        mov al, 'T'
        call serial_put
        pop eax
        call serial_decimal
        mov al, ','
        call serial_put
        mov eax, ecx
        call serial_decimal
        mov al, ETX
        call serial_put
.next:
        jecxz .done
        a32 lodsb
        call serial_put
        call screen_put
        dec ecx
        jmp .next
.done:
        pop esi
        pop ecx
        pop eax
        ret

; ---------------------------------------------------------------------------------------------------------------
; report_value: a named number as a record on COM1, for the runner (checksums, sizes).
; Entry:    SI = NUL-terminated name ([a-z0-9_]), EAX = value
; Clobbers: nothing
; ---------------------------------------------------------------------------------------------------------------
report_value:
        push ax
        mov al, STX
        call serial_put
        mov al, 'M'
        call serial_put
        call serial_string
        mov al, '='
        call serial_put
        pop ax
        call serial_decimal
        push ax
        mov al, ETX
        call serial_put
        pop ax
        ret

%ifdef SELFTEST
; ---------------------------------------------------------------------------------------------------------------
; selftest: prove the machinery without a model: report what the engine sees (memory, run block), checksum the
; loaded blob in high memory, and report fixed tokens whose bytes it first copies above 1 MiB.
; Checksum (tests recompute it): the blob as little-endian u32 words, zero-padded to a whole sector;
;   sum = w0 + w1 + ... (mod 2^32), weighted_sum = sum over i of (w0 + .. + wi) (mod 2^32), which sees order.
; Clobbers: EAX, EBX, ECX, EDX, ESI, EDI
; ---------------------------------------------------------------------------------------------------------------
selftest:
        mov eax, [mem_top]
        shr eax, 10
        mov si, name_mem_top_kib
        call report_value
        mov eax, [heap_base]
        mov si, name_heap_base
        call report_value
        mov eax, [RUN_BLOCK + RB_MODEL_BYTES]
        mov si, name_model_bytes
        call report_value
        movzx eax, word [RUN_BLOCK + RB_STEPS]
        mov si, name_steps
        call report_value
        mov eax, [RUN_BLOCK + RB_TEMPERATURE]
        mov si, name_temperature
        call report_value
        mov eax, [RUN_BLOCK + RB_TOPP]
        mov si, name_topp
        call report_value
        mov eax, [RUN_BLOCK + RB_SEED]
        mov si, name_seed_low
        call report_value
        mov eax, [RUN_BLOCK + RB_SEED + 4]
        mov si, name_seed_high
        call report_value
        movzx ecx, word [RUN_BLOCK + RB_PROMPT_COUNT]
        mov eax, ecx
        mov si, name_prompt_count
        call report_value
        xor eax, eax                    ; the sum of the prompt ids shows they all arrived
        mov si, RUN_BLOCK + RB_PROMPT_IDS
.prompt:
        jecxz .prompt_done
        movzx ebx, word [si]
        add eax, ebx
        add si, 2
        dec ecx
        jmp .prompt
.prompt_done:
        mov si, name_prompt_sum
        call report_value

        mov esi, MODEL_BASE
        mov ecx, [model_sectors]
        shl ecx, 7                      ; sectors -> dwords
        xor ebx, ebx                    ; running sum
        xor edx, edx                    ; sum of running sums
.checksum:
        jecxz .checksum_done
        a32 lodsd
        add ebx, eax
        add edx, ebx
        dec ecx
        jmp .checksum
.checksum_done:
        mov eax, ebx
        mov si, name_sum
        call report_value
        mov eax, edx
        mov si, name_weighted_sum
        call report_value

        mov esi, selftest_tokens
        mov edi, [heap_base]
        mov ecx, selftest_tokens_end - selftest_tokens
        a32 rep movsb
        mov edi, [heap_base]
        movzx edx, byte [selftest_tokens]
        inc edi
.token:
        movzx eax, word [edi]           ; u16 id, then u8 byte count, then the bytes
        movzx ecx, byte [edi + 2]
        lea esi, [edi + 3]
        call report_token
        lea edi, [esi + ecx]
        dec edx
        jnz .token
        ret

selftest_tokens:
        db 6
        dw 1
        db 4, "Once"
        dw 9038
        db 6, " upon", 10
        dw 13
        db 1, 10
        dw 0
        db 0
        dw 400
        db 7, 0x00, 0xFF, STX, ETX, SERIAL_HOLD, 0x80, 0x0D
        dw 65535
        db 9, " time.", 13, 10, 0x7F
selftest_tokens_end:

name_mem_top_kib:   db "mem_top_kib", 0
name_heap_base:     db "heap_base", 0
name_model_bytes:   db "model_bytes", 0
name_steps:         db "steps", 0
name_temperature:   db "temperature", 0
name_topp:          db "topp", 0
name_seed_low:      db "seed_low", 0
name_seed_high:     db "seed_high", 0
name_prompt_count:  db "prompt_count", 0
name_prompt_sum:    db "prompt_sum", 0
name_sum:           db "sum", 0
name_weighted_sum:  db "weighted_sum", 0
%endif

gdt:                dq 0
flat_data:                              ; base 0, limit 0xFFFFF pages = 4 GiB, present writable data, 16-bit
                    dw 0xFFFF, 0x0000
                    db 0x00, 0x92, 0x8F, 0x00
gdt_end:
FLAT_DATA_SELECTOR  equ flat_data - gdt
gdt_descriptor:     dw gdt_end - gdt - 1
                    dd gdt

dap:                                    ; INT 13h AH=42h disk address packet, buffer fixed at DISK_BUFFER
                    db 16, 0
.count:             dw 0
.offset:            dw DISK_BUFFER & 0xF
.segment:           dw DISK_BUFFER >> 4
.lba:               dq 0

boot_drive:         db 0
disk_status:        db 0                ; AH of the last INT 13h read
a20_probe:          dw 0
mem_top:            dd 0
model_sectors:      dd 0
heap_base:          dd 0
decimal_digits:     times 10 db 0       ; 2^32 - 1 has 10 digits
decimal_end:        db 0

msg_banner:         db "sectorllm engine", 10, 0
msg_bad_run_block:  db "sectorllm: the run block is missing or of another version (rebuild the image)", 10, 0
msg_a20_closed:     db "sectorllm: the A20 gate did not open (port 0x92): memory above 1 MiB is unusable", 10, 0
msg_model:          db "model: ", 0
msg_model_memory:   db " bytes; memory: ", 0
msg_kib_above_1mib: db " KiB above 1 MiB", 10, 0
msg_too_large:      db "sectorllm: the model needs ", 0
msg_too_large_has:  db " KiB above 1 MiB but this machine has ", 0
msg_disk_error:     db "sectorllm: disk read failed while loading the model, INT 13h status ", 0
msg_newline:        db 10, 0
msg_no_forward_pass: db "sectorllm: this engine has no forward pass yet", 10, 0

engine_end:
