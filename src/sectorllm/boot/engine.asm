; engine.asm - sectorllm boot engine: tells a story with a packed model it loads above 1 MiB, token for token what
; the fixed-point golden model (engines/fixed.py, docs/arithmetic.md) computes, on the screen and COM1.
;
; The boot sector (boot.asm) loads the run block and this file and jumps to the first byte here in real mode. The
; loader (memory.asm) opens A20, sizes the memory, refuses a machine too small for the run, loads the model above
; 1 MiB with the boot sector's read_sectors, fills the IDT and enters 32-bit protected mode at main32, where the
; engine stays: flat 32-bit code reaches the model with no segment tricks and no operand- or address-size prefixes.
; Only the screen needs real mode: `teletype` drops back to it for one INT 10h call per byte and returns.
; Routines that mirror a golden-model function carry its name; docs/arithmetic.md gives every rounding step.
; The memory map and the run block: layout.asm. One file per concern:
;   memory.asm      the loader, in real mode: A20, the memory size and check, the model's load, protected mode
;   exceptions.asm  the IDT's handler: "sectorllm: CPU exception N at EIP", then the run ends
;   serial.asm      COM1 and the screen: plain text or records (the SERIAL PROTOCOL below), the end of the run
;   forward.asm     setup_model, generate and the forward pass
;   sampler.asm     greedy, or the fixed-point sampler
;   selftest.asm    instead of the model with -DSELFTEST: reports what the engine was handed
;
; The engine's own variables (from the page after its code; a page of their own, since QEMU retranslates the code
; of any page that is written to): the packed header's first HDR_USED bytes (HDR), the run block's settings and
; layout and the variables (VARS), the IDT, the section entries as the forward pass moves them on (SEC).
;
; REGISTER CONVENTIONS
;   Protected mode, 32-bit code: CS = CODE32, DS = ES = SS = DATA32, both flat (base 0, 4 GiB), so an address is
;   a physical address. Interrupts stay off: the IDT only catches exceptions; `teletype` turns them on in real mode
;   only. Direction flag clear.
;   Routines take their arguments in registers as their banner says and preserve every register their banner does
;   not list under Clobbers; flags are always clobbered.
;   In the model code (setup_model and what it calls) EBP = VARS + VARS_BIAS: [hdr(H_x)] is a packed header field
;   and [var(x)] a variable, with 8-bit displacements. A routine that needs EBP saves it and uses absolute addresses.
;
; ENTERING FROM ANOTHER LOADER (uefi.asm): main32 in protected or compatibility mode with flat CS, DS, ES, SS,
;   interrupts off, a stack, the run block at RUN_BLOCK, the model at MODEL_BASE and memory up to RB_MEMORY_END;
;   screen_hook holds the routine that shows AL on the screen (teletype here), preserving every register.
;
; SERIAL PROTOCOL (COM1, 9600 8N1 as boot.asm set it; image.py SerialDecoder parses it)
;   By default COM1 carries what the screen shows, "\n" as CR LF: a terminal shows the story. A runner that sent
;   SERIAL_RECORDS (layout.asm) before the machine started gets records instead. Outside records that stream is
;   log text: ASCII, never STX. A record is STX, one tag letter, then:
;     'T' id (u16) n (u8) b1 .. bn     a token and the n bytes it prints (any values): every forced prompt token
;                                      and generated token; a sampled BOS or EOS, which ends the run, with n = 0
;     'E' status (u8)                  end of run; the status also goes to isa-debug-exit (port 0xF4)
;     'M' name '=' value ETX           a named value (decimal, unsigned 32-bit): the self-test's
;   After the end record, end_run waits for one more byte from the runner before port 0xF4, so the runner can take
;   a screenshot while the final screen is still there.

        bits 16
        cpu 386

%include "layout.asm"

HDR_USED            equ 112             ; the packed header's bytes the engine reads (docs/format.md), copied to
                                        ; HDR; fields, u32 / i32:
