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
RB_INV_TEMPERATURE  equ 16              ; u32, round(65536 / temperature); 0 = greedy
RB_TOPP             equ 20              ; u32, round(65536 * top-p); 65536 = off
RB_TOPK             equ 24              ; u32, 0 = off
RB_SEED             equ 28              ; u64: xorshift64* state, advanced in place by random_u32
RB_STEPS            equ 36              ; u16, forward passes, prompt included; 0 = the whole context
RB_PROMPT_COUNT     equ 38              ; u16
RB_PROMPT_IDS       equ 40              ; u16[RB_PROMPT_COUNT]
RUN_MAGIC           equ 'SLRB'
RUN_VERSION         equ 2

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

HDR_BYTES           equ 512             ; the packed header and section table, copied below 64 KiB
TABLE_OFFSET        equ 128             ; packed header fields (docs/format.md), little-endian u32 / i32:
H_DIM               equ 16
H_HIDDEN            equ 20
H_N_LAYERS          equ 24
H_N_HEADS           equ 28
H_N_KV_HEADS        equ 32
H_VOCAB             equ 36
H_SEQ_LEN           equ 40
H_FLAGS             equ 44              ; bit 0: the classifier is the token embedding
H_ACT_BITS_DIM      equ 52
H_ACT_BITS_HIDDEN   equ 56
H_ACT_BITS_HEAD     equ 60
H_ROPE_SHIFT        equ 68
H_RMS_EPS           equ 72
H_EXP_SHIFT         equ 76
H_SILU_SHIFT        equ 80
H_SILU_LO           equ 84
H_N_SECTIONS        equ 92

K_TOKEN_EMBEDDING_Q equ 1               ; section kinds (docs/format.md)
K_TOKEN_EMBEDDING_S equ 2
K_RMS_ATT_WEIGHT    equ 3
K_WQKV_Q            equ 4
K_WO_Q              equ 6
K_RMS_FFN_WEIGHT    equ 8
K_W13_Q             equ 9
K_W2_Q              equ 11
K_RMS_FINAL_WEIGHT  equ 13
K_WCLS_Q            equ 14
K_WCLS_RESIDUAL_Q   equ 16
K_ROPE              equ 18
K_EXP_TABLE         equ 19
K_SILU_TABLE        equ 20
K_PIECES            equ 21
K_PRINTED           equ 22
%define SECTION(kind) (SEC + 16 * (kind))
SEC_ADDR            equ 4               ; SEC entries: the table entry (kind, offset, length, param) with the
SEC_LEN             equ 8               ; offset replaced by the address
SEC_PARAM           equ 12

BOS                 equ 1
EOS                 equ 2
DOT_UNROLL          equ 8               ; multiply-adds per pass of dot_row

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
        call setup_model
        call generate
        mov al, STATUS_OK
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
        ja memory_too_small
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

; ---------------------------------------------------------------------------------------------------------------
; memory_too_small: fail the run, saying how much memory above 1 MiB the model needs and how much there is.
; Entry:    EAX = the end address the model needs
; Output:   never returns
; ---------------------------------------------------------------------------------------------------------------
memory_too_small:
        mov si, msg_too_large
        call print_string
        sub eax, MODEL_BASE - 1023
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
        mov eax, [RUN_BLOCK + RB_INV_TEMPERATURE]
        mov si, name_inv_temperature
        call report_value
        mov eax, [RUN_BLOCK + RB_TOPP]
        mov si, name_topp
        call report_value
        mov eax, [RUN_BLOCK + RB_TOPK]
        mov si, name_topk
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
name_inv_temperature: db "inv_temperature", 0
name_topp:          db "topp", 0
name_topk:          db "topk", 0
name_seed_low:      db "seed_low", 0
name_seed_high:     db "seed_high", 0
name_prompt_count:  db "prompt_count", 0
name_prompt_sum:    db "prompt_sum", 0
name_sum:           db "sum", 0
name_weighted_sum:  db "weighted_sum", 0
%endif

; ===============================================================================================================
; THE MODEL: setup, the generation loop, the forward pass and the sampler
; ===============================================================================================================

; ---------------------------------------------------------------------------------------------------------------
; setup_model: read the packed header (docs/format.md): copy it and the section table to HDR, derive the shape,
; place the buffers and the KV cache in [heap_base, mem_top) and build the interpolation tables.
; Clobbers: EAX, EBX, ECX, EDX, ESI, EDI
; ---------------------------------------------------------------------------------------------------------------
setup_model:
        mov esi, MODEL_BASE
        mov edi, HDR
        mov ecx, HDR_BYTES / 4
        a32 rep movsd
        call load_sections
        mov eax, [HDR + H_DIM]
        xor edx, edx
        div dword [HDR + H_N_HEADS]
        mov [head_size], eax
        xchg eax, ebx                   ; EBX = head_size
        mov eax, [HDR + H_N_HEADS]
        xor edx, edx
        div dword [HDR + H_N_KV_HEADS]
        mov [kv_mul], eax
        mov eax, [HDR + H_N_KV_HEADS]
        mul ebx
        mov [kv_dim], eax
        add eax, eax
        add eax, [HDR + H_DIM]
        mov [qkv_rows], eax
        lea eax, [ebx*2 + 4]            ; a key row: head_size int16 keys, then their i32 divisor
        mov [kv_stride], eax
        mov ecx, [HDR + H_SEQ_LEN]
        mul ecx
        mov [off_dv], eax
        lea eax, [eax + ecx*4]
        mov [off_vt], eax
        imul ebx, ecx
        add eax, ebx
        mov [kv_block], eax
        mul dword [HDR + H_N_KV_HEADS]
        mov [kv_layer_bytes], eax
        mul dword [HDR + H_N_LAYERS]
        push eax                        ; the whole KV cache

        xor ebx, ebx                    ; slot size: 16 bytes per element of the widest vector
        mov si, slot_widths
        mov cx, SLOT_WIDTHS
