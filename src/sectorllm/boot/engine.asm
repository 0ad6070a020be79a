; engine.asm - sectorllm boot engine: loads a packed model above 1 MiB and tells a story with it, token for token
; what the fixed-point golden model (engines/fixed.py, docs/arithmetic.md) computes, on COM1 and the screen.
;
; The boot sector (boot.asm) loads the run block and this file and jumps to its first byte, with COM1 set up.
; Routines that mirror a golden-model function carry its name; docs/arithmetic.md gives every rounding step.
;
; MEMORY MAP (physical addresses)
;   0x00000 - 0x004FF   interrupt vectors, BIOS data area                                      BIOS
;   0x00500 - 0x07BFF   stack: SS:SP = 0:STACK_TOP, grows down (about 29 KiB)
;   0x07C00 - 0x07DFF   boot sector                                                            done with
;   0x07E00 - 0x07FFF   RUN_BLOCK: the run block sector, fields at RB_* (image.py RunBlock); the seed field is
;                       the xorshift64* state, advanced in place
;   0x08000 - 0x0FFFF   ENGINE_BASE: this program, then its variables (from the page after it; 16-bit offsets):
;                       the packed header's first HDR_BYTES (HDR), the variables (VARS), the section entries
;                       as the forward pass moves them (SEC) and as each pass starts (SEC_START)
;   0x10000 - 0x17FFF   DISK_BUFFER: INT 13h reads land here, LOAD_CHUNK_SECTORS at a time
;   0x18000 - 0x7FFFF   free
;   0x80000 - 0xFFFFF   EBDA, VGA memory, option ROMs, BIOS                                    not ours
;   0x100000            MODEL_BASE: the packed model (docs/format.md), [RUN_BLOCK + RB_MODEL_BYTES] long
;   heap_base           the end of the model rounded up to 4 KiB; from there N_BUFFERS buffers of SLOT_BYTES
;                       (up to 65536 elements of 16 bytes): x, xb, act, qkv, hb, att, logits, the sampler's
;                       weights and picks, the exp and SiLU interpolation tables (build_pairs)
;   kv_base             the KV cache: n_layers * n_kv_heads blocks of kv_block bytes (store_kv)
;   after the cache     int16 copies of the int8 weight matrices (setup_model), read by the dot_row kernel
;   mem_top             the end of the RAM that starts at 1 MiB (INT 15h E801h); session.py memory_end mirrors
;                       this map to size the machine and to refuse models that do not fit

; REGISTER CONVENTIONS
;   CS = DS = ES = FS = GS = SS = 0 always. DS, ES, FS and GS are "unreal": their hidden limits are 4 GiB, so a
;   32-bit offset is a physical address (mov eax, [esi]; a32 rep movsd) and the model above 1 MiB is reachable.
;   Code and stack stay 16-bit: near calls, IP and SP below 0x10000. Direction flag clear.
;   Interrupts on, except inside enter_unreal_mode.
;   Routines take their arguments in registers as their banner says and preserve every register their banner does
;   not list under Clobbers; flags are always clobbered.
;   In the model code (setup_model and what it calls) BP = VARS: [hdr(H_x)] is a packed header field and
;   [var(x)] a variable, with 8-bit displacements. A routine that needs EBP saves BP and uses absolute addresses.
;   SS keeps its 64 KiB limit: a 32-bit address with an EBP or ESP base needs a ds: override (KVM faults on it).
;   A BIOS call may come back with 64 KiB segment limits (see enter_unreal_mode), so every BIOS call site calls
;   enter_unreal_mode right after it; the output routines here already do. New BIOS calls must do the same.
;
; SERIAL PROTOCOL (COM1, 115200 8N1; image.py SerialDecoder parses it)
;   Outside records the stream is log text: ASCII, never STX. A record is STX, one tag letter, fields, ETX:
;     STX 'T' id ',' n ETX  b1 .. bn   a token: decimal id and byte count, then its n bytes raw (any values):
;                                      every forced prompt token and generated token with the bytes it prints;
;                                      a sampled BOS or EOS, which ends the run, with n = 0
;     STX 'M' name '=' value ETX       a named value (decimal, unsigned 32-bit): the self-test's
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
MODEL_BASE          equ 0x100000
LOAD_CHUNK_SECTORS  equ 64              ; 32 KiB: fits DISK_BUFFER, under the 127-sector limit of some BIOSes
SECTOR              equ 512
HEAP_ALIGN          equ 4096

RB_MAGIC            equ 0               ; run block fields (image.py RUN_BLOCK_FORMAT, little-endian)
RB_VERSION          equ 4               ; u16
RB_ENGINE_SECTORS   equ 6               ; u16
RB_MODEL_LBA        equ 8               ; u32
RB_MODEL_BYTES      equ 12              ; u32
RB_INV_TEMPERATURE  equ 16              ; u32, round(65536 / temperature); 0 = greedy
RB_TOPP             equ 20              ; u32, round(65536 * top-p); 65536 = off
RB_TOPK             equ 24              ; u32, 0 = off
RB_MINP             equ 28              ; u32, round(65536 * min-p); 0 = off
RB_SEED             equ 32              ; u64, the xorshift64* state
RB_STEPS            equ 40              ; u16, forward passes, prompt included; 0 = the whole context
RB_PROMPT_COUNT     equ 42              ; u16
RB_PROMPT_IDS       equ 44              ; u16[RB_PROMPT_COUNT], BOS first
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

HDR_BYTES           equ 128             ; the packed header (docs/format.md), copied to HDR; fields, u32 / i32:
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
TABLE_OFFSET        equ 128             ; the section table follows the header

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
SEC_ADDR            equ 4               ; SEC entries, 16 bytes per kind: the section table's entry with its
SEC_LEN             equ 8               ; offset turned into an address (the weights' addresses then move on
SEC_PARAM           equ 12              ; layer by layer as the forward pass reads them)
N_KINDS             equ 24
%define SECTION(kind) (SEC + 16 * (kind))
%define hdr(field) bp + (field) - HDR_BYTES
%define var(name) bp + (name) - VARS

BOS                 equ 1
EOS                 equ 2
KEY_SHIFT           equ 15              ; cached keys are int16, values int8 (fixed.py KEY_SHIFT, VALUE_SHIFT)
VALUE_SHIFT         equ 7
DOT_UNROLL          equ 32              ; multiply-adds per pass of dot_row
SLOT_BYTES          equ 0x100000        ; a buffer: 16 bytes for each of up to 65536 elements

        org ENGINE_BASE

; ---------------------------------------------------------------------------------------------------------------
; engine_start: the entry point: check the run block, open A20, enter unreal mode, load the model, generate.
; Entry:    CS = DS = ES = SS = 0, SP = STACK_TOP, DL = BIOS boot drive, run block at RUN_BLOCK (boot.asm)
; Output:   never returns: end_run
; ---------------------------------------------------------------------------------------------------------------
engine_start:
        mov [boot_drive], dl
        mov si, msg_banner
        call print_string
        mov al, STATUS_BAD_RUN_BLOCK
        mov si, msg_bad_run_block
        cmp word [RUN_BLOCK + RB_VERSION], RUN_VERSION   ; the boot sector checked the magic
        jne fail
        in al, SYSTEM_CONTROL_A
        or al, 0x02
        and al, 0xFE                    ; bit 0 would reset the machine
        out SYSTEM_CONTROL_A, al
        call enter_unreal_mode
        mov byte [a20_probe], 0         ; with A20 closed, 1 MiB higher is the same byte
        mov byte [dword a20_probe + 0x100000], 1
        mov al, STATUS_A20_CLOSED
        mov si, msg_a20_closed
        cmp byte [a20_probe], 0
        jne fail
        call detect_memory
        call place_model
        call load_model
