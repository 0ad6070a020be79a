; sampler.asm - the next token from the logits: greedy, or the fixed-point sampler (engines/fixed.py
; FixedSampler: temperature, min-p, top-k, top-p) with run.c's xorshift64* generator.

FOUR_NINTHS         equ 0x71C71C72      ; 4/9 in 0.32 fixed point, rounded up

; ---------------------------------------------------------------------------------------------------------------
; sample (fixed.py FixedSampler.sample, sample_fixed): greedy (the first index of the largest logit, as
; np.argmax) when inv_temperature is 0; otherwise weights e[i] = exp_lookup((top - logit[i]) * inv_temperature
; >> 16), 0 below min-p, the top-k / top-p cut over the order (e descending, index ascending; index order when
; both are off) and one 24-bit coin from xorshift64*; then falls through into take_keys, which draws the token.
; Each token that weighs something is one key, (65536 - e) << 16 | index (e <= 65536, vocab_size <= 65536), so
; the order is the keys' ascending order; a token that weighs nothing is never drawn and is left out. The keys
; are shell-sorted, which costs the same whatever the cut keeps, rather than picked one vocabulary scan at a time.
; Output:   EAX = token id
; Clobbers: everything but EBP
; ---------------------------------------------------------------------------------------------------------------
sample:
        mov esi, [var(logits_buf)]
        mov ecx, [hdr(H_VOCAB)]
        mov edx, esi
        mov eax, esi
        mov ebx, [esi]
.argmax:
        cmp [edx], ebx
        jle .not_larger
        mov eax, edx
        mov ebx, [edx]
.not_larger:
        add edx, 4
        loop .argmax
        sub eax, esi
        shr eax, 2                      ; the greedy choice; EBX = the top logit
        cmp [var(run_inv_temperature)], ecx
        jne .weights
        ret
.weights:
        mov [var(sample_top)], ebx
        mov ebx, [var(exp_table)]
        mov edi, esi                    ; the keys go over the logits already read
        mov [var(sample_total)], ecx    ; ECX = 0: the index
.weight:
        lodsd
        neg eax
        add eax, [var(sample_top)]
        mul dword [var(run_inv_temperature)]
        shrd eax, edx, 16
        shr edx, 16
        jnz .next                       ; past the table: the scaled distance is 2^32 or more
        push ecx
        call lookup
        pop ecx
        cmp eax, [var(run_minp)]
        jb .next
        add [var(sample_total)], eax
        neg eax
        jz .next
        shl eax, 16
        or eax, ecx
        stosd
.next:  inc ecx
        cmp ecx, [hdr(H_VOCAB)]
        jb .weight
        mov esi, [var(logits_buf)]
        mov ecx, edi                    ; the keys' end
        mov eax, [var(run_topp)]
        mul dword [var(sample_total)]
        shrd eax, edx, 16
        xchg eax, edx                   ; the threshold: total * top-p >> 16, below total when top-p is on
        bt dword [var(run_topp)], 16
        jnc .sort
        dec edx                         ; top-p off: total - 1, which the running sum passes at the last key
        cmp dword [var(run_topk)], byte 0
        je .cut                         ; both off: the keys in index order
.sort:  push edx
        push ebp                        ; EBP holds keys in the sort: no variable is read until the cut
        mov eax, ecx
        sub eax, esi                    ; 4 x the key count, where the gaps start from
.gap:   inc eax                         ; EAX = 4h, h the last gap
        mov edx, FOUR_NINTHS
        mul edx
        xchg eax, edx
        and eax, byte -4                ; the next gap: about (4h + 1) / 9, so 2 and 3 go on to 1, and 1 to 0
        jz .sorted
        mov ebx, ecx
        sub ebx, eax
        push ebx                        ; the end of the keys with a key h after them
        jmp .down
.insert:                                ; from the last of those down, each key into the run h apart after it
        mov edx, [ebx]
        mov ebp, [ebx + eax]
        cmp ebp, edx
        jae .down                       ; in place already
        mov edi, ebx
.shift: mov [edi], ebp
        add edi, eax
        cmp edi, [esp]
        jae .place
        mov ebp, [edi + eax]
        cmp ebp, edx
        jb .shift
.place: mov [edi], edx
.down:  sub ebx, 4
        cmp ebx, esi
        jae .insert
.narrow:
        pop ebx
        jmp .gap
.sorted:
        pop ebp
        pop edx
.cut:   push edx
        push esi
        mov ecx, [var(run_topk)]        ; 0: no top-k
        call take_keys
        pop esi
        pop eax
        sub eax, edx                    ; the kept weight
        push eax
        call random_u32
        shr edx, 8                      ; the coin
        pop eax
        mul edx
        shrd eax, edx, 24
        xchg eax, edx                   ; target < the kept weight
        xor ecx, ecx
        ; fall through into take_keys: the key where the running sum passes the target is the token

; ---------------------------------------------------------------------------------------------------------------
; take_keys: take the sampler's keys in their order until their weights' running sum passes a limit (or ECX are
; taken; ECX = 0 for no count).
; Entry:    ESI = keys, EDX = the limit, ECX
; Output:   EAX = the index in the last key taken, EBX = that key, EDX = limit - running sum (mod 2^32), ESI past it
; Clobbers: ECX
; ---------------------------------------------------------------------------------------------------------------
take_keys:
        lodsd
        mov ebx, eax
        shr eax, 16
        sub eax, 1 << 16                ; -e
        add edx, eax                    ; carries while the limit left is at least e
        jnc .passed
        loop take_keys
.passed:
        movzx eax, bx
        ret

; ---------------------------------------------------------------------------------------------------------------
; random_u32 (sampling.py XorShiftRng.next_u32, run.c's xorshift64*): s ^= s >> 12; s ^= s << 25; s ^= s >> 27
; in 64 bits; then the high dword of the low 64 bits of s * 0x2545F4914F6CDD1D from three 32 x 32 multiplies.
; Output:   EDX = u32; the state [var(run_seed)] advanced
; Clobbers: EAX, EBX, ECX, EDI
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
        ret
.right: mov eax, ebx                    ; s ^= s >> CL, s = EDX:EBX
        mov edi, edx
        shrd eax, edi, cl
        shr edi, cl
        xor ebx, eax
        xor edx, edi
        ret