.widest:
        lodsw
        xchg ax, di
        mov eax, [di]
        cmp eax, ebx
        jb .narrower
        xchg eax, ebx
.narrower:
        loop .widest
        shl ebx, 4
        mov eax, [heap_base]
        mov di, buffers
        mov cx, N_BUFFERS
.place: stosd
        add eax, ebx
        loop .place
        mov [kv_base], eax
        pop edx
        add eax, edx
        cmp eax, [mem_top]
        ja memory_too_small

        mov bx, SECTION(K_EXP_TABLE)
        mov di, exp_pairs
        mov al, [HDR + H_EXP_SHIFT]
        call build_pairs
        mov bx, SECTION(K_SILU_TABLE)
        mov di, silu_pairs
        mov al, [HDR + H_SILU_SHIFT]
        ; fall through into build_pairs

; ---------------------------------------------------------------------------------------------------------------
; build_pairs: a packed interpolation table t[0..n) as lookup's table: n-1 and the step shift, then for i < n-1 the
; pairs (t[i], t[i+1] - t[i]), so an interpolation is one multiply with no register for t[i+1].
; Entry:    BX = SEC entry of the table, DI = its buffer variable (the slot), AL = step shift
; Output:   the variable points at the first pair
; Clobbers: EAX, ECX, ESI, EDI
; ---------------------------------------------------------------------------------------------------------------
build_pairs:
        movzx eax, al
        add dword [di], 8
        mov edi, [di]
        mov ecx, [bx + SEC_LEN]
        shr ecx, 2
        dec ecx
        mov [edi - 8], ecx
        mov [edi - 4], eax
        mov esi, [bx + SEC_ADDR]
.pair:  a32 lodsd
        a32 stosd
        neg eax
        add eax, [esi]
        a32 stosd
        loop .pair
        ret

; ---------------------------------------------------------------------------------------------------------------
; load_sections: SEC[kind] = the section table entry of each kind with its offset turned into an address; the
; classifier entries are the embedding's when it is shared. The weight addresses then move on layer by layer as
; the forward pass reads them, so it calls this first.
; Clobbers: CX, SI, DI
; ---------------------------------------------------------------------------------------------------------------
load_sections:
        mov si, HDR + TABLE_OFFSET
        mov cx, [HDR + H_N_SECTIONS]
.entry: mov di, [si]
        shl di, 4
        add di, SEC
        movsd
        movsd
        movsd
        movsd
        add dword [di - 12], MODEL_BASE
        loop .entry
        test byte [HDR + H_FLAGS], 1
        jz .done
        mov si, SECTION(K_TOKEN_EMBEDDING_Q)
        mov di, SECTION(K_WCLS_Q)
        mov cl, 8
        rep movsd
.done:  ret

; ---------------------------------------------------------------------------------------------------------------
; generate: run.c's generation loop (generate.py Generation): `steps` forward passes from the first prompt token;
; prompt tokens are forced and echoed, then sampled tokens are reported as they come. A sampled BOS or EOS ends
; the run: it is reported with no bytes.
; Clobbers: everything
; ---------------------------------------------------------------------------------------------------------------
generate:
        mov ax, [RUN_BLOCK + RB_STEPS]
        mov cx, [HDR + H_SEQ_LEN]
        dec ax
        cmp ax, cx
        jb .steps                       ; 0 or more than the context: the whole context
        mov ax, cx
        dec ax
.steps: inc ax
        mov [steps], ax
        xor eax, eax
        mov [pos], eax
        inc ax                          ; BOS, unless the run block has a prompt
        cmp word [RUN_BLOCK + RB_PROMPT_COUNT], 0
        je .first
        mov ax, [RUN_BLOCK + RB_PROMPT_IDS]
.first: mov [token], eax
.next:  call forward
        inc dword [pos]
        mov si, [pos]
        cmp si, [RUN_BLOCK + RB_PROMPT_COUNT]
        jae .sample
        add si, si
        movzx eax, word [RUN_BLOCK + RB_PROMPT_IDS + si]
        jmp .print
.sample:
        call sample
        lea ecx, [eax - BOS]
        cmp ecx, EOS - BOS
        ja .print
        xor ecx, ecx
        jmp report_token
.print: call print_token
        mov [token], eax
        mov ax, [pos]
        cmp ax, [steps]
        jb .next
        ret