%ifdef SELFTEST
        call selftest
%else
        call setup_model
        call generate
%endif
        mov al, STATUS_OK
        jmp end_run

; ---------------------------------------------------------------------------------------------------------------
; fail: print a reason (log text on COM1 and the screen) and end the run with a status.
; Entry:    SI = NUL-terminated message, AL = status
; Output:   never returns
; ---------------------------------------------------------------------------------------------------------------
fail:
        call print_string
        ; fall through into end_run

; ---------------------------------------------------------------------------------------------------------------
; end_run: send the end record; if the runner sent SERIAL_HOLD, wait for SERIAL_GO (its screenshot); then leave
; through QEMU's isa-debug-exit (QEMU exits with status (AL << 1) | 1) and halt where that device does not exist.
; Entry:    AL = status (0..127)
; Output:   never returns
; ---------------------------------------------------------------------------------------------------------------
end_run:
        xchg ax, bx
        mov di, serial_put
        mov al, 'E'
        call record_start
        movzx eax, bl
        call decimal
        mov al, ETX
        call di
        mov dx, UART_LSR                ; no byte waiting, or no UART at all (it reads 0xFF): go
        in al, dx
        test al, LSR_DATA_READY
        jz .exit
        mov dl, COM1 & 0xFF
        in al, dx
        cmp al, SERIAL_HOLD
        jne .exit
.wait:  mov dl, UART_LSR & 0xFF
        in al, dx
        test al, LSR_DATA_READY
        jz .wait
        mov dl, COM1 & 0xFF
        in al, dx
        cmp al, SERIAL_GO
        jne .wait
.exit:  xchg ax, bx
        out DEBUG_EXIT_PORT, al
.halt:  cli
        hlt
        jmp .halt

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
        pushad
        cli                             ; an interrupt handler would run with protected-mode segment semantics
        lgdt [gdt_descriptor]
        mov eax, cr0
        or al, 1
        mov cr0, eax
        jmp .protected                  ; the 386 needs its prefetch queue flushed after a mode switch
.protected:
        mov bx, FLAT_DATA_SELECTOR      ; loading a selector in protected mode fills the hidden 4 GiB limit
        call .load
        and al, 0xFE
        mov cr0, eax
        jmp .real
.real:  xor bx, bx                      ; back in real mode the bases return to 0; the limits stay
        call .load
        popad
        popf
        ret
.load:  mov ds, bx
        mov es, bx
        mov fs, bx
        mov gs, bx
        ret

; ---------------------------------------------------------------------------------------------------------------
; detect_memory: find where the RAM that starts at 1 MiB ends, with INT 15h E801h (none if it fails).
; Output:   [mem_top] = physical end address of that RAM
; Clobbers: EAX, EBX, ECX, EDX
; ---------------------------------------------------------------------------------------------------------------
detect_memory:
        mov ax, 0xE801
        xor bx, bx
        xor cx, cx
        xor dx, dx
        int 0x15
        call enter_unreal_mode
        jnc .answer
        xor ax, ax
.answer:
        jcxz .ax_bx                     ; BIOSes answer in AX/BX, CX/DX or both
        xchg ax, cx
        mov bx, dx
.ax_bx: movzx eax, ax                   ; KiB between 1 MiB and 16 MiB
        shl eax, 10
        add eax, MODEL_BASE
        cmp eax, 0x1000000
        jb .store                       ; a hole below 16 MiB: what lies above it is not contiguous
        movzx ebx, bx                   ; 64 KiB blocks above 16 MiB
        shl ebx, 16
        add eax, ebx
.store: mov [mem_top], eax
        ret

; ---------------------------------------------------------------------------------------------------------------
; place_model: size the model in sectors, check that it fits the RAM above 1 MiB, and put the heap after it.
; Output:   [model_sectors], [heap_base]; fails the run with the sizes when the model does not fit
; Clobbers: EAX, SI
; ---------------------------------------------------------------------------------------------------------------
place_model:
        mov eax, [RUN_BLOCK + RB_MODEL_BYTES]
        add eax, SECTOR - 1
        shr eax, 9
        mov [model_sectors], eax
        shl eax, 9
        add eax, MODEL_BASE
        cmp eax, [mem_top]
        ja memory_too_small
        add eax, HEAP_ALIGN - 1
        and eax, -HEAP_ALIGN
        mov [heap_base], eax
        ret

; ---------------------------------------------------------------------------------------------------------------
; memory_too_small: fail the run, saying how much memory above 1 MiB the model needs and how much there is.
; Entry:    EAX = the end address the model needs
; Output:   never returns
; ---------------------------------------------------------------------------------------------------------------
memory_too_small:
        mov si, msg_needs
        call print_kib
        mov eax, [mem_top]
        mov si, msg_has
        call print_kib
        mov si, msg_kib
        mov al, STATUS_MODEL_TOO_LARGE
        jmp fail

; print_kib: log text, then the KiB from 1 MiB to the address EAX, rounded up. Clobbers: SI, DI
print_kib:
        call print_string
        sub eax, MODEL_BASE - 1023
        shr eax, 10
        ; fall through into print_decimal

; print_decimal: EAX in decimal as log text. Clobbers: DI
print_decimal:
        mov di, put_char
        ; fall through into decimal

; ---------------------------------------------------------------------------------------------------------------
; decimal: the unsigned decimal digits of EAX, most significant first, each given to the routine at DI.
; Entry:    EAX = number, DI = serial_put or put_char
; Clobbers: nothing
; ---------------------------------------------------------------------------------------------------------------
decimal:
        pushad
        push dword 10
        pop ecx
        xor edx, edx
        div ecx
        test eax, eax
        jz .digit
        call decimal                    ; the higher digits first
.digit: xchg ax, dx
        add al, '0'
        call di
        popad
        ret

; ---------------------------------------------------------------------------------------------------------------
; load_model: read the model from disk to MODEL_BASE, LOAD_CHUNK_SECTORS at a time through DISK_BUFFER.
; Entry:    [model_sectors] > 0 (place_model)
; Output:   the model at MODEL_BASE; unreal mode; fails the run on a disk error
; Clobbers: EAX, EBX, ECX, EDX, ESI, EDI, EBP
; ---------------------------------------------------------------------------------------------------------------
load_model:
        mov edi, MODEL_BASE
        mov ebx, [RUN_BLOCK + RB_MODEL_LBA]
        mov ebp, [model_sectors]
.chunk: push dword LOAD_CHUNK_SECTORS
        pop ecx
        cmp ebp, ecx
        jae .read
        mov ecx, ebp
.read:  mov [dap.count], cx
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
        test ebp, ebp
        jnz .chunk
        ret
.disk_error:
        mov si, msg_disk_error
        call print_string
        movzx eax, byte [disk_status]
        call print_decimal
        mov si, msg_kib + 4             ; its newline
        mov al, STATUS_DISK_ERROR
        jmp fail

; ---------------------------------------------------------------------------------------------------------------
; serial_put: send one byte to COM1 once its transmit holding register is empty.
; Entry:    AL = byte
; Clobbers: nothing
; ---------------------------------------------------------------------------------------------------------------
serial_put:
        push dx
        push ax
        mov dx, UART_LSR
.wait:  in al, dx
        test al, LSR_THR_EMPTY
        jz .wait
        pop ax
        mov dl, COM1 & 0xFF
        out dx, al
        pop dx
        ret

