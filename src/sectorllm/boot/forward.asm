; forward.asm - the model: setup_model, the generation loop and the forward pass of one token, each step what
; engines/fixed.py computes (docs/arithmetic.md), with the dot-product kernels setup_model writes.

; ---------------------------------------------------------------------------------------------------------------
; setup_model: copy the packed header to HDR and the run block's settings and memory layout after it (EBP = VARS +
; VARS_BIAS from here on), turn the section table's offsets into addresses and write the two dot-product kernels;
; then falls through into generate.
; Clobbers: everything
; ---------------------------------------------------------------------------------------------------------------
setup_model:
        mov ebp, VARS + VARS_BIAS
        mov esi, MODEL_BASE
        mov edi, HDR
        push byte HDR_USED / 4
        pop ecx
        rep movsd                       ; EDI = VARS
        mov esi, RUN_BLOCK + RB_SETTINGS
        mov cl, (RB_SETTINGS_END - RB_SETTINGS) / 4
        rep movsd                       ; (pos too: every other variable is set before it is read)
        mov esi, SEC_START + 16 + SEC_ADDR
        mov cl, N_KINDS - 1
.entry: add dword [esi], MODEL_BASE     ; the section table's offsets to addresses
        add esi, 16
        loop .entry

        mov edi, [var(kernel_buf)]      ; the kernels: for int8 q (the weights), then int16 q (the cache)
        lea ebx, [var(kernel8_end)]
        mov ax, MOVSX_BYTE | 2 << 8     ; AL = movsx's opcode, AH = 2 - log2 of q's element bytes
.kernel:
        mov edx, [RUN_BLOCK + RB_KERNEL_DISP]  ; the first one's v displacement
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
        mov [esi - 4 + XB_DISTANCE], edx  ; xb (image.py places it there)
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
        call rotate_term                ; v0 sin + v1 cos
        push eax
        inc edi
        inc edi
        call rotate_term                ; v0 cos - v1 sin
        mov [esi], eax
        pop dword [esi + 4]
        add esi, 8
        add edi, 4
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
        mov ebx, [var(exp_table)]
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