H_DIM               equ 16
H_HIDDEN            equ 20
H_N_LAYERS          equ 24
H_N_HEADS           equ 28
H_N_KV_HEADS        equ 32
H_VOCAB             equ 36
H_ACT_BITS_DIM      equ 52
H_ACT_BITS_HIDDEN   equ 56
H_ACT_BITS_HEAD     equ 60
H_ROPE_SHIFT        equ 68
H_RMS_EPS           equ 72
H_SILU_LO           equ 84
H_HEAD_SIZE         equ 100
H_KV_DIM            equ 104
H_KV_MUL            equ 108             ; query heads per kv head
TABLE_OFFSET        equ 128             ; the section table follows the header: an entry for each kind, in order
SEC_START           equ MODEL_BASE + TABLE_OFFSET - 16  ; kind k's entry at SEC_START + 16 k

K_TOKEN_EMBEDDING_Q equ 1               ; section kinds (docs/format.md); forward's EBX walks 3 to 17 in order
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
K_SILU_TABLE        equ 20
K_PRINTED           equ 22
K_BOS_SKIP          equ 24
SEC_ADDR            equ 4               ; SEC entries, 16 bytes per kind: the section table's entry with its
SEC_LEN             equ 8               ; offset turned into an address (the weights' addresses then move on
SEC_PARAM           equ 12              ; layer by layer as the forward pass reads them)
N_KINDS             equ 25              ; kinds 1 to 24, and the unused 0
%define SECTION(kind) (SEC + 16 * (kind))
%define hdr(field) ebp + (field) - HDR_USED - VARS_BIAS
%define var(name) ebp + (name) - VARS - VARS_BIAS
VARS_BIAS           equ 32              ; EBP = VARS + VARS_BIAS: header fields and variables both within disp8

BOS                 equ 1
EOS                 equ 2
KEY_SHIFT           equ 15              ; cached keys are int16, values int8 (fixed.py KEY_SHIFT, VALUE_SHIFT)
VALUE_SHIFT         equ 7

HEAP_ALIGN          equ 4096            ; where the self-test copies its tokens: the model's end, rounded up
N_VECTORS           equ 14              ; the IDT's gates: the exceptions this code can raise (0..13); a higher
                                        ; vector is past the IDT's limit and raises #GP (13) instead
SYSTEM_CONTROL_A    equ 0x92            ; "fast A20" port
LOAD_CHUNK_SECTORS  equ 64              ; 32 KiB: fits DISK_BUFFER, under the 127-sector limit of some BIOSes
STX                 equ 0x02
ETX                 equ 0x03

CODE32              equ gdt.code32 - gdt  ; selectors
DATA32              equ gdt.data32 - gdt
CODE16              equ gdt.code16 - gdt

        org ENGINE_BASE

%include "memory.asm"

; ---------------------------------------------------------------------------------------------------------------
; main32: the way in from protected (or compatibility) mode: take the runner's handshake, set the model up and
; generate (or run the self-test), then end the run with STATUS_OK.
; ---------------------------------------------------------------------------------------------------------------
main32:
        call serial_handshake
%ifdef FAULT_TEST                       ; tests only: a general protection fault, a selector past the GDT's end
        push byte 0x78
fault_test:
        pop ds
%endif
%ifdef SELFTEST
        call selftest
%else
        call setup_model                ; and on into generate
%endif
        xor eax, eax                    ; STATUS_OK
        jmp end_run

%include "serial.asm"
%include "exceptions.asm"
%ifdef SELFTEST
%include "selftest.asm"
%else
%include "forward.asm"
%include "sampler.asm"
%endif

gdt:                                    ; lgdt's 6 bytes fill the unused null descriptor
                    dw gdt_end - gdt - 1
.ivt:               dd gdt              ; and lidt's for real mode's vectors: base 0, a limit of gdt's
                                        ; address, at least 0x3FF (the engine lies in 0x8000..0xFDFF)
                    dw 0
.code32:            dw 0xFFFF, 0x0000   ; base 0, limit 0xFFFFF pages = 4 GiB, execute/read, 32-bit
                    db 0x00, 0x9A, 0xCF, 0x00
.data32:            dw 0xFFFF, 0x0000   ; base 0, 4 GiB, read/write, 32-bit stack
                    db 0x00, 0x92, 0xCF, 0x00