; ---------------------------------------------------------------------------------------------------------------
; put_char: one byte to COM1 and the screen (BIOS teletype; "\n" becomes CR LF there).
; Entry:    AL = byte
; Clobbers: nothing
; ---------------------------------------------------------------------------------------------------------------
put_char:
        call serial_put
        pusha
        xor bx, bx                      ; page 0, colour 0 (only used in graphics modes)
        cmp al, 10
        jne .show
        mov ax, 0x0E0D
        int 0x10
        mov al, 10
.show:  mov ah, 0x0E
        int 0x10
        call enter_unreal_mode
        popa
        ret

; ---------------------------------------------------------------------------------------------------------------
; print_string: log text to COM1 and the screen.
; Entry:    SI = NUL-terminated string (offset in segment 0)
; Clobbers: SI
; ---------------------------------------------------------------------------------------------------------------
print_string:
        push ax
.next:  lodsb
        test al, al
        jz .done
        call put_char
        jmp .next
.done:  pop ax
        ret

; record_start: STX, then the tag in AL, to COM1. Clobbers: nothing
record_start:
        push ax
        mov al, STX
        call serial_put
        pop ax
        jmp serial_put

; ---------------------------------------------------------------------------------------------------------------
; report_token: a token: its record (id, byte count, bytes) to COM1, its bytes to the screen.
; Entry:    EAX = token id, ESI = physical address of its bytes, CX = byte count
; Clobbers: nothing
; ---------------------------------------------------------------------------------------------------------------
report_token:
        pushad
        mov di, serial_put
        push ax
        mov al, 'T'
        call record_start
        pop ax
        call decimal
        mov al, ','
        call di
        movzx eax, cx
        call decimal
        mov al, ETX
        call di
        jcxz .done
.byte:  a32 lodsb
        call put_char
        loop .byte
.done:  popad
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
        movzx eax, word [RUN_BLOCK + RB_STEPS]
        mov si, name_steps
        call report_value
        mov bx, selftest_dwords         ; the 32-bit values, one table entry each
.dword:
        mov si, [bx]
        mov eax, [si]
        mov si, [bx + 2]
        call report_value
        add bx, 4
        cmp bx, selftest_dwords_end
        jb .dword
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

; report_value: a named number as a record on COM1. Entry: SI = NUL-terminated name ([a-z0-9_]), EAX = value.
; Clobbers: DI
report_value:
        mov di, serial_put
        push ax
        mov al, 'M'
        call record_start
.name:  lodsb
        test al, al
        jz .value
        call di
        jmp .name
.value: mov al, '='
        call di
        pop ax
        call decimal
        mov al, ETX
        jmp di

selftest_dwords:                        ; address of the value, address of its name
        dw heap_base, name_heap_base
        dw RUN_BLOCK + RB_MODEL_BYTES, name_model_bytes
        dw RUN_BLOCK + RB_INV_TEMPERATURE, name_inv_temperature
        dw RUN_BLOCK + RB_TOPP, name_topp
        dw RUN_BLOCK + RB_TOPK, name_topk
        dw RUN_BLOCK + RB_SEED, name_seed_low
        dw RUN_BLOCK + RB_SEED + 4, name_seed_high
selftest_dwords_end:

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
%else

; ===============================================================================================================
; THE MODEL
; ===============================================================================================================

; ---------------------------------------------------------------------------------------------------------------
; setup_model: copy the packed header to HDR (BP = VARS from here on), derive the shape, place the buffers (a
; SLOT_BYTES slot each), the KV cache and int16 copies of the weight matrices from heap_base (failing the run if
; they pass mem_top), keep the section entries in SEC_START and build the interpolation tables.
; Output:   BP = VARS
; Clobbers: everything
; ---------------------------------------------------------------------------------------------------------------
setup_model:
        mov bp, VARS
        mov esi, MODEL_BASE
        mov edi, HDR
        push dword HDR_BYTES / 4
        pop ecx
        a32 rep movsd                   ; DI = VARS
        mov cx, (SEC_END - VARS) / 2
        xor ax, ax
        rep stosw                       ; so the 16-bit stores below leave zero high words
        call load_sections
        mov ax, [hdr(H_DIM)]
        cwd
        div word [hdr(H_N_HEADS)]
        mov [var(head_size)], ax
        xchg ax, bx
        mov ax, [hdr(H_N_HEADS)]
        div word [hdr(H_N_KV_HEADS)]    ; DX = 0: dim is a multiple of n_heads
        mov [var(kv_mul)], ax
        mov ax, bx
        mul word [hdr(H_N_KV_HEADS)]
        mov [var(kv_dim)], ax
        lea ax, [bx + 2]
        add ax, ax
        mov [var(key_skip)], ax         ; from a key row's Dv to the next row's Dk
        add al, 4
        mov [var(kv_stride)], ax        ; a key row: head_size int16 keys, Dk, Dv
        mov ax, [hdr(H_SEQ_LEN)]
        add ax, ax
        mov [var(value_row)], ax        ; a row of transposed int16 values
        mul bx
        mov [var(value_bytes)], ax
        mov [var(value_bytes) + 2], dx
        mov eax, [var(kv_stride)]
        mul dword [hdr(H_SEQ_LEN)]
        mov [var(off_vt)], eax
        add eax, [var(value_bytes)]
        mov [var(kv_block)], eax
        mul dword [hdr(H_N_KV_HEADS)]
        mov [var(layer_bytes)], eax
        mul dword [hdr(H_N_LAYERS)]
        xchg eax, edx                   ; EDX = the whole KV cache
        mov eax, [heap_base]
        mov di, buffers
        mov cl, N_BUFFERS
.place: stosd
        add eax, SLOT_BYTES
        loop .place
        mov [var(kv_base)], eax
        lea edi, [eax + edx]            ; the int16 weights follow the cache
        mov si, wide_kinds
.widen: lodsb                           ; int8 matrices to int16: one dot_row kernel for weights and keys
        mov bl, 16
        mul bl
        add ax, SEC
        xchg ax, bx
        mov ecx, [bx + SEC_LEN]
        lea eax, [edi + ecx*2]
        cmp eax, [mem_top]
        ja memory_too_small
        push si
        mov esi, [bx + SEC_ADDR]
        mov [bx + SEC_ADDR], edi
        jecxz .widened                  ; an absent classifier: the embedding's, below
.byte:  a32 lodsb
        cbw
        a32 stosw
        a32 loop .byte
.widened:
        pop si
        cmp si, wide_kinds + WIDE_KINDS
        jb .widen
        test byte [hdr(H_FLAGS)], 1
        jz .own_classifier
        mov si, SECTION(K_TOKEN_EMBEDDING_Q)
        mov di, SECTION(K_WCLS_Q)
        mov cl, 8
        rep movsd
.own_classifier:
        mov si, SEC
        mov di, SEC_START
        mov cx, 16 * N_KINDS / 2
        rep movsw
        mov bx, SECTION(K_EXP_TABLE)
        mov di, exp_pairs
        mov al, [hdr(H_EXP_SHIFT)]
        call build_pairs
        mov bx, SECTION(K_SILU_TABLE)
        mov di, silu_pairs
        mov al, [hdr(H_SILU_SHIFT)]
        ; fall through into build_pairs

