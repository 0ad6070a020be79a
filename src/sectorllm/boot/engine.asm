; engine.asm - sectorllm boot engine: tells a story with a packed model the boot sector loaded above 1 MiB, token
; for token what the fixed-point golden model (engines/fixed.py, docs/arithmetic.md) computes, on COM1 and the screen.
;
; The boot sector (boot.asm) loads the run block, this file and the model, opens A20, checks the memory and jumps
; to the first byte here in real mode. The engine enters 32-bit protected mode at once and stays there: flat 32-bit
; code reaches the model above 1 MiB with no segment tricks and no operand- or address-size prefixes. Only the
; screen needs real mode: `teletype` drops back to it for one INT 10h call per byte and returns.
; Routines that mirror a golden-model function carry its name; docs/arithmetic.md gives every rounding step.
;
; MEMORY MAP (physical addresses)
;   0x00000 - 0x004FF   interrupt vectors, BIOS data area                                      BIOS
;   0x00500 - 0x00503   MEM_TOP (boot.asm): the end of the RAM that starts at 1 MiB; read by the self-test only
;   0x00600 - 0x07BFF   stack: ESP from STACK_TOP down (below 64 KiB, so real mode shares it)
;   0x07C00 - 0x07DFF   boot sector                                                            done with
;   0x07E00 - 0x07FFF   RUN_BLOCK: the run block sector, fields at RB_* (image.py RunBlock)
;   0x08000 - 0x0FFFF   ENGINE_BASE: this program, then its variables (from the page after it): the packed
;                       header's first HDR_USED bytes (HDR), the run settings and the variables (VARS), the
;                       section entries as the forward pass moves them on (SEC)
;   0x80000 - 0xFFFFF   EBDA, VGA memory, option ROMs, BIOS                                    not ours
;   0x100000            MODEL_BASE: the packed model (docs/format.md), [RUN_BLOCK + RB_MODEL_BYTES] long; its
;                       section table (SEC_START) holds addresses once setup_model has run
;   heap                the end of the model rounded up to HEAP_ALIGN; from there N_BUFFERS buffers of
;                       SLOT_BYTES (up to 65536 elements of 16 bytes): x, xb, act, qkv, hb, att, logits, the
;                       sampler's weights and picks, and the two dot-product kernels setup_model writes
;   kv_base             the KV cache: n_layers * n_kv_heads blocks of kv_block bytes (setup_model, store_kv);
;                       its end is image.py memory_end, which the boot sector checks the RAM against
;
; REGISTER CONVENTIONS
;   Protected mode, 32-bit code: CS = CODE32, DS = ES = SS = DATA32, both flat (base 0, 4 GiB), so an address is
;   a physical address. Interrupts stay off (there is no protected-mode IDT); `teletype` turns them on in real mode
;   only. Direction flag clear.
;   Routines take their arguments in registers as their banner says and preserve every register their banner does
;   not list under Clobbers; flags are always clobbered.
;   In the model code (setup_model and what it calls) EBP = VARS + VARS_BIAS: [hdr(H_x)] is a packed header field
;   and [var(x)] a variable, with 8-bit displacements. A routine that needs EBP saves it and uses absolute addresses.
;
; SERIAL PROTOCOL (COM1, 9600 8N1 as boot.asm set it; image.py SerialDecoder parses it)
;   Outside records the stream is log text: ASCII, never STX. A record is STX, one tag letter, then:
;     'T' id (u16) n (u8) b1 .. bn     a token and the n bytes it prints (any values): every forced prompt token
;                                      and generated token; a sampled BOS or EOS, which ends the run, with n = 0
;     'E' status (u8)                  end of run; the status also goes to isa-debug-exit (port 0xF4)
;     'M' name '=' value ETX           a named value (decimal, unsigned 32-bit): the self-test's
;   Screen (BIOS teletype) shows token bytes, "\n" as CR LF; never records.
;   Input: if the runner sent SERIAL_HOLD before the end, end_run waits for the next byte (SERIAL_GO) before port
;   0xF4, so the runner can take a screenshot while the final screen is still there.

        bits 16
        cpu 386