; ---------------------------------------------------------------------------------------------------------------
; print_token: report a token with the bytes run.c prints for it after [token] (tokenizer.py piece_bytes): its
; PRINTED string, but after BOS without the leading space of its piece, and then nothing if what is left is a
; single unprintable byte.
; Entry:    EAX = token id
; Clobbers: EBX, ECX, EDX, ESI
; ---------------------------------------------------------------------------------------------------------------
print_token:
        mov ebx, [SECTION(K_PRINTED) + SEC_ADDR]
        mov esi, [ebx + eax*4]
        mov ecx, [ebx + eax*4 + 4]
        sub ecx, esi
        add esi, ebx
        cmp word [token], BOS
        jne report_token
        mov ebx, [SECTION(K_PIECES) + SEC_ADDR]
        mov edx, [ebx + eax*4]
        cmp byte [ebx + edx], ' '
        jne report_token
        inc esi
        dec cx
        cmp cx, 1
        jne report_token
        mov dl, [esi]
        sub dl, 9
        cmp dl, 13 - 9 + 1              ; \t \n \v \f \r
        jb report_token
        sub dl, ' ' - 9
        cmp dl, '~' - ' ' + 1
        jb report_token
        dec cx
        jmp report_token

; ---------------------------------------------------------------------------------------------------------------
; forward: one position of the transformer (fixed.py forward_token): the logits of token [token] at [pos].
; Output:   [logits_buf] = vocab_size Q16.16 logits; cache row [pos] of every layer and kv head written
; Clobbers: everything
; ---------------------------------------------------------------------------------------------------------------
forward:
        call load_sections
        mov eax, [token]                ; x[j] = (emb_q[token, j] * emb_s[token]) >> (S_emb - 16)
        mov ebx, [SECTION(K_TOKEN_EMBEDDING_S) + SEC_ADDR]
        mov ebp, [ebx + eax*4]
        mul dword [HDR + H_DIM]
        mov esi, [SECTION(K_TOKEN_EMBEDDING_Q) + SEC_ADDR]
        add esi, eax
        mov cl, [SECTION(K_TOKEN_EMBEDDING_S) + SEC_PARAM]
        sub cl, 16
        mov edi, [x_buf]
        mov bx, [HDR + H_DIM]
.embed: movsx eax, byte [esi]
        inc esi
        imul ebp
        shrd eax, edx, cl
        a32 stosd
        dec bx
        jnz .embed

        mov eax, [kv_base]
        mov [layer_kv], eax
        mov cx, [HDR + H_N_LAYERS]
.layer: push cx
        mov bx, SECTION(K_RMS_ATT_WEIGHT)
        call norm_and_quantize
        mov ebp, [qkv_buf]
        mov bx, SECTION(K_WQKV_Q)
        mov cx, [qkv_rows]
        call matvec_store
        call rope
        call store_kv
        call attention
        call quantize_xb
        mov ebp, [x_buf]
        mov bx, SECTION(K_WO_Q)
        call matvec_dim                 ; x += wo . attention
        mov bx, SECTION(K_RMS_FFN_WEIGHT)
        call norm_and_quantize
        mov ebp, [hb_buf]
        mov bx, SECTION(K_W13_Q)
        mov cx, [HDR + H_HIDDEN]
        add cx, cx
        call matvec_store
        call swiglu
        mov ebp, [x_buf]
        mov bx, SECTION(K_W2_Q)
        call matvec_dim                 ; x += w2 . swiglu
        mov eax, [kv_layer_bytes]
        add [layer_kv], eax
        pop cx
        loop .layer

        mov bx, SECTION(K_RMS_FINAL_WEIGHT)
        call norm_and_quantize
        mov ebp, [logits_buf]
        mov bx, SECTION(K_WCLS_Q)
        mov cx, [HDR + H_VOCAB]
        call matvec_store
        mov ebp, [logits_buf]
        mov bx, SECTION(K_WCLS_RESIDUAL_Q)
        mov cx, [HDR + H_VOCAB]
        jmp matvec

; ---------------------------------------------------------------------------------------------------------------
; norm_and_quantize: xb = rmsnorm(x), then act = quantize_act(xb, act_bits_dim).
; Entry:    BX = SEC entry of the RMSNorm weights
; Clobbers: everything
; ---------------------------------------------------------------------------------------------------------------
norm_and_quantize:
        call rmsnorm
quantize_xb:
        mov esi, [xb_buf]
        mov cx, [HDR + H_DIM]
        mov al, [HDR + H_ACT_BITS_DIM]
        ; fall through into quantize_act

; ---------------------------------------------------------------------------------------------------------------
; quantize_act (fixed.py quantize_act): act = v >> k, k = max(0, bit_length(OR of |v[j]|) - bits).
; Entry:    ESI = v (i32), CX = n (1..65535), AL = bits
; Output:   [act_buf] = act, [act_n] = n, [act_k] = k, [act_end] = act + 4n
; Clobbers: EAX, EBX, ECX, EDX, ESI, EDI
; ---------------------------------------------------------------------------------------------------------------
quantize_act:
        mov bl, al
        movzx ecx, cx
        mov [act_n], ecx
        push esi
        push cx
        xor edi, edi
.magnitude:
        a32 lodsd
        cdq
        xor eax, edx
        sub eax, edx                    ; |v| as unsigned: -2^31 stays 2^31
        or edi, eax
        loop .magnitude
        bsr ecx, edi
        jz .no_shift
        inc cx                          ; bit_length
        sub cl, bl
        jnc .shift