; ---------------------------------------------------------------------------------------------------------------
; build_pairs: lookup's form of a packed interpolation table t[0..n): the step mask 2^e - 1, n - 1, the step shift
; e, then the pairs (t[i], t[i+1] - t[i]) for i < n - 1, so an interpolation is one multiply.
; Entry:    BX = SEC entry of the table, DI = its buffer variable, AL = step shift
; Output:   the variable points at the first pair
; Clobbers: EAX, ECX, EDX, ESI, EDI
; ---------------------------------------------------------------------------------------------------------------
build_pairs:
        movzx eax, al
        add byte [di], 12
        mov edi, [di]
        mov [edi - 4], eax
        xchg eax, ecx
        xor edx, edx
        inc dx
        shl edx, cl
        dec edx
        mov [edi - 12], edx
        mov ecx, [bx + SEC_LEN]
        shr cx, 2
        dec cx
        mov [edi - 8], ecx
        mov esi, [bx + SEC_ADDR]
.pair:  a32 lodsd
        a32 stosd
        neg eax
        add eax, [esi]
        a32 stosd
        loop .pair
        ret

; ---------------------------------------------------------------------------------------------------------------
; load_sections: SEC[kind] = the section table's entry of each kind, its offset turned into an address.
; Clobbers: EAX, CX, ESI, DI
; ---------------------------------------------------------------------------------------------------------------
load_sections:
        mov esi, MODEL_BASE + TABLE_OFFSET
        mov cx, [hdr(H_N_SECTIONS)]
.entry: a32 lodsd                       ; kind
        shl ax, 4
        add ax, SEC + SEC_ADDR
        movzx edi, ax
        a32 lodsd
        add eax, MODEL_BASE
        a32 stosd
        a32 movsd                       ; length
        a32 movsd                       ; param
        loop .entry
        ret

; ---------------------------------------------------------------------------------------------------------------
; generate: run.c's generation loop (generate.py Generation): `steps` forward passes from the first prompt token
; (0 or more than seq_len: seq_len); prompt tokens are forced and echoed, then sampled tokens reported as they
; come. A sampled BOS or EOS ends the run: it is reported with no bytes.
; Clobbers: everything but BP
; ---------------------------------------------------------------------------------------------------------------
generate:
        mov ax, [RUN_BLOCK + RB_STEPS]
        mov cx, [hdr(H_SEQ_LEN)]
        dec ax
        cmp ax, cx
        jb .steps
        xchg ax, cx
        dec ax
.steps: inc ax
        mov [var(steps)], ax
        mov ax, BOS                     ; unless the run block has a prompt
        mov cx, [RUN_BLOCK + RB_PROMPT_COUNT]
        jcxz .first
        mov ax, [RUN_BLOCK + RB_PROMPT_IDS]
.first: mov [var(token)], ax
.next:  call forward
        inc word [var(pos)]
        mov si, [var(pos)]
        cmp si, [RUN_BLOCK + RB_PROMPT_COUNT]
        jae .sample
        add si, si
        movzx eax, word [RUN_BLOCK + RB_PROMPT_IDS + si]
        jmp .print
.sample:
        call sample
        cmp eax, EOS
        ja .print
        cmp al, BOS
        jb .print
        xor cx, cx
        jmp report_token
.print: call print_token
        mov [var(token)], ax
        mov ax, [var(pos)]
        cmp ax, [var(steps)]
        jb .next
        ret

; ---------------------------------------------------------------------------------------------------------------
; print_token (tokenizer.py piece_bytes): report a token with the bytes run.c prints for it after [var(token)]:
; its PRINTED string; after BOS without the leading space of its piece, and then nothing if what is left is a
; single unprintable byte.
; Entry:    EAX = token id
; Clobbers: EBX, CX, EDX, ESI
; ---------------------------------------------------------------------------------------------------------------
print_token:
        mov ebx, [SECTION(K_PRINTED) + SEC_ADDR]
        mov esi, [ebx + eax*4]
        mov ecx, [ebx + eax*4 + 4]
        sub cx, si
        add esi, ebx
        cmp word [var(token)], BOS
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
; forward (fixed.py forward_token): one position of the transformer: the logits of [var(token)] at [var(pos)].
; The weight addresses in SEC move on layer by layer as matvec and rmsnorm read them: they start from SEC_START.
; Output:   [var(logits_buf)] = vocab_size Q16.16 logits; cache row [var(pos)] written in every block
; Clobbers: everything but BP
; ---------------------------------------------------------------------------------------------------------------
forward:
        mov si, SEC_START               ; the weight addresses of layer 0
        mov di, SEC
        mov cx, 16 * N_KINDS / 2
        rep movsw
        mov eax, [var(token)]           ; x[j] = (emb_q[token, j] * emb_s[token]) >> (S_emb - 16)
        mov ebx, [SECTION(K_TOKEN_EMBEDDING_S) + SEC_ADDR]
        mov ebx, [ebx + eax*4]
        mul dword [hdr(H_DIM)]
        mov esi, [SECTION(K_TOKEN_EMBEDDING_Q) + SEC_ADDR]
        lea esi, [esi + eax*2]
        mov cl, [SECTION(K_TOKEN_EMBEDDING_S) + SEC_PARAM]
        sub cl, 16
        mov edi, [var(x_buf)]
        mov ax, [hdr(H_DIM)]
        push bp
        xchg ax, bp
.embed: a32 lodsw
        cwde
        imul ebx
        shrd eax, edx, cl
        a32 stosd
        dec bp
        jnz .embed
        pop bp

        mov eax, [var(kv_base)]
        mov [var(layer_kv)], eax
        mov cx, [hdr(H_N_LAYERS)]
.layer: push cx
        mov bx, SECTION(K_RMS_ATT_WEIGHT)
        call norm_and_quantize
        mov eax, [var(qkv_buf)]
        mov bx, SECTION(K_WQKV_Q)
        mov cx, [var(kv_dim)]
        add cx, cx
        add cx, [hdr(H_DIM)]
        call matvec_store               ; q, k, v
        call rope
        call store_kv
        call attention
        call quantize_xb
        mov bx, SECTION(K_WO_Q)
        call residual
        mov bx, SECTION(K_RMS_FFN_WEIGHT)
        call norm_and_quantize
        mov eax, [var(hb_buf)]
        mov bx, SECTION(K_W13_Q)
        mov cx, [hdr(H_HIDDEN)]
        add cx, cx
        call matvec_store               ; gate, up
        call swiglu
        mov bx, SECTION(K_W2_Q)
        call residual
        mov eax, [var(layer_bytes)]
        add [var(layer_kv)], eax
        pop cx
        loop .layer

        mov bx, SECTION(K_RMS_FINAL_WEIGHT)
        call norm_and_quantize
        mov bx, SECTION(K_WCLS_Q)
        call classifier
        mov bx, SECTION(K_WCLS_RESIDUAL_Q)
        mov eax, [var(logits_buf)]
        mov cx, [hdr(H_VOCAB)]
        jmp matvec                      ; logits += the residual classifier

; classifier: logits = the BX matrix times act.
classifier:
        mov eax, [var(logits_buf)]
        mov cx, [hdr(H_VOCAB)]
        jmp matvec_store

; residual: x += the next dim rows of the BX matrix times act (the residual connections).
residual:
        mov eax, [var(x_buf)]
        mov cx, [hdr(H_DIM)]
        jmp matvec

; ---------------------------------------------------------------------------------------------------------------
; norm_and_quantize: xb = rmsnorm(x) with the BX weights, then act = quantize_act(xb, act_bits_dim);
; quantize_xb: only the second half.
; Clobbers: everything but BP
; ---------------------------------------------------------------------------------------------------------------
norm_and_quantize:
        call rmsnorm
quantize_xb:
        mov esi, [var(xb_buf)]
        mov cx, [hdr(H_DIM)]
        mov al, [hdr(H_ACT_BITS_DIM)]
        ; fall through into quantize_act

