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
; A token is kept as the key (65536 - e) << 16 | index, so the order is the keys' ascending order (e <= 65536,
; vocab_size <= 65536); weightless tokens are left out, as they can never be drawn. The cut takes keys from a
; heap until it passes the threshold, so its cost grows with log(vocab) per kept token, not with the vocabulary.
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
        mov ax, cx
        stosd
.next:  inc ecx
        cmp ecx, [hdr(H_VOCAB)]
        jb .weight
        mov esi, [var(sample_buf)]
        mov ecx, edi
        sub ecx, esi
        shr ecx, 2                      ; the keys
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
        jz .coin                        ; both off: the keys in index order, all kept
        mov eax, [var(run_topk)]
        dec eax
        lea edx, [ecx - 1]
        sub edx, eax                    ; the heap's size when top-k is reached: keys - topk if 0 < topk < keys
        jnc .stop
        xor edx, edx
.stop:  mov [var(sample_stop)], edx
        sub edi, 4
        push edi                        ; the last key: taken keys gather from here down, in the order
        mov eax, ecx
        shr eax, 1
.heap:  dec eax                         ; heapify, from the last parent up
        js .take
        push eax
        xchg eax, ebx
        mov eax, [esi + ebx*4]
        call sift_down
        pop eax
        jmp .heap
.take:  dec ecx
        push dword [esi]                ; the smallest key
        mov eax, [esi + ecx*4]
        xor ebx, ebx
        call sift_down                  ; the last key sinks from the root
        pop eax
        mov [esi + ecx*4], eax
        shr eax, 16
        sub eax, 1 << 16                ; -e
        add [var(sample_room)], eax
        jnc .cut                        ; the running sum passed the threshold
        cmp ecx, [var(sample_stop)]
        ja .take
.cut:   mov eax, [var(sample_threshold)]
        sub eax, [var(sample_room)]
        mov [var(sample_total)], eax    ; the kept weight
        pop esi
        std                             ; the walk goes down through the taken keys (random_u32 moves no strings)
.coin:  call random_u32
        shr eax, 8                      ; the coin
        mul dword [var(sample_total)]
        shrd eax, edx, 24
        xchg eax, edx                   ; target < the kept weight
.walk:  lodsd
        mov ebx, eax
        shr eax, 16
        sub eax, 1 << 16                ; -e
        add edx, eax                    ; carries while target >= e
        jc .walk
        movzx eax, bx
        cld
.done:  ret

; ---------------------------------------------------------------------------------------------------------------
; sift_down: place a key in a min-heap of keys, starting at a hole and moving smaller children up.
; Entry:    ESI = the heap, ECX = its size, EBX = the hole's index, EAX = the key
; Clobbers: EBX, EDX, EDI
; ---------------------------------------------------------------------------------------------------------------
sift_down:
.level: lea edx, [ebx*2 + 2]            ; the right child
        cmp edx, ecx
        ja .place                       ; no child
        je .left                        ; the left child only
        mov edi, [esi + edx*4]
        cmp edi, [esi + edx*4 - 4]
        jb .child
.left:  dec edx
        mov edi, [esi + edx*4]
.child: cmp eax, edi
        jb .place
        mov [esi + ebx*4], edi
        mov ebx, edx
        jmp .level
.place: mov [esi + ebx*4], eax
        ret

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

