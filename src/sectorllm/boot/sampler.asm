; sampler.asm - the next token from the logits: greedy, or the fixed-point sampler (engines/fixed.py
; FixedSampler: temperature, min-p, top-k, top-p) with run.c's xorshift64* generator.

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
        mov cl, 12                      ; s ^= s >> 12
        call .right
        mov eax, ebx                    ; s ^= s << 25
        mov edi, edx
        shld edi, eax, 25
        shl eax, 25
        xor ebx, eax
        xor edx, edi
        mov cl, 27                      ; s ^= s >> 27
        call .right
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
.right: mov eax, ebx                    ; s ^= s >> CL, s = EDX:EBX
        mov edi, edx
        shrd eax, edi, cl
        shr edi, cl
        xor ebx, eax
        xor edx, edi
        ret