.no_shift:
        xor cx, cx
.shift: mov [act_k], cl
        pop dx
        pop esi
        mov edi, [act_buf]
.store: a32 lodsd
        sar eax, cl
        a32 stosd
        dec dx
        jnz .store
        mov [act_end], edi
        ret

; ---------------------------------------------------------------------------------------------------------------
; matvec (fixed.py matvec, add=True): out[i] += (sum_j q[i, j] * act[j]) * s[i] >> (S - k) for each row i,
; reading the next `rows` rows of an int8 matrix; matvec_store first clears out (add=False).
; Entry:    BX = SEC entry of the matrix's Q section (its S section is the next entry), EBP = out, CX = rows,
;           act, [act_n], [act_k], [act_end] from quantize_act
; Output:   out; the Q and S addresses moved past these rows
; Clobbers: EAX, ECX, EDX, ESI, EDI, EBP
; ---------------------------------------------------------------------------------------------------------------
matvec_dim:
        mov cx, [HDR + H_DIM]
        jmp matvec
matvec_store:
        push cx
        mov edi, ebp
        movzx ecx, cx
        xor eax, eax
        a32 rep stosd
        pop cx
matvec:
        push bx
        mov [rows_left], cx
        mov eax, [act_n]
        call set_dot_length
        mov esi, [bx + SEC_ADDR]
        add esi, [act_n]                ; dot_row reads backwards from the end of the row
        mov edi, [act_end]
        mov al, [bx + 16 + SEC_PARAM]
        sub al, [act_k]
        mov [matvec_shift], al
        mov ebx, [bx + 16 + SEC_ADDR]
        sub ebx, ebp                    ; s[i] is at [out + i*4 + EBX]
.row:   call dot_row
        mov eax, [ebp + ebx]
        imul edx
        mov cl, [matvec_shift]
        shrd eax, edx, cl
        add [ebp], eax
        add ebp, 4
        add esi, [act_n]
        dec word [rows_left]
        jnz .row
        add ebp, ebx
        pop bx
        mov [bx + 16 + SEC_ADDR], ebp
        sub esi, [act_n]
        mov [bx + SEC_ADDR], esi
        ret

; ---------------------------------------------------------------------------------------------------------------
; dot_row: EDX = wrap32(sum of q[j] * v[j]) over the n int8 q before ESI and the n i32 v before EDI, n as set by
; set_dot_length. DOT_UNROLL multiply-adds per pass; the first pass enters part-way to do n mod DOT_UNROLL.
; Clobbers: EAX, ECX (0 on return)
; ---------------------------------------------------------------------------------------------------------------
dot_row:
        mov ecx, [dot_start]
        xor edx, edx
        jmp [dot_entry]
dot_unrolled:
%assign k 0
%rep DOT_UNROLL
        movsx eax, byte [byte esi + ecx + k]
        imul eax, [byte edi + ecx*4 + 4*k]
        add edx, eax
%assign k k + 1
%endrep
.end:   add ecx, DOT_UNROLL
        jnz dot_unrolled
        ret
DOT_MAC_BYTES equ (dot_unrolled.end - dot_unrolled) / DOT_UNROLL

; ---------------------------------------------------------------------------------------------------------------
; set_dot_length: make dot_row sum n products.
; Entry:    EAX = n >= 1
; Clobbers: EAX, ECX
; ---------------------------------------------------------------------------------------------------------------
set_dot_length:
        mov ecx, eax
        neg ecx
        and ecx, DOT_UNROLL - 1         ; products the first pass skips
        add eax, ecx
        neg eax
        mov [dot_start], eax
        imul cx, cx, DOT_MAC_BYTES
        add cx, dot_unrolled
        mov [dot_entry], cx
        ret

; ---------------------------------------------------------------------------------------------------------------
; rmsnorm (fixed.py rmsnorm): xb[j] = (x[j] * inv >> (31 - h)) * G[j] >> 32, inv = (2^61 - 1) // isqrt(ss << 2h),
; ss = sum of x[j]^2 + rms_eps (saturated below 2^62), h = (62 - bit_length(ss)) >> 1.
; Entry:    BX = SEC entry of the weights G (moved on by dim weights)
; Clobbers: EAX, EBX, ECX, EDX, ESI, EDI, EBP
; ---------------------------------------------------------------------------------------------------------------
rmsnorm:
        mov esi, [x_buf]
        mov cx, [HDR + H_DIM]
        mov edi, [HDR + H_RMS_EPS]      ; ss = EBP:EDI
        xor ebp, ebp
.square:
        a32 lodsd
        imul eax
        add edi, eax
        adc ebp, edx
        loop .square
        cmp ebp, 1 << 30
        jb .fits
        mov ebp, (1 << 30) - 1          ; only garbage gets past 2^62
        or edi, -1
.fits:  mov ax, 62 - 33
        bsr edx, ebp
        jnz .high
        mov al, 62 - 1
        bsr edx, edi
.high:  sub ax, dx
        shr ax, 1                       ; h
        push ax
        xchg ax, cx
        add cl, cl
        cmp cl, 32
        jb .shift
        mov ebp, edi
        xor edi, edi