; ---------------------------------------------------------------------------------------------------------------
; quantize_act (fixed.py quantize_act): act = v >> k, k = max(0, bit_length(OR of |v[j]|) - bits); then sets
; dot_row's length to n.
; Entry:    ESI = v (i32), CX = n (1..32767), AL = bits
; Output:   [var(act_buf)] = act, [var(act_n)] = n, [var(act_row)] = 2n (bytes of an int16 row), [var(act_k)] = k,
;           [var(act_end)] = act + 4n
; Clobbers: EAX, BX, ECX, EDX, ESI, EDI
; ---------------------------------------------------------------------------------------------------------------
quantize_act:
        xchg ax, bx
        mov [var(act_n)], cx
        push esi
        push cx
        add cx, cx
        mov [var(act_row)], cx
        shr cx, 1
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
.shift: mov [var(act_k)], cl
        pop dx
        pop esi
        mov edi, [var(act_buf)]
.store: a32 lodsd
        sar eax, cl
        a32 stosd
        dec dx
        jnz .store
        mov [var(act_end)], edi
        mov eax, [var(act_n)]
        ; fall through into set_dot_length

; ---------------------------------------------------------------------------------------------------------------
; set_dot_length: make the dot_row kernel sum n products.
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
        add cx, dot_row
        mov [dot_entry], cx
        ret

; ---------------------------------------------------------------------------------------------------------------
; dot_row: EDX += wrap32(sum of q[j] * v[j]) over the n int16 q before ESI and the n i32 v before EBX, n as set by
; set_dot_length; callers set ECX = [dot_start], EDX = 0 and call [dot_entry]. DOT_UNROLL multiply-adds per pass;
; the first pass enters part-way to do n mod DOT_UNROLL.
; Clobbers: EAX, ECX (0 on return)
; ---------------------------------------------------------------------------------------------------------------
dot_row:
%assign k 0
%rep DOT_UNROLL
        movsx eax, word [byte esi + ecx*2 + 2*k]
        imul eax, [byte ebx + ecx*4 + 4*k]
        add edx, eax
%assign k k + 1
%endrep
.end:   add ecx, DOT_UNROLL
        jnz dot_row
        ret
DOT_MAC_BYTES equ (dot_row.end - dot_row) / DOT_UNROLL

; ---------------------------------------------------------------------------------------------------------------
; matvec (fixed.py matvec, add=True): out[i] += (sum_j q[i, j] * act[j]) * s[i] >> (S - k) for each of the next
; `rows` rows of a widened (int16) matrix; matvec_store first clears out (add=False).
; Entry:    BX = SEC entry of the matrix's Q section (its S section is the next), EAX = out, CX = rows;
;           act, [var(act_row)], [var(act_k)], [var(act_end)] and dot_row's length from quantize_act
; Output:   out; the Q and S addresses moved past these rows
; Clobbers: EAX, EBX, ECX, EDX, ESI, EDI
; ---------------------------------------------------------------------------------------------------------------
matvec_store:
        pushad
        movzx ecx, cx
        xchg eax, edi
        xor eax, eax
        a32 rep stosd
        popad
matvec:
        mov [var(rows_left)], cx
        mov cl, [bx + 16 + SEC_PARAM]
        sub cl, [var(act_k)]
        mov [var(matvec_shift)], cl
        mov esi, [bx + SEC_ADDR]
        add esi, [var(act_row)]         ; dot_row reads back from the end of a row
        push bx
        mov edi, [bx + 16 + SEC_ADDR]
        sub edi, eax                    ; s[i] is at [out + 4i + EDI]
        mov ebx, [var(act_end)]
        push bp
        xchg eax, ebp
.row:   mov ecx, [dot_start]
        xor edx, edx
        call [dot_entry]
        mov eax, [ds:ebp + edi]         ; ds: an EBP base means SS, whose limit is not unreal
        imul edx
        mov cl, [matvec_shift]
        shrd eax, edx, cl
        add [ds:ebp], eax
        add ebp, 4
        add esi, [act_row]
        dec word [rows_left]
        jnz .row
        add edi, ebp
        pop bp
        sub esi, [var(act_row)]
        pop bx
        mov [bx + SEC_ADDR], esi        ; the next layer's rows and scales
        mov [bx + 16 + SEC_ADDR], edi
        ret

; ---------------------------------------------------------------------------------------------------------------
; rmsnorm (fixed.py rmsnorm): xb[j] = (x[j] * inv >> (31 - h)) * G[j] >> 32 with ss = sum x[j]^2 + rms_eps
; (below 2^62), h such that 2^60 <= ss << 2h < 2^62, inv = (2^61 - 1) // isqrt(ss << 2h) (Newton from 2^31).
; Entry:    BX = SEC entry of the weights G (moved on by dim weights)
; Clobbers: EAX, EBX, ECX, EDX, ESI, EDI
; ---------------------------------------------------------------------------------------------------------------
rmsnorm:
        mov eax, [hdr(H_DIM)]
        shl eax, 2
        mov edx, [bx + SEC_ADDR]
        add [bx + SEC_ADDR], eax
        push edx
        mov esi, [var(x_buf)]
        mov cx, [hdr(H_DIM)]
        mov edi, [hdr(H_RMS_EPS)]       ; ss = EBX:EDI
        xor ebx, ebx
.square:
        a32 lodsd
        imul eax
        add edi, eax
        adc ebx, edx
        loop .square
        mov cl, 31                      ; 31 - h
        bt ebx, 31
        jc .saturate
        bt ebx, 30
        jnc .normalize
.saturate:
        mov ebx, (1 << 30) - 1          ; only garbage gets past 2^62
        or edi, -1
.normalize:
        cmp ebx, 1 << 28
        jae .normalized
        shld ebx, edi, 2
        shl edi, 2
        dec cx
        jmp .normalize
.normalized:
        push cx
        xor ecx, ecx
        bts ecx, 31                     ; Newton's method from 2^31, above the root
.newton:
        mov edx, ebx
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
        div ecx                         ; inv = (2^61 - 1) // root
        mov [var(rms_inv)], eax
        pop cx
        pop ebx                         ; G
        mov esi, [var(x_buf)]
        mov edi, [var(xb_buf)]
        push bp
        mov bp, [hdr(H_DIM)]
.scale: a32 lodsd
        imul dword [rms_inv]
        shrd eax, edx, cl               ; x / sqrt(ss) in Q2.30
        imul dword [ebx]
        add ebx, 4
        xchg eax, edx
        a32 stosd
        dec bp
        jnz .scale
        pop bp
        ret

; ---------------------------------------------------------------------------------------------------------------
; rope (fixed.py rope): rotate each (even, odd) pair of the query and key heads in qkv by ROPE[pos].
; Clobbers: EAX, EBX, ECX, EDX, ESI, DI
; ---------------------------------------------------------------------------------------------------------------
rope:
        mov esi, [var(qkv_buf)]
        mov ax, [hdr(H_N_HEADS)]
        add ax, [hdr(H_N_KV_HEADS)]
        mov [var(heads_left)], ax
.head:  mov eax, [var(pos)]
        mul dword [var(head_size)]
        add eax, eax                    ; a ROPE row: head_size / 2 (cos, sin) int16 pairs
        add eax, [SECTION(K_ROPE) + SEC_ADDR]
        xchg eax, ebx
        mov ax, [var(head_size)]
        shr ax, 1
        mov [var(pairs_left)], ax
