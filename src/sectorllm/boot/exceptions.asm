; exceptions.asm - a CPU exception in protected mode is said, not a silent reset: the IDT's gates lead here, and the
; handler prints "sectorllm: CPU exception N at 0xEIP" to COM1 and the screen and ends the run.

; ---------------------------------------------------------------------------------------------------------------
; exception_sled: vector N's gate enters at the Nth push, so the pushes run from -(N + 1) down to -N_VECTORS; the
; deepest one names the vector. No EIP or error code comes near those values.
; ---------------------------------------------------------------------------------------------------------------
exception_sled:
%assign vector 0
%rep N_VECTORS
        push byte -1 - vector
%assign vector vector + 1
%endrep
exception:
.marker:
        pop eax
        cmp dword [esp], byte -N_VECTORS
        jae .marker
        not eax                         ; the vector: 8 and 10..13 push an error code
        cmp al, 8
        jb .eip
        cmp al, 9
        je .eip
        pop edx                         ; the error code
.eip:   pop edx
        push edx
        push eax
        mov esi, msg_prefix
        call say
        call say                        ; msg_exception
        pop eax
        call say_decimal
        call say                        ; msg_at
        pop eax
        mov cl, 16
        call print_number
        call say                        ; msg_line_end
        mov al, STATUS_CPU_EXCEPTION
        jmp end_run

msg_prefix:         db "sectorllm: ", 0
msg_exception:      db "CPU exception ", 0
msg_at:             db " at 0x", 0
msg_line_end:       db 10, 0
