; selftest.asm - the engine without a model (-DSELFTEST): reports what the loader handed over and a checksum of
; the blob it loaded above 1 MiB, then fixed tokens, so tests can check the way in and the serial protocol.

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
; Clobbers: nothing
report_value:
        pushad
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
        push byte 10
        pop ecx
        call print_number
        mov al, ETX
        call edi
        popad
        ret

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
        db 7, 0x00, 0xFF, STX, ETX, SERIAL_RECORDS, 0x80, 0x0D
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