.pair:  mov eax, [ebx]
        rol eax, 16
        mov [var(rope_terms)], eax      ; sin, cos, -sin
        neg ax
        mov [var(rope_terms) + 4], ax
        lea di, [var(rope_terms) + 2]
        call rotate_term                ; v0 cos - v1 sin
        push eax
        dec di
        dec di
        call rotate_term                ; v0 sin + v1 cos
        mov [esi + 4], eax
        pop dword [esi]
        add esi, 8
        add ebx, 4
        dec word [var(pairs_left)]
        jnz .pair
        dec word [var(heads_left)]
        jnz .head
        ret

; rotate_term: EAX = wrap32((v0 * [DI] + v1 * [DI + 2]) >> rope_shift), v0 = [ESI], v1 = [ESI + 4], int16 factors,
; 64-bit products and sum. Clobbers: ECX, EDX
rotate_term:
        movsx eax, word [di + 2]
        imul dword [esi + 4]
        push edx
        push eax
        movsx eax, word [di]
        imul dword [esi]
        pop ecx
        add eax, ecx
        pop ecx
        adc edx, ecx
        mov cl, [hdr(H_ROPE_SHIFT)]
        shrd eax, edx, cl
        ret

; ---------------------------------------------------------------------------------------------------------------
; store_kv (fixed.py forward_token step 4): this position's keys and values of every kv head into the cache.
; A cache block, kv_block bytes for each (layer, kv head) from kv_base:
;   seq_len key rows of kv_stride bytes: head_size int16 keys, their i32 divisor Dk, the values' divisor Dv
;   at off_vt, the values (int8 range, stored int16) transposed: head_size rows of seq_len, each a dot_row operand
; Clobbers: EAX, EBX, ECX, EDX, ESI, EDI
; ---------------------------------------------------------------------------------------------------------------
store_kv:
        mov esi, [var(qkv_buf)]
        mov eax, [hdr(H_DIM)]
        lea esi, [esi + eax*4]          ; the keys of kv head 0
        mov ebx, [var(layer_kv)]
        mov cx, [hdr(H_N_KV_HEADS)]
.head:  push cx
        mov edi, [var(pos)]
        imul edi, [var(kv_stride)]
        add edi, ebx
        mov dword [var(kv_step)], 2     ; (the scratch variables are overlaid: whole dwords)
        mov al, KEY_SHIFT
        call store_kv_head
        a32 stosd                       ; Dk after the keys
        push edi
        push esi
        mov eax, [var(kv_dim)]
        lea esi, [esi + eax*4]          ; this kv head's values
        mov edi, [var(pos)]
        add edi, edi
        add edi, [var(off_vt)]
        add edi, ebx
        mov eax, [var(value_row)]
        mov [var(kv_step)], eax
        mov al, VALUE_SHIFT
        call store_kv_head
        pop esi
        pop edi
        a32 stosd                       ; Dv
        mov eax, [var(head_size)]
        lea esi, [esi + eax*4]
        add ebx, [var(kv_block)]
        pop cx
        loop .head
        ret