.shift: shld ebp, edi, cl
        shl edi, cl                     ; M = ss << 2h, 2^60 <= M < 2^62
        xor ecx, ecx
        bts ecx, 31                     ; Newton's method from 2^31, above the root
.newton:
        mov edx, ebp
        mov eax, edi
        div ecx
        add eax, ecx
        rcr eax, 1
        cmp eax, ecx
        jae .root
        xchg eax, ecx
        jmp .newton
.root:  mov edx, (1 << 29) - 1
        or eax, -1
        div ecx                         ; inv = (2^61 - 1) // r
        mov [rms_inv], eax
        pop cx
        neg cl
        add cl, 31
        mov esi, [x_buf]
        mov edi, [xb_buf]
        mov eax, [HDR + H_DIM]
        shl eax, 2
        add [bx + SEC_ADDR], eax        ; the next layer's weights
        mov ebx, [bx + SEC_ADDR]
        sub ebx, eax
        mov bp, [HDR + H_DIM]
.scale: a32 lodsd
        imul dword [rms_inv]
        shrd eax, edx, cl               ; u = x / sqrt(ss) in Q2.30
        imul dword [ebx]
        add ebx, 4
        xchg eax, edx                   ; (u * G) >> 32
        a32 stosd
        dec bp
        jnz .scale
        ret

; ---------------------------------------------------------------------------------------------------------------
; rope (fixed.py rope): rotate each (even, odd) pair of the query and key heads in qkv by ROPE[pos].
; Clobbers: EAX, EBX, ECX, EDX, ESI, EDI, EBP
; ---------------------------------------------------------------------------------------------------------------
rope:
        mov esi, [qkv_buf]
        mov ax, [HDR + H_N_HEADS]
        add ax, [HDR + H_N_KV_HEADS]
        mov [heads_left], ax
.head:  mov ebx, [pos]
        imul ebx, [head_size]
        add ebx, ebx                    ; a ROPE row: head_size / 2 pairs of int16
        add ebx, [SECTION(K_ROPE) + SEC_ADDR]
        mov ax, [head_size]
        shr ax, 1
        mov [pairs_left], ax
.pair:  movsx edi, word [ebx]           ; cos
        movsx ebp, word [ebx + 2]       ; sin
        add ebx, 4
        neg ebp
        call rotate_term                ; v0 cos - v1 sin
        push eax
        neg ebp
        xchg edi, ebp
        call rotate_term                ; v0 sin + v1 cos
        mov [esi + 4], eax
        pop dword [esi]
        add esi, 8
        dec word [pairs_left]
        jnz .pair
        dec word [heads_left]
        jnz .head
        ret

; rotate_term: EAX = wrap32((v0 * EDI + v1 * EBP) >> rope_shift) for v0 = [ESI], v1 = [ESI + 4], in 64 bits.
; Clobbers: CL, EDX
rotate_term:
        mov eax, [esi + 4]
        imul ebp
        mov [rope_term], eax
        mov [rope_term + 4], edx
        mov eax, [esi]
        imul edi
        add eax, [rope_term]
        adc edx, [rope_term + 4]
        mov cl, [HDR + H_ROPE_SHIFT]
        shrd eax, edx, cl
        ret

; ---------------------------------------------------------------------------------------------------------------
; store_kv: this position's keys and values of every kv head into the cache (fixed.py forward_token step 4).
; Cache block of (layer, kv head), kv_block bytes at layer_kv + head * kv_block:
;   seq_len key rows of kv_stride bytes: head_size int16 keys, then their i32 divisor Dk
;   at off_dv: seq_len i32 value divisors Dv
;   at off_vt: the int8 values transposed, head_size rows of seq_len: attention's value sums are then dot_row's
; Clobbers: everything
; ---------------------------------------------------------------------------------------------------------------
store_kv:
        mov esi, [qkv_buf]
        mov eax, [HDR + H_DIM]
        lea esi, [esi + eax*4]          ; the keys of kv head 0
        mov ebx, [layer_kv]
        mov cx, [HDR + H_N_KV_HEADS]
.head:  push cx
        mov edi, [pos]
        imul edi, [kv_stride]
        add edi, ebx
        mov ebp, 2
        mov cl, 15                      ; KEY_SHIFT
        call store_kv_head
        mov [edi], eax                  ; Dk after the keys
        push esi
        mov eax, [kv_dim]
        lea esi, [esi + eax*4]          ; the values of this kv head
        mov edi, [pos]
        add edi, [off_vt]
        add edi, ebx
        mov ebp, [HDR + H_SEQ_LEN]
        mov cl, 7                       ; VALUE_SHIFT
        call store_kv_head
        mov edi, [pos]
        shl edi, 2
        add edi, [off_dv]
        mov [ebx + edi], eax
        pop esi
        mov eax, [head_size]
        lea esi, [esi + eax*4]
        add ebx, [kv_block]
        pop cx
        loop .head
        ret