STACK_TOP           equ 0x7C00
MEM_TOP             equ 0x0500          ; u32 from boot.asm: the end of the RAM that starts at 1 MiB
RUN_BLOCK           equ 0x7E00
ENGINE_BASE         equ 0x8000
MODEL_BASE          equ 0x100000
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
RB_PASSES           equ 40              ; u16, forward passes to run, prompt included (image.py: run.c's rule)
RB_PROMPT_COUNT     equ 42              ; u16
RB_STEPS            equ 44              ; u16, run.c's -n (0 = the whole context), for the runner
RB_MEMORY_END       equ 46              ; u32, what boot.asm checks the RAM against (image.py memory_end)
RB_PROMPT_IDS       equ 50              ; u16[RB_PROMPT_COUNT >= 1], BOS first
RUN_SETTINGS        equ RB_STEPS - RB_INV_TEMPERATURE  ; the fields setup_model copies to VARS

COM1                equ 0x3F8
UART_LSR            equ COM1 + 5
LSR_DATA_READY      equ 0x01
LSR_THR_EMPTY       equ 0x20
DEBUG_EXIT_PORT     equ 0xF4

STX                 equ 0x02
ETX                 equ 0x03
SERIAL_HOLD         equ 0x12
SERIAL_GO           equ 0x14

STATUS_OK               equ 0x00        ; image.py Status mirrors these

HDR_USED            equ 112             ; the packed header's bytes the engine reads (docs/format.md), copied to
                                        ; HDR; fields, u32 / i32:
H_DIM               equ 16
H_HIDDEN            equ 20
H_N_LAYERS          equ 24
H_N_HEADS           equ 28
H_N_KV_HEADS        equ 32
H_VOCAB             equ 36
H_SEQ_LEN           equ 40
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
K_EXP_TABLE         equ 19
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

SLOT_BYTES          equ 0x100000        ; a buffer: 16 bytes for each of up to 65536 elements

CODE32              equ gdt.code32 - gdt  ; selectors
DATA32              equ gdt.data32 - gdt
CODE16              equ gdt.code16 - gdt

        org ENGINE_BASE

; ---------------------------------------------------------------------------------------------------------------
; engine_start: the entry point, in real mode: load the GDT and enter protected mode at main.
;           (boot.asm: run block at RUN_BLOCK, the model at MODEL_BASE, A20 open)
; Entry:    CS = DS = ES = SS = 0, SP = STACK_TOP
; ---------------------------------------------------------------------------------------------------------------
engine_start:
        lgdt [gdt]
        push dword main                 ; what teletype.protected returns to, with a pushad frame
        pushad
        jmp teletype.protected
        bits 32

; ---------------------------------------------------------------------------------------------------------------
; main: set the model up and generate (or run the self-test), then end the run with STATUS_OK.
; ---------------------------------------------------------------------------------------------------------------
main:
%ifdef SELFTEST
        call selftest
%else
        call setup_model                ; and on into generate
%endif
        xor eax, eax                    ; STATUS_OK
        jmp end_run

; ---------------------------------------------------------------------------------------------------------------
; end_run: send the end record; if the runner sent SERIAL_HOLD, wait for SERIAL_GO (its screenshot); then leave
; through QEMU's isa-debug-exit (QEMU exits with status (AL << 1) | 1) and halt where that device does not exist.
; Entry:    AL = status (0..127)
; Output:   never returns
; ---------------------------------------------------------------------------------------------------------------
end_run:
        xchg eax, ebx
        mov ax, STX | 'E' << 8
        call serial_pair
        mov al, bl
        call serial_put
        mov dx, UART_LSR                ; no byte waiting (or no UART at all: it reads 0xFF): go
        in al, dx
        test al, LSR_DATA_READY
        jz .exit
        mov dl, COM1 & 0xFF
        in al, dx                       ; SERIAL_HOLD: wait for the next byte, SERIAL_GO
.wait:  mov dl, UART_LSR & 0xFF
        in al, dx
        test al, LSR_DATA_READY
        jz .wait
.exit:  xchg eax, ebx
        out DEBUG_EXIT_PORT, al
.halt:  hlt
        jmp .halt

; ---------------------------------------------------------------------------------------------------------------
; serial_put: send one byte to COM1 once its transmit holding register is empty.
; Entry:    AL = byte
; Clobbers: nothing
; ---------------------------------------------------------------------------------------------------------------
serial_put:
        push edx
        push eax
        mov dx, UART_LSR
.wait:  in al, dx
        test al, LSR_THR_EMPTY
        jz .wait
        pop eax
        mov dl, COM1 & 0xFF
        out dx, al
        pop edx
        ret

; ---------------------------------------------------------------------------------------------------------------
; put_char: one byte to COM1 and the screen (BIOS teletype; "\n" becomes CR LF there).
; Entry:    AL = byte
; Clobbers: nothing
; ---------------------------------------------------------------------------------------------------------------
put_char:
        call serial_put
        cmp al, 10
        jne teletype
        mov al, 13
        call teletype
        mov al, 10
        ; fall through into teletype

; ---------------------------------------------------------------------------------------------------------------
; teletype: AL to the screen through the BIOS (INT 10h AH=0Eh), which needs real mode: through a 16-bit code
; segment back to real mode, the call there with interrupts on, then back to protected mode (engine_start enters
; protected mode through this second half).
; Entry:    AL = byte
; Clobbers: nothing
; ---------------------------------------------------------------------------------------------------------------
teletype:
        pushad
        mov ah, 0x0E
        xor ebx, ebx                    ; page 0, colour 0 (only used in graphics modes)
        jmp CODE16:.code16
        bits 16
.code16:                                ; (SS keeps DATA32's attributes in real mode, so the BIOS's pushes
        mov ebp, cr0                    ; there go through ESP: its high half is 0, so they are SP's)
        dec bp                          ; PE off
        mov cr0, ebp
        jmp 0:.real
.real:  xor bp, bp                      ; (INT 10h needs no DS or ES of ours)
        mov ss, bp
        sti
        int 0x10
.protected:
        cli
        mov ebp, cr0
        inc bp                          ; PE on
        mov cr0, ebp
        jmp dword CODE32:.code32
        bits 32
.code32:
        mov bp, DATA32
        mov ss, bp
        mov ds, bp
        mov es, bp
        popad
        ret

; serial_pair: AL, then AH, to COM1. Clobbers: AL
serial_pair:
        call serial_put
        mov al, ah
        jmp serial_put

; ---------------------------------------------------------------------------------------------------------------
; report_token: a token: its record (id, byte count, bytes) to COM1, its bytes to the screen.
; Entry:    EAX = token id, ESI = address of its bytes, ECX = byte count (0..255)
; Clobbers: nothing
; ---------------------------------------------------------------------------------------------------------------
report_token:
        pushad
        push eax
        mov ax, STX | 'T' << 8
        call serial_pair
        pop eax
        call serial_pair                ; the id
        mov al, cl
        call serial_put
        jecxz .done
.byte:  lodsb
        call put_char
        loop .byte
.done:  popad
        ret

%ifdef SELFTEST
; ---------------------------------------------------------------------------------------------------------------
; decimal: the unsigned decimal digits of EAX, most significant first, each given to the routine at EDI.
; Entry:    EAX = number, EDI = serial_put
; Clobbers: nothing
; ---------------------------------------------------------------------------------------------------------------
decimal:
        pushad
        push byte 10
        pop ecx
        xor edx, edx
        div ecx
        test eax, eax
        jz .digit
        call decimal                    ; the higher digits first
.digit: xchg eax, edx
        add al, '0'
        call edi
        popad
        ret

; ---------------------------------------------------------------------------------------------------------------
; selftest: prove the machinery without a model: report what the engine sees (memory, run block), checksum the
; loaded blob in high memory, and report fixed tokens whose bytes it first copies above 1 MiB.
; Checksum (tests recompute it): the blob as little-endian u32 words, zero-padded to a whole sector;
;   sum = w0 + w1 + ... (mod 2^32), weighted_sum = sum over i of (w0 + .. + wi) (mod 2^32), which sees order.
; Clobbers: EAX, EBX, ECX, EDX, ESI, EDI
; ---------------------------------------------------------------------------------------------------------------
selftest:
        mov eax, [RUN_BLOCK + RB_MODEL_BYTES]
        add eax, MODEL_BASE + SECTOR - 1
        and eax, -SECTOR                ; the boot sector loaded whole sectors
        add eax, HEAP_ALIGN - 1
        and eax, -HEAP_ALIGN
        mov [heap_base], eax
        mov eax, [MEM_TOP]
        shr eax, 10
        mov esi, name_mem_top_kib
        call report_value
        movzx eax, word [RUN_BLOCK + RB_STEPS]
        mov esi, name_steps
        call report_value
        mov ebx, selftest_dwords        ; the 32-bit values, one table entry each
.dword:
        mov esi, [ebx]
        mov eax, [esi]
        mov esi, [ebx + 4]
        call report_value
        add ebx, 8
        cmp ebx, selftest_dwords_end
        jb .dword
        movzx ecx, word [RUN_BLOCK + RB_PROMPT_COUNT]
        mov eax, ecx
        mov esi, name_prompt_count
        call report_value
        xor eax, eax                    ; the sum of the prompt ids shows they all arrived
        mov esi, RUN_BLOCK + RB_PROMPT_IDS
        jecxz .prompt_done
.prompt:
        movzx ebx, word [esi]
        add eax, ebx
        inc esi
        inc esi
        loop .prompt
.prompt_done:
        mov esi, name_prompt_sum
        call report_value

        mov esi, MODEL_BASE
        mov ecx, [RUN_BLOCK + RB_MODEL_BYTES]
        add ecx, SECTOR - 1
        shr ecx, 9
        shl ecx, 7                      ; whole sectors, as dwords
        xor ebx, ebx                    ; running sum
        xor edx, edx                    ; sum of running sums
.checksum:
        lodsd
        add ebx, eax
        add edx, ebx
        loop .checksum
        mov eax, ebx
        mov esi, name_sum
        call report_value
        mov eax, edx
        mov esi, name_weighted_sum
        call report_value

        mov esi, selftest_tokens
        mov edi, [heap_base]
        mov ecx, selftest_tokens_end - selftest_tokens
        rep movsb
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

; report_value: a named number as a record on COM1. Entry: ESI = NUL-terminated name ([a-z0-9_]), EAX = value.
; Clobbers: ESI, EDI
report_value:
        mov edi, serial_put
        push eax
        mov ax, STX | 'M' << 8
        call serial_pair
.name:  lodsb
        test al, al
        jz .value
        call edi
        jmp .name
.value: mov al, '='
        call edi
        pop eax
        call decimal
        mov al, ETX
        jmp edi

selftest_dwords:                        ; address of the value, address of its name
        dd heap_base, name_heap_base
        dd RUN_BLOCK + RB_MODEL_BYTES, name_model_bytes
        dd RUN_BLOCK + RB_INV_TEMPERATURE, name_inv_temperature
        dd RUN_BLOCK + RB_TOPP, name_topp
        dd RUN_BLOCK + RB_TOPK, name_topk
        dd RUN_BLOCK + RB_SEED, name_seed_low
        dd RUN_BLOCK + RB_SEED + 4, name_seed_high
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
; setup_model: copy the packed header to HDR and the run settings after it (EBP = VARS + VARS_BIAS from here on),
; turn the section table's offsets into addresses, place the buffers (a SLOT_BYTES slot each) and the KV cache, and
; write the two dot-product kernels; then falls through into generate.
; Clobbers: everything
; ---------------------------------------------------------------------------------------------------------------
setup_model:
        mov eax, [RUN_BLOCK + RB_MODEL_BYTES]
        add eax, MODEL_BASE + HEAP_ALIGN - 1
        and eax, -HEAP_ALIGN            ; the heap: the model's end, rounded up
        push eax
        mov ebp, VARS + VARS_BIAS
        mov esi, MODEL_BASE
        mov edi, HDR
        push byte HDR_USED / 4
        pop ecx
        rep movsd                       ; EDI = VARS
        mov esi, RUN_BLOCK + RB_INV_TEMPERATURE
        mov cl, RUN_SETTINGS / 4
        rep movsd
        and dword [var(pos)], 0         ; every other variable is set before it is read
        mov esi, SEC_START + 16 + SEC_ADDR
        mov cl, N_KINDS - 1
.entry: add dword [esi], MODEL_BASE     ; the section table's offsets to addresses
        add esi, 16
        loop .entry

        pop eax
        lea edi, [var(buffers)]
        push byte N_BUFFERS
        pop ecx
.place: stosd
        add eax, SLOT_BYTES
        loop .place
        stosd                           ; kv_base: the cache follows the buffers

        mov edi, [var(kernel_buf)]      ; the kernels: for int8 q (the weights), then int16 q (the cache)
        lea ebx, [var(kernel8_end)]
        mov ax, MOVSX_BYTE | 2 << 8     ; AL = movsx's opcode, AH = 2 - log2 of q's element bytes
.kernel:
        mov edx, [hdr(H_DIM)]
        add edx, [hdr(H_HIDDEN)]
        add edx, [hdr(H_SEQ_LEN)]       ; more multiply-adds than any dot product needs
        shl edx, 2
        neg edx                         ; the first one's v displacement
        mov cl, ah
.mac:   mov esi, mac_template
        movsd
        movsd
        movsd
        movsd
        movsb
        dec edi                         ; the next copy overwrites the ret
        mov [edi - MAC_BYTES + MAC_OPCODE], al
        mov [edi - MAC_BYTES + MAC_V_DISP], edx
        mov esi, edx
        sar esi, cl
        mov [edi - MAC_BYTES + MAC_Q_DISP], esi
        add edx, 4
        jnz .mac
        mov [ebx], edi
        add ebx, 4
        inc edi
        add ax, MOVSX_WORD - MOVSX_BYTE - 0x100
        cmp al, MOVSX_WORD
        jbe .kernel

        mov eax, [hdr(H_HEAD_SIZE)]     ; a cache block (kv_block bytes for each layer and kv head):
        lea eax, [eax*2 + 8]            ;   seq_len key rows of kv_stride bytes: head_size int16 keys, their
        mov [var(kv_stride)], eax       ;   divisor Dk, the values' divisor Dv
        mov ecx, [hdr(H_SEQ_LEN)]
        lea edx, [ecx + ecx]
        mov [var(value_row)], edx       ;   at off_vt, the values (int8 range, stored int16) transposed:
        mul ecx                         ;   head_size rows of seq_len
        mov [var(off_vt)], eax
        xchg eax, ecx
        mul dword [hdr(H_HEAD_SIZE)]
        lea eax, [ecx + eax*2]
        mov [var(kv_block)], eax
        mul dword [hdr(H_N_KV_HEADS)]
        mov [var(layer_bytes)], eax
        ; fall through into generate

; ---------------------------------------------------------------------------------------------------------------
; generate: run.c's generation loop (generate.py Generation): the run block's forward passes from the first prompt
; token; prompt tokens are forced and echoed, then sampled tokens reported as they
; come, each with the bytes run.c prints for it: its PRINTED string, less its BOS_SKIP bytes right after BOS.
; A sampled BOS or EOS ends the run: it is reported with no bytes.
; Clobbers: everything but EBP
; ---------------------------------------------------------------------------------------------------------------
generate:
        movzx eax, word [RUN_BLOCK + RB_PROMPT_IDS]  ; the prompt's first token: BOS
        mov [var(token)], eax
.next:  call forward
        inc dword [var(pos)]
        mov esi, [var(pos)]
        cmp [var(run_prompt_count)], si
        jna .sample
        movzx eax, word [RUN_BLOCK + RB_PROMPT_IDS + esi*2]
        jmp .print
.sample:
        call sample
        cmp eax, EOS
        ja .print
        cmp al, BOS
        jb .print
        xor ecx, ecx
        jmp report_token
.print: mov edx, SECTION(K_PRINTED)
        mov ebx, [edx + SEC_ADDR]
        mov esi, [ebx + eax*4]
        mov ecx, [ebx + eax*4 + 4]
        sub ecx, esi
        add esi, ebx
        cmp dword [var(token)], BOS
        jne .report
        mov ebx, [edx + 16 * (K_BOS_SKIP - K_PRINTED) + SEC_ADDR]
        movzx edx, byte [ebx + eax]
        add esi, edx
        sub ecx, edx
.report:
        call report_token
        mov [var(token)], eax
        mov eax, [var(pos)]
        cmp ax, [var(run_passes)]
        jb .next
        ret

; ---------------------------------------------------------------------------------------------------------------
; forward (fixed.py forward_token): one position of the transformer: the logits of [var(token)] at [var(pos)].
; The weight addresses in SEC move on layer by layer as matvec and rmsnorm read them: they start from SEC_START.
; EBX walks the SEC entries in the order the layer reads them: rmsnorm and matvec each step it past theirs.
; Output:   [var(logits_buf)] = vocab_size Q16.16 logits; cache row [var(pos)] written in every block
; Clobbers: everything but EBP
; ---------------------------------------------------------------------------------------------------------------
forward:
        mov esi, SEC_START              ; the weight addresses of layer 0
        mov edi, SEC
        push byte 4 * N_KINDS
        pop ecx
        rep movsd
        mov eax, [var(token)]           ; x[j] = (emb_q[token, j] * emb_s[token]) >> (S_emb - 16)
        mov esi, SECTION(K_TOKEN_EMBEDDING_Q)
        mov cl, [esi + 16 + SEC_PARAM]
        sub cl, 16
        mov ebx, [esi + 16 + SEC_ADDR]
        mov ebx, [ebx + eax*4]
        mul dword [hdr(H_DIM)]
        add eax, [esi + SEC_ADDR]
        xchg eax, esi
        mov edi, [var(x_buf)]
        push ebp
        mov ebp, [hdr(H_DIM)]
.embed: lodsb
        movsx eax, al
        imul ebx
        shrd eax, edx, cl
        stosd
        dec ebp
        jnz .embed
        pop ebp

        mov eax, [var(kv_base)]
        mov [var(layer_kv)], eax
        mov ecx, [hdr(H_N_LAYERS)]
.layer: push ecx
        mov ebx, SECTION(K_RMS_ATT_WEIGHT)
        call norm_and_quantize
        mov eax, [var(qkv_buf)]
        mov ecx, [hdr(H_KV_DIM)]
        add ecx, ecx
        add ecx, [hdr(H_DIM)]
        call matvec_store               ; q, k, v
        push ebx
        call rope                       ; then store_kv, attention, and xb quantized
        pop ebx
        call residual                   ; x += wo xb
        call norm_and_quantize
        mov eax, [var(hb_buf)]
        mov ecx, [hdr(H_HIDDEN)]
        add ecx, ecx
        call matvec_store               ; gate, up
        push ebx
        call swiglu
        pop ebx
        call residual                   ; x += w2 hb
        mov eax, [var(layer_bytes)]
        add [var(layer_kv)], eax
        pop ecx
        loop .layer

        call norm_and_quantize          ; the final norm
        mov eax, [var(logits_buf)]
        mov ecx, [hdr(H_VOCAB)]
        push eax
        push ecx
        call matvec_store               ; the classifier
        pop ecx
        pop eax
        jmp matvec                      ; and its residual

; residual: x += the next dim rows of the EBX matrix times act (the residual connections).
residual:
        mov eax, [var(x_buf)]
        mov ecx, [hdr(H_DIM)]
        jmp matvec

; ---------------------------------------------------------------------------------------------------------------
; norm_and_quantize: xb = rmsnorm(x) with the EBX weights, then act = quantize_act(xb, act_bits_dim);
; quantize_xb: only the second half.
; Clobbers: EAX, ECX, EDX, ESI, EDI; EBX past the weights' entry
; ---------------------------------------------------------------------------------------------------------------
norm_and_quantize:
        call rmsnorm
quantize_xb:
        mov esi, [var(xb_buf)]
        mov ecx, [hdr(H_DIM)]
        mov al, [hdr(H_ACT_BITS_DIM)]
        ; fall through into quantize_act

; ---------------------------------------------------------------------------------------------------------------
; quantize_act (fixed.py quantize_act): act = v >> k, k = max(0, bit_length(OR of |v[j]|) - bits); then sets
; the kernel's length to n.
; Entry:    ESI = v (i32), ECX = n (1..32767), AL = bits
; Output:   [var(act_buf)] = act, [var(act_row)] = n (bytes of an int8 row), [var(act_k)] = k,
;           [var(act_end)] = act + 4n
; Clobbers: EAX, ECX, EDX, ESI, EDI
; ---------------------------------------------------------------------------------------------------------------
quantize_act:
        push ebx
        xchg eax, ebx
        push esi
        push ecx
        mov [var(act_row)], ecx
        xor edi, edi
.magnitude:
        lodsd
        cdq
        xor eax, edx
        sub eax, edx                    ; |v| as unsigned: -2^31 stays 2^31
        or edi, eax
        loop .magnitude
        bsr ecx, edi
        jz .no_shift
        inc ecx                         ; bit_length
        sub cl, bl
        jnc .shift
.no_shift:
        xor ecx, ecx
.shift: mov [var(act_k)], cl
        pop edx
        pop esi
        push edx
        mov edi, [var(act_buf)]
.store: lodsd
        sar eax, cl
        stosd
        dec edx
        jnz .store
        mov [var(act_end)], edi
        pop eax
        pop ebx
        ; fall through into set_dot_length

; ---------------------------------------------------------------------------------------------------------------
; set_dot_length: make the dot-product kernels sum n products: their entries are n multiply-adds before their ends.
; Entry:    EAX = n >= 1
; Clobbers: EAX
; ---------------------------------------------------------------------------------------------------------------
set_dot_length:
        imul eax, eax, -MAC_BYTES
        push eax
        add eax, [var(kernel8_end)]
        mov [var(dot8_entry)], eax
        pop eax
        add eax, [var(kernel16_end)]
        mov [var(dot16_entry)], eax
        ret

; ---------------------------------------------------------------------------------------------------------------
; The dot-product kernels: EDX += wrap32(sum of q[j] * v[j]) over the n q before ESI and the n i32 v before EBX;
; callers set n with set_dot_length, EDX = 0, and call [dot8_entry] for int8 q (weights) or [dot16_entry] for
; int16 q (the cache). setup_model writes both into kernel_buf: dim + hidden_dim + seq_len copies of this
; multiply-add each, with movsx's opcode for a byte or a word and the one k from the end reading q[-k] and v[-k];
; then a ret. One straight line: no loop counter, no index register.
; Clobbers: EAX
; ---------------------------------------------------------------------------------------------------------------
mac_template:
        movsx eax, word [dword esi + 0]
        imul eax, [dword ebx + 0]
        add edx, eax
        ret
MAC_BYTES           equ $ - mac_template - 1
MAC_OPCODE          equ 1               ; where setup_model patches a copy: movsx's opcode byte,
MAC_Q_DISP          equ 3               ; and the two displacements
MAC_V_DISP          equ 10
MOVSX_BYTE          equ 0xBE            ; movsx r32, r/m8 (then r/m16 is 0xBF)
MOVSX_WORD          equ 0xBF

; ---------------------------------------------------------------------------------------------------------------
; matvec (fixed.py matvec, add=True): out[i] += (sum_j q[i, j] * act[j]) * s[i] >> (S - k) for each of the next
; `rows` rows of an int8 matrix; matvec_store first clears out (add=False).
; Entry:    EBX = SEC entry of the matrix's Q section (its S section is the next), EAX = out, ECX = rows;
;           act, [var(act_row)] (bytes from one row to the next), [var(act_k)], [var(act_end)] and the kernel's
;           length from quantize_act
; Output:   out; the Q and S addresses moved past these rows; EBX = the entry after the S section's
; Clobbers: EAX, ECX, EDX, ESI, EDI
; ---------------------------------------------------------------------------------------------------------------
matvec_store:
        pushad
        xchg eax, edi
        xor eax, eax
        rep stosd
        popad
matvec:
        mov [var(rows_left)], ecx
        mov cl, [ebx + 16 + SEC_PARAM]
        sub cl, [var(act_k)]
        mov esi, [ebx + SEC_ADDR]
        add esi, [var(act_row)]         ; the kernel reads back from the end of a row
        mov edi, [ebx + 16 + SEC_ADDR]
        sub edi, eax                    ; s[i] is at [out + 4i + EDI]
        push ebx
        mov ebx, [var(act_end)]
        push ebp
        xchg eax, ebp
.row:   xor edx, edx
        call [dot8_entry]
        mov eax, [ebp + edi]
        imul edx
        shrd eax, edx, cl
        add [ebp], eax
        add ebp, 4
        add esi, [act_row]
        dec dword [rows_left]
        jnz .row
        add edi, ebp
        pop ebp
        sub esi, [var(act_row)]
        pop ebx
        mov [ebx + SEC_ADDR], esi       ; the next layer's rows and scales
        mov [ebx + 16 + SEC_ADDR], edi
        add ebx, 32
        ret

; ---------------------------------------------------------------------------------------------------------------
; rmsnorm (fixed.py rmsnorm): xb[j] = (x[j] * inv >> (31 - h)) * G[j] >> 32 with ss = sum x[j]^2 + rms_eps
; (below 2^62), h such that 2^60 <= ss << 2h < 2^62, inv = (2^61 - 1) // isqrt(ss << 2h) (Newton from 2^31).
; Entry:    EBX = SEC entry of the weights G (moved on by dim weights)
; Output:   EBX = the next entry
; Clobbers: EAX, ECX, EDX, ESI, EDI
; ---------------------------------------------------------------------------------------------------------------
rmsnorm:
        mov esi, [ebx + SEC_ADDR]
        mov eax, [hdr(H_DIM)]
        lea eax, [esi + eax*4]
        mov [ebx + SEC_ADDR], eax
        add ebx, 16
        push ebx
        push esi                        ; G
        mov esi, [var(x_buf)]
        mov ecx, [hdr(H_DIM)]
        mov edi, [hdr(H_RMS_EPS)]       ; ss = EBX:EDI
        xor ebx, ebx
.square:
        lodsd
        imul eax
        add edi, eax
        adc ebx, edx
        loop .square
        mov cl, 31                      ; 31 - h
        test ebx, 3 << 30
        jz .normalize
        mov ebx, (1 << 30) - 1          ; only garbage gets past 2^62
        or edi, -1
.normalize:
        cmp ebx, 1 << 28
        jae .normalized
        shld ebx, edi, 2
        shl edi, 2
        dec ecx
        jmp .normalize
.normalized:
        push ecx
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
        xchg eax, edi                   ; EDI = inv
        pop ecx
        pop ebx
        mov esi, [var(x_buf)]
        sub ebx, esi                    ; G[j] is at [x + 4j + EBX]
        push ebp
        mov ebp, [hdr(H_DIM)]
.scale: lodsd
        imul edi
        shrd eax, edx, cl               ; x / sqrt(ss) in Q2.30
        imul dword [esi + ebx - 4]
        mov [esi - 4 + SLOT_BYTES], edx ; xb, the slot after x's
        dec ebp
        jnz .scale
        pop ebp
        pop ebx
        ret

; rotate_term: EAX = wrap32((v0 * [EDI] + v1 * [EDI + 2]) >> rope_shift), v0 = [ESI], v1 = [ESI + 4], int16 factors,
; 64-bit products and sum. Clobbers: ECX, EDX
rotate_term:
        movsx eax, word [edi + 2]
        imul dword [esi + 4]
        push edx
        push eax
        movsx eax, word [edi]
        imul dword [esi]
        pop ecx
        add eax, ecx
        pop ecx
        adc edx, ecx
        mov cl, [hdr(H_ROPE_SHIFT)]
        shrd eax, edx, cl
        ret

; ---------------------------------------------------------------------------------------------------------------
; rope (fixed.py rope): rotate each (even, odd) pair of the query and key heads in qkv by ROPE[pos], whose rows
; hold (sin, cos, -sin) per pair; then falls through into store_kv, attention and quantize_xb.
; Clobbers: everything but EBP
; ---------------------------------------------------------------------------------------------------------------
rope:
        mov esi, [var(qkv_buf)]
        mov ebx, [hdr(H_N_HEADS)]
        add ebx, [hdr(H_N_KV_HEADS)]
        mov edx, [var(pos)]
        imul edx, [hdr(H_HEAD_SIZE)]
        lea edx, [edx + edx*2]          ; a row: head_size / 2 triples of int16
        add edx, [SECTION(K_ROPE) + SEC_ADDR]
        push edx
.head:  mov edi, [esp]
        mov ecx, [hdr(H_HEAD_SIZE)]
        shr ecx, 1
.pair:  push ecx
        inc edi
        inc edi
        call rotate_term                ; v0 cos - v1 sin
        push eax
        dec edi
        dec edi
        call rotate_term                ; v0 sin + v1 cos
        mov [esi + 4], eax
        pop dword [esi]
        add esi, 8
        add edi, 6
        pop ecx
        loop .pair
        dec ebx
        jnz .head
        pop edx
        ; fall through into store_kv: ESI = the values of kv head 0

; ---------------------------------------------------------------------------------------------------------------
; store_kv (fixed.py forward_token step 4): this position's keys and values of every kv head into the cache
; (setup_model gives the block layout); then falls through into attention.
; Entry:    ESI = the values of kv head 0 in qkv (its keys are 4 kv_dim bytes before them)
; ---------------------------------------------------------------------------------------------------------------
store_kv:
        mov ebx, [var(layer_kv)]
        mov ecx, [hdr(H_N_KV_HEADS)]
.head:  push ecx
        push esi
        mov eax, [hdr(H_KV_DIM)]
        shl eax, 2
        sub esi, eax                    ; this kv head's keys
        mov edi, [var(pos)]
        imul edi, [var(kv_stride)]
        add edi, ebx                    ; key row pos
        push byte 2
        pop edx
        mov al, KEY_SHIFT
        call store_kv_head
        stosd                           ; Dk after the keys
        push edi                        ; Dv's place
        mov esi, [esp + 4]              ; the values
        mov ecx, [var(pos)]
        lea edi, [ebx + ecx*2]
        add edi, [var(off_vt)]          ; their column pos
        mov edx, [var(value_row)]
        mov al, VALUE_SHIFT
        call store_kv_head              ; ESI moves on to the next kv head's values
        pop edi
        stosd                           ; Dv
        pop ecx
        add ebx, [var(kv_block)]
        pop ecx
        loop .head
        jmp attention

; ---------------------------------------------------------------------------------------------------------------
; store_kv_head (fixed.py store_kv): D = M + (M + T - 1) // T with M = min(max |v|, 2^30), T = 2^shift - 1;
; c[i] = sign(v[i]) * min(T, (|v[i]| << shift + (D >> 1)) // D), which is trunc((v << shift +- D >> 1) / D),
; stored as int16 (keys, shift 15, and values, shift 7). M = 0 gives D = 0 and every c = 0.
; Entry:    ESI = v (head_size i32), EDI = c[0], EDX = bytes from c[i] to c[i+1], AL = shift
; Output:   EAX = D, ESI = v + 4 head_size, EDI = c[head_size]
; Clobbers: ECX, EDX
; ---------------------------------------------------------------------------------------------------------------
store_kv_head:
        push ebx
        push edx
        push esi
        push eax
        xor ebx, ebx
        mov ecx, [hdr(H_HEAD_SIZE)]
.max:   lodsd
        cdq
        xor eax, edx
        sub eax, edx
        cmp eax, ebx
        jb .smaller
        xchg eax, ebx
.smaller:
        loop .max
        pop ecx                         ; CL = shift
        mov eax, 1 << 30
        cmp ebx, eax
        jb .in_range
        xchg eax, ebx
.in_range:
        xor eax, eax
        inc eax
        shl eax, cl
        dec eax
        mov [var(kv_top)], eax          ; T
        dec eax
        add eax, ebx
        xor edx, edx
        div dword [var(kv_top)]
        add ebx, eax                    ; D
        pop esi
        push ebx
        mov eax, ebx
        shr eax, 1
        mov [var(kv_half)], eax
        test ebx, ebx
        jnz .divisor
        inc ebx                         ; M = 0: every c is 0 / 1
.divisor:
        mov edx, [hdr(H_HEAD_SIZE)]
        mov [var(kv_count)], edx
.round: lodsd
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
        add edi, [esp + 4]              ; the step
        dec dword [var(kv_count)]
        jnz .round
        pop eax
        pop edx
        pop ebx
        ret

; ---------------------------------------------------------------------------------------------------------------
; attention (fixed.py attention, for each query head h): qa = quantize_act(q_h, act_bits_head) and for t = 0..pos
; score[t] = (qa . key[t]) * Dk[t] >> (31 - k); e[t] = exp_lookup(top - score[t]); recip = (2^48 - 1) // sum e;
; w[t] = ((e[t] * recip) >> 32) * Dv[t] >> 16; xb[h * head_size + i] = wrap32(sum_t w[t] * value[t][i]) >> 7;
; then falls through into quantize_xb.
; ---------------------------------------------------------------------------------------------------------------
attention:
        mov eax, [var(pos)]
        inc eax
        shl eax, 2
        add eax, [var(att_buf)]
        mov [var(att_end)], eax
        xor eax, eax
        mov [var(head)], eax
.head:  mov eax, [var(head)]
        mul dword [hdr(H_HEAD_SIZE)]
        shl eax, 2
        mov [var(head_off)], eax
        add eax, [var(qkv_buf)]
        xchg eax, esi
        mov ecx, [hdr(H_HEAD_SIZE)]
        mov al, [hdr(H_ACT_BITS_HEAD)]
        call quantize_act               ; qa, and the kernel's length head_size
        mov eax, [var(head)]
        cdq
        div dword [hdr(H_KV_MUL)]       ; the kv head
        mul dword [var(kv_block)]
        add eax, [var(layer_kv)]
        mov [var(att_block)], eax
        mov esi, [var(act_row)]
        lea esi, [eax + esi*2]          ; the end of key row 0 (act_row: head_size)
        mov cl, 31
        sub cl, [var(act_k)]
        mov edi, [var(att_buf)]
        mov ebx, [var(act_end)]
        mov dword [var(att_top)], 1 << 31
.score: xor edx, edx
        call [var(dot16_entry)]         ; qa . key[t]
        xchg eax, edx
        imul dword [esi]                ; Dk
        shrd eax, edx, cl
        stosd
        cmp eax, [var(att_top)]
        jle .below
        mov [var(att_top)], eax
.below: add esi, [var(kv_stride)]
        cmp edi, [var(att_end)]
        jb .score

        mov esi, [var(att_buf)]         ; e[t] = exp_lookup(top - score[t])
        mov ebx, [SECTION(K_EXP_TABLE) + SEC_ADDR]
        xor edi, edi                    ; total
.exp:   lodsd
        neg eax
        add eax, [var(att_top)]
        call lookup
        mov [esi - 4], eax
        add edi, eax
        cmp esi, [var(att_end)]
        jb .exp

        xor edx, edx
        dec dx
        or eax, -1
        div edi
        xchg eax, ebx                   ; recip
        mov esi, [var(att_buf)]
        mov edi, [var(kv_stride)]
        add edi, [var(att_block)]       ; 4 bytes past Dv of key row 0
.weight:
        lodsd
        mul ebx
        xchg eax, edx
        mul dword [edi - 4]
        shrd eax, edx, 16
        mov [esi - 4], eax
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
        mov ecx, [hdr(H_HEAD_SIZE)]
.value: xor edx, edx
        call [var(dot16_entry)]
        sar edx, VALUE_SHIFT
        xchg eax, edx
        stosd
        add esi, [var(value_row)]
        loop .value
        inc dword [var(head)]
        mov eax, [var(head)]
        cmp eax, [hdr(H_N_HEADS)]
        jb .head
        jmp quantize_xb

; ---------------------------------------------------------------------------------------------------------------
; lookup (fixed.py exp_lookup, silu_lookup): with i = u >> e, t[i] + ((t[i+1] - t[i]) * (u mod 2^e)) >> e from a
; table in its packed form (docs/format.md: mask 2^e - 1, n - 1, e, 0, then (t[i], t[i+1] - t[i]) pairs).
; Entry:    EAX = u (unsigned), EBX = the table
; Output:   EAX; 0 past the table (i >= n - 1)
; Clobbers: ECX, EDX
; ---------------------------------------------------------------------------------------------------------------
lookup:
        mov cl, [ebx + 8]
        mov edx, eax
        shr edx, cl
        cmp edx, [ebx + 4]
        jnb .past
        and eax, [ebx]
        imul eax, [ebx + edx*8 + 20]
        sar eax, cl
        add eax, [ebx + edx*8 + 16]
        ret
.past:  xor eax, eax
        ret

; ---------------------------------------------------------------------------------------------------------------
; swiglu (fixed.py forward_token step 8): hb[i] = (silu_lookup(hb[i]) * hb[hidden_dim + i]) >> 16, then
; act = quantize_act(hb[0:hidden_dim], act_bits_hidden). The packed SiLU table holds silu(x) - x: x + lookup is
; silu_lookup bit for bit (the x part interpolates exactly), and past the table's end it is x with no test.
; Clobbers: everything but EBP
; ---------------------------------------------------------------------------------------------------------------
swiglu:
        mov esi, [var(hb_buf)]
        mov ebx, [SECTION(K_SILU_TABLE) + SEC_ADDR]
        mov edi, [hdr(H_HIDDEN)]
        shl edi, 2                      ; from a gate to its up
        push ebp
        mov ebp, [hdr(H_HIDDEN)]
.gate:  lodsd                           ; x
        push eax
        sub eax, [HDR + H_SILU_LO]      ; u = x - silu_lo, and the signed compare of x with silu_lo
        jl .zero                        ; below the table: 0
        call lookup                     ; the table holds silu(x) - x: 0 past its end
        add eax, [esp]
        jmp .silu
.zero:  xor eax, eax
.silu:  pop edx
        imul dword [esi + edi - 4]      ; times up
        shrd eax, edx, 16
        mov [esi - 4], eax
        dec ebp
        jnz .gate
        pop ebp
        mov esi, [var(hb_buf)]
        mov ecx, [hdr(H_HIDDEN)]
        mov al, [hdr(H_ACT_BITS_HIDDEN)]
        jmp quantize_act

; ---------------------------------------------------------------------------------------------------------------
; argmax: the first index of the largest value (signed), as np.argmax.
; Entry:    ESI = i32 values, ECX = n >= 1
; Output:   EAX = index, EBX = value, ECX = 0
; Clobbers: EDX
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
; Clobbers: everything but EBP
; ---------------------------------------------------------------------------------------------------------------
sample:
        mov esi, [var(logits_buf)]
        mov ecx, [hdr(H_VOCAB)]
        call argmax                     ; EAX = the greedy choice, EBX = the top logit
        cmp [var(run_inv_temperature)], ecx
        je .done
        mov [var(sample_top)], ebx
        mov ebx, [SECTION(K_EXP_TABLE) + SEC_ADDR]
        mov edi, [var(sample_buf)]
        xor eax, eax
        mov [var(sample_total)], eax
        mov ecx, [hdr(H_VOCAB)]
.weight:
        push ecx
        lodsd
        neg eax
        add eax, [var(sample_top)]
        mul dword [var(run_inv_temperature)]
        shrd eax, edx, 16
        shr edx, 16
        jnz .far
        call lookup
        cmp eax, [var(run_minp)]
        jae .store
.far:   xor eax, eax                    ; past the table (the scaled distance is 2^32 or more), or below min-p
.store: stosd
        add [var(sample_total)], eax
        pop ecx
        loop .weight                    ; EDI = the picks: (index, e) pairs in the order
        mov edx, [hdr(H_VOCAB)]
        mov eax, [var(run_topk)]
        dec eax
        dec edx
        cmp eax, edx
        jb .keep
        xchg eax, edx
.keep:  inc eax                         ; top-k if 0 < topk < vocab_size, else vocab_size
        lea eax, [edi + eax*8]
        mov [var(sample_keep_end)], eax
        mov eax, [var(run_topp)]
        or edx, -1                      ; top-p off: no running sum is above this
        cmp eax, 1 << 16
        jae .threshold
        mul dword [var(sample_total)]
        shrd eax, edx, 16
        xchg eax, edx
.threshold:
        mov [var(sample_threshold)], edx
        mov [var(sample_room)], edx     ; the threshold less the weight kept so far
        inc edx
        or edx, [var(run_topk)]
        mov [var(sample_sorted)], edx   ; 0 when both are off: index order
        mov [var(sample_picks)], edi
.pick:  mov eax, edi
        sub eax, [var(sample_picks)]
        shr eax, 3
        mov esi, [var(sample_buf)]
        cmp dword [var(sample_sorted)], 0
        je .picked
        mov ecx, [hdr(H_VOCAB)]
        call argmax                     ; the largest weight not picked yet
.picked:
        stosd
        or ebx, -1
        xchg ebx, [esi + eax*4]
        xchg eax, ebx
        stosd
        sub [var(sample_room)], eax
        jb .cut                         ; the running sum passed the threshold
        cmp edi, [var(sample_keep_end)]
        jb .pick
.cut:   call random_u32
        shr eax, 8                      ; the coin
        mov ecx, [var(sample_threshold)]
        sub ecx, [var(sample_room)]     ; the kept weight
        mul ecx
        shrd eax, edx, 24
        xchg eax, edx                   ; target < the kept weight
        mov esi, [var(sample_picks)]
.walk:  lodsd
        xchg eax, ebx
        lodsd
        cmp edx, eax
        jb .found
        sub edx, eax
        jmp .walk
.found: xchg eax, ebx
.done:  ret

; ---------------------------------------------------------------------------------------------------------------
; random_u32 (sampling.py XorShiftRng.next_u32, run.c's xorshift64*): s ^= s >> 12; s ^= s << 25; s ^= s >> 27
; in 64 bits; then the high dword of the low 64 bits of s * 0x2545F4914F6CDD1D from three 32 x 32 multiplies.
; Output:   EAX = u32; the state [var(run_seed)] advanced
; Clobbers: EBX, ECX, EDX, EDI
; ---------------------------------------------------------------------------------------------------------------
random_u32:
        mov ebx, [var(run_seed)]        ; s = EDX:EBX
        mov edx, [var(run_seed) + 4]
        mov eax, ebx                    ; s ^= s >> 12
        mov edi, edx
        shrd eax, edi, 12
        shr edi, 12
        xor ebx, eax
        xor edx, edi
        mov eax, ebx                    ; s ^= s << 25
        mov edi, edx
        shld edi, eax, 25
        shl eax, 25
        xor ebx, eax
        xor edx, edi
        mov eax, ebx                    ; s ^= s >> 27
        mov edi, edx
        shrd eax, edi, 27
        shr edi, 27
        xor ebx, eax
        xor edx, edi
        mov [var(run_seed)], ebx
        mov [var(run_seed) + 4], edx
        imul ecx, edx, 0x4F6CDD1D       ; hi * low half of the multiplier
        mov eax, 0x4F6CDD1D
        mul ebx
        add edx, ecx
        imul ecx, ebx, 0x2545F491       ; lo * its high half
        add edx, ecx
        xchg eax, edx
        ret

%endif

gdt:                                    ; lgdt's 6 bytes fill the unused null descriptor
                    dw gdt_end - gdt - 1
                    dd gdt
                    dw 0
.code32:            dw 0xFFFF, 0x0000   ; base 0, limit 0xFFFFF pages = 4 GiB, execute/read, 32-bit
                    db 0x00, 0x9A, 0xCF, 0x00
.data32:            dw 0xFFFF, 0x0000   ; base 0, 4 GiB, read/write, 32-bit stack
                    db 0x00, 0x92, 0xCF, 0x00
.code16:            dw 0xFFFF, 0x0000   ; base 0, 64 KiB, execute/read, 16-bit: the way back to real mode
                    db 0x00, 0x9A, 0x00, 0x00
gdt_end:


engine_end:

        absolute engine_end
                    resb -(engine_end - engine_start) & 0xFFF  ; a page of their own: QEMU retranslates the code
                                                                ; of any page that is written to
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
buffers:                                ; N_BUFFERS slots of SLOT_BYTES (setup_model)
x_buf:              resd 1              ; Q16.16 residual stream (dim)
xb_buf:             resd 1              ; rmsnorm and attention output (dim); rmsnorm counts on it following x
act_buf:            resd 1              ; matmul input (dim, hidden_dim or head_size)
qkv_buf:            resd 1              ; q, k, v (dim + 2 kv_dim)
hb_buf:             resd 1              ; gate, then up (2 hidden_dim)
att_buf:            resd 1              ; scores, then e, then weights (pos + 1)
logits_buf:         resd 1              ; (vocab_size)
sample_buf:         resd 1              ; the sampler's e (vocab_size), then its picks
kernel_buf:         resd 1              ; the two dot-product kernels, written by setup_model
N_BUFFERS           equ ($ - buffers) / 4
kv_base:            resd 1              ; the first cache block, after the buffers
layer_kv:           resd 1              ; this layer's first cache block
kv_block:           resd 1              ; bytes of a cache block
off_vt:             resd 1              ; the values in a block
kv_stride:          resd 1              ; bytes of a key row
value_row:          resd 1              ; bytes of a transposed value row
layer_bytes:        resd 1              ; n_kv_heads blocks
token:              resd 1              ; the token at pos
pos:                resd 1
act_row:            resd 1              ; quantize_act's n (an int8 row's bytes), k and the end of act
act_k:              resd 1
act_end:            resd 1
kernel8_end:        resd 1              ; the dot-product kernels' rets: int8 q (weights), int16 q (the cache)
kernel16_end:       resd 1
dot8_entry:         resd 1              ; their entries for the current length (set_dot_length)
dot16_entry:        resd 1
SCRATCH:                                ; each routine's own variables, overlaid
        absolute SCRATCH
rows_left:          resd 1              ; matvec
        absolute SCRATCH
kv_top:             resd 1              ; store_kv
kv_half:            resd 1
kv_count:           resd 1
        absolute SCRATCH
head:               resd 1              ; attention
head_off:           resd 1              ; 4 * head * head_size
att_top:            resd 1              ; the largest score
att_end:            resd 1
att_block:          resd 1
        absolute SCRATCH
sample_room:        resd 1              ; sample
sample_total:       resd 1
sample_top:         resd 1
sample_keep_end:    resd 1
sample_threshold:   resd 1
sample_sorted:      resd 1
sample_picks:       resd 1
VARS_END:
SEC:                resb 16 * N_KINDS   ; per section kind: SEC_ADDR, SEC_LEN, SEC_PARAM