.code16:            dw 0xFFFF, 0x0000   ; base 0, 64 KiB, execute/read, 16-bit: the way back to real mode
                    db 0x00, 0x9A, 0x00, 0x00
gdt_end:
screen_hook:        dd teletype         ; another loader puts its own screen routine here
serial_mode:        db 0                ; 0: plain text; 1: records

engine_end:

        absolute engine_end
                    resb -(engine_end - engine_start) & 0xFFF
heap_base:          resd 1              ; the self-test's: the end of the model rounded up to HEAP_ALIGN
HDR:                resb HDR_USED       ; the packed header's copy: [hdr(H_x)]
VARS:                                   ; EBP - VARS_BIAS in the model code: [var(x)]
run_inv_temperature: resd 1             ; the run block's settings (RB_INV_TEMPERATURE .. RB_PROMPT_COUNT)
run_topp:           resd 1
run_topk:           resd 1
run_minp:           resd 1
run_seed:           resd 2              ; the xorshift64* state, advanced here
run_passes:         resw 1
run_prompt_count:   resw 1
buffers:                                ; where image.py placed them (layout.asm)
x_buf:              resd 1              ; Q16.16 residual stream (dim)
xb_buf:             resd 1              ; rmsnorm and attention output (dim): x_buf + XB_DISTANCE
act_buf:            resd 1              ; matmul input (dim, hidden_dim or head_size)
qkv_buf:            resd 1              ; q, k, v (dim + 2 kv_dim)
hb_buf:             resd 1              ; gate, then up (2 hidden_dim)
att_buf:            resd 1              ; scores, then e, then weights (pos + 1)
logits_buf:         resd 1              ; (vocab_size), then the sampler's keys
kernel_buf:         resd 1              ; the two dot-product kernels, written by setup_model
N_BUFFERS           equ ($ - buffers) / 4
exp_table:          resd 1              ; the packed exp table (lookup's form)
kv_base:            resd 1              ; the first cache block: n_layers * n_kv_heads blocks (store_kv)
kv_block:           resd 1              ; bytes of a cache block: cache_len key rows, then the values transposed
off_vt:             resd 1              ; the values in a block
kv_stride:          resd 1              ; bytes of a key row: head_size int16 keys, Dk, Dv
value_row:          resd 1              ; bytes of a transposed value row: cache_len int16
layer_bytes:        resd 1              ; n_kv_heads blocks
pos:                resd 1              ; the position: 0 at the start
%if $ - VARS != RB_SETTINGS_END - RB_SETTINGS
%error "VARS and the run block's settings differ"
%endif
layer_kv:           resd 1              ; this layer's first cache block
token:              resd 1              ; the token at pos
act_row:            resd 1              ; quantize_act's n (an int8 row's bytes), k and the end of act
act_k:              resd 1
act_end:            resd 1
kernel8_end:        resd 1              ; the dot-product kernels' rets: int8 q (weights), int16 q (the cache)
kernel16_end:       resd 1
dot8_entry:         resd 1              ; their entries for the current length (set_dot_length)
dot16_entry:        resd 1
SCRATCH_BYTES       equ 20              ; each routine's own variables, overlaid at SCRATCH in this much room
%macro scratch 0                        ; starts an overlay, or ends the last one, checking it fits
%if $ - SCRATCH > SCRATCH_BYTES
%error "a routine's variables outgrow SCRATCH_BYTES"
%endif
        absolute SCRATCH
%endmacro
SCRATCH:
        scratch
rows_left:          resd 1              ; matvec
        scratch
kv_top:             resd 1              ; store_kv
kv_half:            resd 1
kv_count:           resd 1
        scratch
head:               resd 1              ; attention
head_off:           resd 1              ; 4 * head * head_size
att_top:            resd 1              ; the largest score
att_end:            resd 1
att_block:          resd 1
        scratch
sample_total:       resd 1              ; sample
sample_top:         resd 1
        scratch
                    resb SCRATCH_BYTES
VARS_END:
SEC:                resb 16 * N_KINDS   ; per section kind: SEC_ADDR, SEC_LEN, SEC_PARAM