; ---------------------------------------------------------------------------------------------------------------
; store_kv_head (fixed.py store_kv): D = M + (M + T - 1) // T, M = min(max |v|, 2^30), T = 2^shift - 1;
; c[i] = sign(v[i]) * min(T, (|v[i]| << shift + (D >> 1)) // D) (round half away from zero, as trunc of the
; signed sum), int16 when shift is 15, int8 when 7. M = 0 gives D = 0 and c = 0.
; Entry:    ESI = v (head_size i32), EDI = c[0], EBP = bytes from c[i] to c[i+1], CL = shift
; Output:   EAX = D, EDI = c[head_size]
; Clobbers: EDX
; ---------------------------------------------------------------------------------------------------------------
store_kv_head:
        push ebx
        push esi
        mov dx, [head_size]
        mov [kv_count], dx
        xor ebx, ebx
.max:   a32 lodsd
        cdq
        xor eax, edx
        sub eax, edx
        cmp eax, ebx
        jbe .smaller
        xchg eax, ebx
.smaller:
        dec word [kv_count]
        jnz .max
        mov eax, 1 << 30
        cmp ebx, eax
        jbe .clamped
        xchg eax, ebx
.clamped:
        xor eax, eax
        inc ax
        shl eax, cl
        dec eax                         ; T
        mov [kv_top], eax
        dec eax
        add eax, ebx
        xor edx, edx
        div dword [kv_top]
        add ebx, eax                    ; D
        pop esi
        push esi
        push ebx
        mov eax, ebx
        shr eax, 1
        mov [kv_round], eax
        test ebx, ebx
        jnz .divisor
        inc ebx                         ; M = 0: every c is 0, divide by 1
.divisor:
        mov dx, [head_size]
        mov [kv_count], dx
.round: a32 lodsd
        cdq
        push edx                        ; the sign
        xor eax, edx
        sub eax, edx
        xor edx, edx
        shld edx, eax, cl
        shl eax, cl
        add eax, [kv_round]
        adc edx, 0
        div ebx
        cmp eax, [kv_top]
        jbe .in_range
        mov eax, [kv_top]
.in_range:
        pop edx
        xor eax, edx
        sub eax, edx
        mov [edi], al
        cmp cl, 8
        jb .byte
        mov [edi + 1], ah
.byte:  add edi, ebp
        dec word [kv_count]
        jnz .round
        pop eax
        pop esi
        pop ebx
        ret

; ---------------------------------------------------------------------------------------------------------------
; attention (fixed.py attention, for every query head h): with qa = quantize_act(q_h, act_bits_head) and t = 0..pos,
; score[t] = (qa . key[t]) * Dk[t] >> (31 - k); e[t] = exp_lookup(top - score[t]); recip = (2^48 - 1) // sum e;
; w[t] = ((e[t] * recip) >> 32) * Dv[t] >> 16; xb[h * head_size + i] = wrap32(sum_t w[t] * value[t][i]) >> 7.
; Clobbers: everything
; ---------------------------------------------------------------------------------------------------------------
attention:
        mov word [head], 0
        mov eax, [pos]
        inc eax
        shl eax, 2
        add eax, [att_buf]
        mov [att_end], eax
        mov eax, [head_size]
        neg eax
        mov [neg_head_size], eax
.head:  movzx eax, word [head]
        mov esi, eax
        imul esi, [head_size]
        shl esi, 2
        add esi, [qkv_buf]
        mov cx, [head_size]
        mov al, [HDR + H_ACT_BITS_HEAD]
        call quantize_act               ; act = qa
        movzx eax, word [head]
        xor edx, edx
        div dword [kv_mul]
        mul dword [kv_block]
        add eax, [layer_kv]
        mov [att_block], eax
        mov cl, 31
        sub cl, [act_k]
        mov [att_shift], cl
        mov esi, [head_size]
        lea esi, [eax + esi*2]          ; Dk of key row 0; its keys are before it
        mov edi, [att_buf]
        mov ebx, [act_end]
        mov ebp, 1 << 31                ; top
.score: mov ecx, [neg_head_size]
        xor edx, edx
.dot:   movsx eax, word [esi + ecx*2]
        imul eax, [ebx + ecx*4]
        add edx, eax
        movsx eax, word [esi + ecx*2 + 2]
        imul eax, [ebx + ecx*4 + 4]
        add edx, eax
        add ecx, 2
        jnz .dot
        a32 lodsd
        imul edx
        mov cl, [att_shift]
        shrd eax, edx, cl
        a32 stosd
        cmp eax, ebp
        jle .below
        xchg eax, ebp
.below: mov eax, [head_size]
        lea esi, [esi + eax*2]
        cmp edi, [att_end]
        jb .score

        mov esi, [att_buf]
        mov ebx, [exp_pairs]
        xor edi, edi                    ; total
.exp:   mov eax, ebp
        sub eax, [esi]
        call lookup
        mov [esi], eax
        add edi, eax
        add esi, 4
        cmp esi, [att_end]
        jb .exp

        mov edx, 0xFFFF
        or eax, -1
        div edi
        xchg eax, ebx                   ; recip
        mov esi, [att_buf]
        mov edi, [att_block]
        add edi, [off_dv]