; ---------------------------------------------------------------------------------------------------------------
; store_kv_head (fixed.py store_kv): D = M + (M + T - 1) // T with M = min(max |v|, 2^30), T = 2^shift - 1;
; c[i] = sign(v[i]) * min(T, (|v[i]| << shift + (D >> 1)) // D), which is trunc((v << shift +- D >> 1) / D),
; stored as int16 (keys, shift 15, and values, shift 7). M = 0 gives D = 0 and every c = 0.
; Entry:    ESI = v (head_size i32), EDI = c[0], AL = shift, [var(kv_step)] = bytes from c[i] to c[i+1]
; Output:   EAX = D, EDI = c[head_size]
; Clobbers: ECX, EDX
; ---------------------------------------------------------------------------------------------------------------
store_kv_head:
        push ebx
        push esi
        push ax
        xor ebx, ebx
        mov cx, [var(head_size)]
.max:   a32 lodsd
        cdq
        xor eax, edx
        sub eax, edx
        cmp eax, ebx
        jb .smaller
        xchg eax, ebx
.smaller:
        loop .max
        pop cx                          ; CL = shift
        mov eax, 1 << 30
        cmp ebx, eax
        jb .in_range
        xchg eax, ebx
.in_range:
        xor eax, eax
        inc ax
        shl eax, cl
        dec eax
        mov [var(kv_top)], eax          ; T
        dec eax
        add eax, ebx
        xor edx, edx
        div dword [var(kv_top)]
        add ebx, eax                    ; D
        pop esi
        push esi
        push ebx
        mov eax, ebx
        shr eax, 1
        mov [var(kv_half)], eax
        test ebx, ebx
        jnz .divisor
        inc bx                          ; M = 0: every c is 0 / 1
.divisor:
        mov dx, [var(head_size)]
        mov [var(kv_count)], dx
.round: a32 lodsd
        cdq
        push edx                        ; the sign
        xor eax, edx
        sub eax, edx
        xor edx, edx
        shld edx, eax, cl
        shl eax, cl
        add eax, [var(kv_half)]
        adc edx, 0
        div ebx
        cmp eax, [var(kv_top)]
        jbe .clamped
        mov eax, [var(kv_top)]
.clamped:
        pop edx
        xor eax, edx
        sub eax, edx
        mov [edi], ax
        add edi, [var(kv_step)]
        dec word [var(kv_count)]
        jnz .round
        pop eax
        pop esi
        pop ebx
        ret

; ---------------------------------------------------------------------------------------------------------------
; attention (fixed.py attention, for each query head h): qa = quantize_act(q_h, act_bits_head) and for t = 0..pos
; score[t] = (qa . key[t]) * Dk[t] >> (31 - k); e[t] = exp_lookup(top - score[t]); recip = (2^48 - 1) // sum e;
; w[t] = ((e[t] * recip) >> 32) * Dv[t] >> 16; xb[h * head_size + i] = wrap32(sum_t w[t] * value[t][i]) >> 7.
; Clobbers: EAX, EBX, ECX, EDX, ESI, EDI
; ---------------------------------------------------------------------------------------------------------------
attention:
        mov eax, [var(pos)]
        inc eax
        shl eax, 2
        add eax, [var(att_buf)]
        mov [var(att_end)], eax
        xor eax, eax
        mov [var(head)], ax
        mov [var(head_off)], eax
.head:  mov esi, [var(head_off)]
        add esi, [var(qkv_buf)]
        mov cx, [var(head_size)]
        mov al, [hdr(H_ACT_BITS_HEAD)]
        call quantize_act               ; qa, and dot_row's length head_size
        mov ax, [var(head)]
        cwd
        div word [var(kv_mul)]          ; the kv head
        movzx eax, ax
        mul dword [var(kv_block)]
        add eax, [var(layer_kv)]
        mov [var(att_block)], eax
        mov cl, 31
        sub cl, [var(act_k)]
        mov [var(att_shift)], cl
        mov esi, [var(head_size)]
        lea esi, [eax + esi*2]          ; Dk of key row 0, after its keys
        mov edi, [var(att_buf)]
        mov ebx, [var(act_end)]
        push bp
        mov ebp, 1 << 31                ; top
.score: mov ecx, [dot_start]
        xor edx, edx
        call [dot_entry]                ; qa . key[t]
        a32 lodsd                       ; Dk
        imul edx
        mov cl, [att_shift]
        shrd eax, edx, cl
        a32 stosd
        cmp eax, ebp
        jle .below
        xchg eax, ebp
.below: add esi, [key_skip]
        cmp edi, [att_end]
        jb .score

        mov esi, [att_buf]              ; e[t] = exp_lookup(top - score[t]), lookup's steps inline
        mov ebx, [exp_pairs]
        mov cl, [ebx - 4]
        xor edi, edi                    ; total
.exp:   a32 lodsd
        neg eax
        add eax, ebp
        mov edx, eax
        shr edx, cl
        cmp edx, [ebx - 8]
        jae .past
        and eax, [ebx - 12]
        imul eax, [ebx + edx*8 + 4]
        sar eax, cl
        add eax, [ebx + edx*8]
.e:     mov [esi - 4], eax
        add edi, eax
        cmp esi, [att_end]
        jb .exp
        pop bp

        mov edx, 0xFFFF
        or eax, -1
        div edi
        xchg eax, ebx                   ; recip
        mov esi, [var(att_buf)]
        mov edi, [var(key_skip)]
        add edi, [var(att_block)]       ; Dv of key row 0
.weight:
        a32 lodsd
        test eax, eax
        jz .no_weight                   ; e = 0 (far below the top) stays 0
        mul ebx
        xchg eax, edx
        mul dword [edi]
        shrd eax, edx, 16
        mov [esi - 4], eax
.no_weight:
        add edi, [var(kv_stride)]
        cmp esi, [var(att_end)]
        jb .weight

        mov eax, [var(pos)]
        inc eax
        call set_dot_length
        mov esi, [var(att_block)]
        add esi, [var(off_vt)]
        mov eax, [var(pos)]
        lea esi, [esi + eax*2 + 2]      ; the end of value row 0
        mov edi, [var(head_off)]
        add edi, [var(xb_buf)]
        mov ebx, [var(att_end)]
        mov ax, [var(head_size)]
        mov [var(pairs_left)], ax
.value: mov ecx, [dot_start]
        xor edx, edx
        call [dot_entry]
        sar edx, VALUE_SHIFT
        xchg eax, edx
        a32 stosd
        add esi, [var(value_row)]
        dec word [var(pairs_left)]
        jnz .value
        mov eax, [var(head_size)]
        shl eax, 2
        add [var(head_off)], eax
        inc word [var(head)]
        mov ax, [var(head)]
        cmp ax, [hdr(H_N_HEADS)]
        jb .head
        ret
.past:  xor eax, eax
        jmp .e

; ---------------------------------------------------------------------------------------------------------------
; lookup (fixed.py exp_lookup): with i = u >> e and a table from build_pairs, t[i] + ((t[i+1] - t[i]) *
; (u mod 2^e)) >> e, or 0 when i >= n - 1 (past the table). attention and swiglu do the same steps inline.
; Entry:    EAX = u (unsigned), EBX = first pair of the table
; Output:   EAX
; Clobbers: ECX, EDX
; ---------------------------------------------------------------------------------------------------------------
lookup:
        mov cl, [ebx - 4]
        mov edx, eax
        shr edx, cl
        cmp edx, [ebx - 8]
        jae .past
        and eax, [ebx - 12]
        imul eax, [ebx + edx*8 + 4]
        sar eax, cl
        add eax, [ebx + edx*8]
        ret
.past:  xor eax, eax
        ret

; ---------------------------------------------------------------------------------------------------------------
; swiglu (fixed.py forward_token step 8): hb[i] = (silu_lookup(hb[i]) * hb[hidden_dim + i]) >> 16, then
; act = quantize_act(hb[0:hidden_dim], act_bits_hidden).
; Clobbers: everything but BP
; ---------------------------------------------------------------------------------------------------------------
swiglu:
        mov esi, [var(hb_buf)]
        mov ebx, [var(silu_pairs)]
        mov cl, [ebx - 4]
        mov edi, [hdr(H_HIDDEN)]
        shl edi, 2                      ; from a gate to its up
        push bp
        mov bp, [hdr(H_HIDDEN)]
.gate:  a32 lodsd                       ; x
        sub eax, [HDR + H_SILU_LO]      ; u = x - silu_lo, and the signed compare of x with silu_lo
        jl .below
        mov edx, eax                    ; lookup's steps inline
        shr edx, cl
        cmp edx, [ebx - 8]
        jae .above
        and eax, [ebx - 12]
        imul eax, [ebx + edx*8 + 4]
        sar eax, cl
        add eax, [ebx + edx*8]
.silu:  imul dword [esi + edi - 4]      ; times up
        shrd eax, edx, 16
        mov [esi - 4], eax
        dec bp
        jnz .gate
        pop bp
        mov esi, [var(hb_buf)]
        mov cx, [hdr(H_HIDDEN)]
        mov al, [hdr(H_ACT_BITS_HIDDEN)]
        jmp quantize_act
.below: xor eax, eax                    ; below the table: 0
        jmp .silu
.above: add eax, [HDR + H_SILU_LO]      ; past the table: x
        jmp .silu

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
; sample (fixed.py FixedSampler.sample, sample_fixed): greedy when inv_temperature is 0; otherwise weights
; e[i] = exp_lookup((top - logit[i]) * inv_temperature >> 16), 0 below min-p, the top-k / top-p cut over the order
; (e descending, index ascending; index order when both are off) and one 24-bit coin from xorshift64*.
; Output:   EAX = token id
; Clobbers: everything but BP
; ---------------------------------------------------------------------------------------------------------------
sample:
        mov esi, [var(logits_buf)]
        mov cx, [hdr(H_VOCAB)]
        call argmax                     ; EAX = the greedy choice, EBX = the top logit
        cmp dword [RUN_BLOCK + RB_INV_TEMPERATURE], 0
        je .done
        mov [var(sample_top)], ebx
        call random_u32
        shr eax, 8
        mov [var(sample_coin)], eax
        mov esi, [var(logits_buf)]
        mov ebx, [var(exp_pairs)]
        mov edi, [var(sample_buf)]
        xor eax, eax
        mov [var(sample_total)], eax
        mov cx, [hdr(H_VOCAB)]
.weight:
        push cx
        mov eax, [var(sample_top)]
        sub eax, [esi]
        add esi, 4
        mul dword [RUN_BLOCK + RB_INV_TEMPERATURE]
        shrd eax, edx, 16
        shr edx, 16
        jnz .far
        call lookup
        cmp eax, [RUN_BLOCK + RB_MINP]
        jae .store
.far:   xor eax, eax                    ; past the table (the scaled distance is 2^32 or more), or below min-p
.store: a32 stosd
        add [var(sample_total)], eax
        pop cx
        loop .weight                    ; EDI = the picks: (index, e) pairs in the order
        mov edx, [hdr(H_VOCAB)]
        mov eax, [RUN_BLOCK + RB_TOPK]
        dec eax
        dec edx
        cmp eax, edx
        jb .keep
        xchg eax, edx
.keep:  inc eax                         ; top-k if 0 < topk < vocab_size, else vocab_size
        shl eax, 3
        add eax, edi
        mov [var(sample_keep_end)], eax
        mov eax, [RUN_BLOCK + RB_TOPP]
        or edx, -1                      ; top-p off: no running sum is above this
        cmp eax, 1 << 16
        jae .threshold
        mul dword [var(sample_total)]
        shrd eax, edx, 16
        xchg eax, edx
.threshold:
        mov [var(sample_threshold)], edx
        inc edx
        or edx, [RUN_BLOCK + RB_TOPK]
        mov [var(sample_sorted)], edx   ; 0 when both are off: index order
        mov [var(sample_picks)], edi
        push bp
        xor ebp, ebp                    ; the kept weight
.pick:  mov eax, edi
        sub eax, [sample_picks]
        shr eax, 3
        mov esi, [sample_buf]
        cmp dword [sample_sorted], 0
        je .picked
        mov cx, [HDR + H_VOCAB]
        call argmax                     ; the largest weight not picked yet
.picked:
        a32 stosd
        or ebx, -1
        xchg ebx, [esi + eax*4]
        xchg eax, ebx
        a32 stosd
        add ebp, eax
        cmp ebp, [sample_threshold]
        ja .cut
        cmp edi, [sample_keep_end]
        jb .pick
.cut:   mov eax, [sample_coin]
        mul ebp
        pop bp
        shrd eax, edx, 24
        xchg eax, edx                   ; target < the kept weight
        mov esi, [var(sample_picks)]
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
; random_u32 (sampling.py XorShiftRng.next_u32, run.c's xorshift64*): s ^= s >> 12; s ^= s << 25; s ^= s >> 27,
; each as 64-bit shifts one bit at a time; then the high dword of the low 64 bits of s * 0x2545F4914F6CDD1D
; from three 32 x 32 multiplies.
; Output:   EAX = u32; the state in the run block's seed field advanced
; Clobbers: EBX, ECX, EDX, SI, EDI
; ---------------------------------------------------------------------------------------------------------------
random_u32:
        mov ebx, [RUN_BLOCK + RB_SEED]  ; s = EDX:EBX
        mov edx, [RUN_BLOCK + RB_SEED + 4]
        mov si, xorshift_shifts
.step:  lodsb
        cbw
        xchg ax, cx                     ; bits to shift, negative: to the left
        mov eax, ebx
        mov edi, edx                    ; t = s
.bit:   test cx, cx
        jl .left
        shr edi, 1
        rcr eax, 1
        dec cx
        jmp .shifted
.left:  shl eax, 1
        rcl edi, 1
        inc cx
.shifted:
        jnz .bit
        xor ebx, eax                    ; s ^= t
        xor edx, edi
        cmp si, xorshift_shifts + 3
        jb .step
        mov [RUN_BLOCK + RB_SEED], ebx
        mov [RUN_BLOCK + RB_SEED + 4], edx
        imul ecx, edx, 0x4F6CDD1D       ; hi * low half of the multiplier
        mov eax, 0x4F6CDD1D
        mul ebx
        add edx, ecx
        imul ecx, ebx, 0x2545F491       ; lo * its high half
        add edx, ecx
        xchg eax, edx
        ret

xorshift_shifts:    db 12, -25, 27
wide_kinds:         db K_TOKEN_EMBEDDING_Q, K_WQKV_Q, K_WO_Q, K_W13_Q, K_W2_Q, K_WCLS_Q, K_WCLS_RESIDUAL_Q
WIDE_KINDS          equ $ - wide_kinds
%endif

gdt_descriptor:                         ; lgdt's 6 bytes, which also fill the GDT's unused null descriptor
gdt:                dw gdt_end - gdt - 1
                    dd gdt
                    dw 0
flat_data:                              ; base 0, limit 0xFFFFF pages = 4 GiB, present writable data, 16-bit
                    dw 0xFFFF, 0x0000
                    db 0x00, 0x92, 0x8F, 0x00
gdt_end:
FLAT_DATA_SELECTOR  equ flat_data - gdt

dap:                                    ; INT 13h AH=42h disk address packet, buffer fixed at DISK_BUFFER
                    db 16, 0
.count:             dw 0
.offset:            dw DISK_BUFFER & 0xF
.segment:           dw DISK_BUFFER >> 4
.lba:               dq 0

msg_banner:         db "sectorllm engine", 10, 0
msg_bad_run_block:  db "sectorllm: bad run block", 10, 0
msg_a20_closed:     db "sectorllm: A20 closed", 10, 0
msg_needs:          db "sectorllm: needs ", 0
msg_has:            db " KiB above 1 MiB, has ", 0
msg_kib:            db " KiB", 10, 0
msg_disk_error:     db "sectorllm: disk error ", 0

engine_end:

        absolute engine_end
                    resb -(engine_end - engine_start) & 0xFFF  ; a page of their own: QEMU retranslates the code
                                                                ; of any page that is written to
boot_drive:         resb 1
disk_status:        resb 1              ; AH of the last INT 13h read
a20_probe:          resb 1
mem_top:            resd 1
model_sectors:      resd 1
heap_base:          resd 1
HDR:                resb HDR_BYTES      ; the packed header's copy: [hdr(H_x)]
VARS:                                   ; BP in the model code: [var(x)]
buffers:                                ; N_BUFFERS slots of SLOT_BYTES (setup_model)
x_buf:              resd 1              ; Q16.16 residual stream (dim)
xb_buf:             resd 1              ; rmsnorm and attention output (dim)
act_buf:            resd 1              ; matmul input (dim, hidden_dim or head_size)
qkv_buf:            resd 1              ; q, k, v (dim + 2 kv_dim)
hb_buf:             resd 1              ; gate, then up (2 hidden_dim)
att_buf:            resd 1              ; scores, then e, then weights (pos + 1)
logits_buf:         resd 1              ; (vocab_size)
sample_buf:         resd 1              ; the sampler's e (vocab_size), then its picks
exp_pairs:          resd 1              ; build_pairs tables
silu_pairs:         resd 1
N_BUFFERS           equ ($ - buffers) / 4
layer_kv:           resd 1              ; this layer's first cache block
kv_block:           resd 1              ; bytes of a cache block
off_vt:             resd 1              ; the values in a block
kv_stride:          resd 1              ; bytes of a key row
value_row:          resd 1              ; bytes of a transposed value row
value_bytes:        resd 1              ; of a block's values
key_skip:           resd 1              ; from a key row's Dv to the next row's Dk
head_size:          resd 1
kv_dim:             resd 1
kv_mul:             resd 1              ; query heads per kv head
token:              resd 1              ; the token at pos
pos:                resd 1
act_n:              resd 1              ; quantize_act's n, 2n, k and the end of act
act_row:            resd 1
act_k:              resd 1
act_end:            resd 1
SCRATCH:                                ; each routine's own variables, overlaid
        absolute SCRATCH
rows_left:          resd 1              ; matvec
matvec_shift:       resd 1
        absolute SCRATCH
rms_inv:            resd 1              ; rmsnorm
        absolute SCRATCH
heads_left:         resw 1              ; rope
pairs_left:         resw 1              ; rope, attention
rope_terms:         resw 3              ; sin, cos, -sin
        absolute SCRATCH + 4
kv_step:            resd 1              ; store_kv
kv_top:             resd 1
kv_half:            resd 1
kv_count:           resd 1
        absolute SCRATCH + 4
head:               resd 1              ; attention
head_off:           resd 1              ; 4 * head * head_size
neg_head_size:      resd 1
att_end:            resd 1
att_block:          resd 1
att_shift:          resd 1
        absolute SCRATCH
sample_top:         resd 1              ; sample
sample_total:       resd 1
sample_coin:        resd 1
sample_keep_end:    resd 1
sample_threshold:   resd 1
sample_sorted:      resd 1
sample_picks:       resd 1
kv_base:            resd 1              ; the first cache block
layer_bytes:        resd 1              ; n_kv_heads blocks
steps:              resd 1              ; forward passes to run
dot_start:          resd 1              ; dot_row's first index and entry (set_dot_length)
dot_entry:          resd 1
VARS_END:
SEC:                resb 16 * N_KINDS   ; per section kind: SEC_ADDR, SEC_LEN, SEC_PARAM
SEC_END:
SEC_START:          resb 16 * N_KINDS   ; SEC as setup_model leaves it: each matrix's layer 0