.weight:
        mov eax, [esi]
        mul ebx
        xchg eax, edx
        mul dword [edi]
        add edi, 4
        shrd eax, edx, 16
        mov [esi], eax
        add esi, 4
        cmp esi, [att_end]
        jb .weight

        mov eax, [pos]
        inc eax
        call set_dot_length
        mov esi, [att_block]
        add esi, [off_vt]
        add esi, [pos]
        inc esi                         ; end of value row 0
        mov edi, [att_end]
        movzx ebp, word [head]
        imul ebp, [head_size]
        shl ebp, 2
        add ebp, [xb_buf]
        mov bx, [head_size]
.value: call dot_row
        sar edx, 7                      ; VALUE_SHIFT
        mov [ebp], edx
        add ebp, 4
        add esi, [HDR + H_SEQ_LEN]
        dec bx
        jnz .value
        inc word [head]
        mov ax, [head]
        cmp ax, [HDR + H_N_HEADS]
        jb .head
        ret

; ---------------------------------------------------------------------------------------------------------------
; lookup (fixed.py exp_lookup, and silu_lookup's interpolation): with i = u >> e and a table from build_pairs,
; t[i] + ((t[i+1] - t[i]) * (u mod 2^e)) >> e.
; Entry:    EAX = u (unsigned), EBX = first pair of the table
; Output:   CF = 1 and EAX = the interpolation; or CF = 0 and EAX = 0 when i >= n - 1 (past the table)
; Clobbers: ECX, EDX
; ---------------------------------------------------------------------------------------------------------------
lookup:
        mov cl, [ebx - 4]
        mov edx, eax
        shr edx, cl
        cmp edx, [ebx - 8]
        jae .past
        shl edx, cl
        sub eax, edx
        shr edx, cl
        imul eax, [ebx + edx*8 + 4]
        sar eax, cl
        add eax, [ebx + edx*8]
        stc
        ret
.past:  xor eax, eax
        ret

; ---------------------------------------------------------------------------------------------------------------
; swiglu (fixed.py forward_token step 8): hb[i] = (silu_lookup(hb[i]) * hb[hidden_dim + i]) >> 16, then
; act = quantize_act(hb[0:hidden_dim], act_bits_hidden).
; Clobbers: everything
; ---------------------------------------------------------------------------------------------------------------
swiglu:
        mov esi, [hb_buf]
        mov ebx, [silu_pairs]
        mov ebp, [HDR + H_HIDDEN]
        shl ebp, 2
        mov ax, [HDR + H_HIDDEN]
        mov [rows_left], ax
.gate:  mov edi, [esi]                  ; x
        xor eax, eax
        cmp edi, [HDR + H_SILU_LO]
        jl .silu                        ; below the table: 0
        mov eax, edi
        sub eax, [HDR + H_SILU_LO]
        call lookup
        jc .silu
        mov eax, edi                    ; above the table: x
.silu:  imul dword [esi + ebp]
        shrd eax, edx, 16
        mov [esi], eax
        add esi, 4
        dec word [rows_left]
        jnz .gate
        mov esi, [hb_buf]
        mov cx, [HDR + H_HIDDEN]
        mov al, [HDR + H_ACT_BITS_HIDDEN]
        jmp quantize_act

; ---------------------------------------------------------------------------------------------------------------
; argmax: the first index of the largest value (signed), as np.argmax.
; Entry:    ESI = i32 values, CX = n >= 1
; Output:   EAX = index, EBX = value
; Clobbers: ECX, EDX
; ---------------------------------------------------------------------------------------------------------------
argmax:
        mov edx, esi
        mov eax, esi
        mov ebx, [esi]
.next:  cmp [edx], ebx
        jle .not_larger
        mov eax, edx
        mov ebx, [edx]
.not_larger:
        add edx, 4
        loop .next
        sub eax, esi
        shr eax, 2
        ret

; ---------------------------------------------------------------------------------------------------------------
; sample (fixed.py FixedSampler.sample, sample_fixed): greedy when inv_temperature is 0; otherwise exp-table weights
; e[i] of (top - logit[i]) * inv_temperature >> 16, the top-k / top-p cut over the order (e descending, index
; ascending; vocabulary order when both are off), and one 24-bit coin from xorshift64*.
; Output:   EAX = token id
; Clobbers: everything
; ---------------------------------------------------------------------------------------------------------------
sample:
        mov esi, [logits_buf]
        mov cx, [HDR + H_VOCAB]
        call argmax
        mov ebp, [RUN_BLOCK + RB_INV_TEMPERATURE]
        test ebp, ebp
        jz .done
        mov [sample_top], ebx
        mov ebx, [exp_pairs]
        mov edi, [sample_buf]
        xor eax, eax
        mov [sample_total], eax
        mov ax, [HDR + H_VOCAB]
        mov [rows_left], ax
.weight:
        mov eax, [sample_top]
        sub eax, [esi]
        add esi, 4
        mul ebp
        shrd eax, edx, 16
        shr edx, 16
        jz .in_reach
        xor eax, eax                    ; d >= 2^32: past the table
        jmp .store
.in_reach:
        call lookup
.store: a32 stosd
        add [sample_total], eax
        dec word [rows_left]
        jnz .weight                     ; EDI = the picks: (index, e) pairs in order

        call random_u32
        shr eax, 8
        mov [sample_coin], eax
        movzx edx, word [HDR + H_VOCAB]
        mov eax, [RUN_BLOCK + RB_TOPK]
        dec eax
        dec edx
        cmp eax, edx
        jb .keep
        xchg eax, edx
.keep:  inc eax                         ; keep: top-k if 0 < topk < vocab_size, else vocab_size
        shl eax, 3
        add eax, edi
        mov [sample_keep_end], eax
        mov eax, [RUN_BLOCK + RB_TOPP]
        or edx, -1                      ; top-p off: no running sum exceeds this
        cmp eax, 1 << 16
        jae .threshold
        mul dword [sample_total]
        shrd eax, edx, 16
        xchg eax, edx
.threshold:
        mov [sample_threshold], edx
        inc edx
        or edx, [RUN_BLOCK + RB_TOPK]
        mov [sample_sorted], edx        ; 0: both off, vocabulary order
        mov [sample_picks], edi
        xor ebp, ebp                    ; the kept weight
.pick:  mov eax, edi
        sub eax, [sample_picks]
        shr eax, 3
        mov esi, [sample_buf]
        cmp dword [sample_sorted], 0
        je .picked
        mov cx, [HDR + H_VOCAB]
        call argmax
.picked:
        a32 stosd
        mov ebx, -1
        xchg ebx, [esi + eax*4]
        xchg eax, ebx
        a32 stosd
        add ebp, eax
        cmp ebp, [sample_threshold]
        ja .cut
        cmp edi, [sample_keep_end]
        jb .pick
.cut:   mov esi, [sample_picks]
        mov eax, [sample_coin]
        mul ebp
        shrd eax, edx, 24
        xchg eax, edx                   ; target < kept
.walk:  a32 lodsd
        xchg eax, ebx
        a32 lodsd
        cmp edx, eax
        jb .found
        sub edx, eax
        jmp .walk
.found: xchg eax, ebx
.done:  ret

; ---------------------------------------------------------------------------------------------------------------
; random_u32 (sampling.py XorShiftRng.next_u32, run.c's xorshift64*): s ^= s >> 12; s ^= s << 25; s ^= s >> 27;
; the high dword of the low 64 bits of s * 0x2545F4914F6CDD1D. The state is the run block's seed field.
; Output:   EAX = u32
; Clobbers: EBX, ECX, EDX
; ---------------------------------------------------------------------------------------------------------------
random_u32:
        mov eax, [RUN_BLOCK + RB_SEED]
        mov edx, [RUN_BLOCK + RB_SEED + 4]
        mov ebx, eax
        shrd ebx, edx, 12
        xor eax, ebx
        mov ebx, edx
        shr ebx, 12
        xor edx, ebx
        mov ebx, edx
        shld ebx, eax, 25
        xor edx, ebx
        mov ebx, eax
        shl ebx, 25
        xor eax, ebx
        mov ebx, eax
        shrd ebx, edx, 27
        xor eax, ebx
        mov ebx, edx
        shr ebx, 27
        xor edx, ebx
        mov [RUN_BLOCK + RB_SEED], eax
        mov [RUN_BLOCK + RB_SEED + 4], edx
        imul ebx, edx, 0x4F6CDD1D
        imul ecx, eax, 0x2545F491
        mov edx, 0x4F6CDD1D
        mul edx
        add edx, ebx
        add edx, ecx
        xchg eax, edx
        ret

slot_widths:        dw HDR + H_DIM, HDR + H_HIDDEN, HDR + H_SEQ_LEN, HDR + H_VOCAB
                    dw SECTION(K_EXP_TABLE) + SEC_LEN, SECTION(K_SILU_TABLE) + SEC_LEN
SLOT_WIDTHS         equ ($ - slot_widths) / 2

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

engine_end:

        absolute engine_end
HDR:                resb HDR_BYTES
SEC:                resb 16 * 24
buffers:
x_buf:              resd 1
xb_buf:             resd 1
act_buf:            resd 1
qkv_buf:            resd 1
hb_buf:             resd 1
att_buf:            resd 1
logits_buf:         resd 1
sample_buf:         resd 1
exp_pairs:          resd 1
silu_pairs:         resd 1
N_BUFFERS           equ ($ - buffers) / 4
kv_base:            resd 1
head_size:          resd 1
kv_dim:             resd 1
kv_mul:             resd 1
qkv_rows:           resd 1
kv_stride:          resd 1
off_dv:             resd 1
off_vt:             resd 1
kv_block:           resd 1
kv_layer_bytes:     resd 1
layer_kv:           resd 1
token:              resd 1
pos:                resd 1
steps:              resw 1
act_n:              resd 1
act_end:            resd 1
act_k:              resb 1
matvec_shift:       resb 1
rows_left:          resw 1
dot_start:          resd 1
dot_entry:          resw 1
rms_inv:            resd 1
heads_left:         resw 1
pairs_left:         resw 1
rope_term:          resq 1
kv_count:           resw 1
kv_top:             resd 1
kv_round:           resd 1
head:               resw 1
att_end:            resd 1
neg_head_size:      resd 1
att_block:          resd 1
att_shift:          resb 1
sample_top:         resd 1
sample_total:       resd 1
sample_coin:        resd 1
sample_keep_end:    resd 1
sample_threshold:   resd 1
sample_sorted:      resd 1
sample_picks:       resd 1

