; uefi_stub.asm - a stand-in engine for the UEFI loader's tests, with engine.asm's contract at main32 (flat 32-bit
; segments, run block at 0x7E00, this code at 0x8000, the model at 0x100000, RAM up to memory_end, interrupts off)
; and its screen_hook. It proves what the loader set up and reports on COM1 as hexadecimal text:
;   "stub handshake=XX sum=XXXXXXXX weighted=XXXXXXXX top=XXXXXXXX" - the byte waiting in the UART at main32 (the
;   runner's handshake; "--" if none), the model's checksums (engine.asm selftest's, over whole sectors) and the
;   dword it wrote and read back just below memory_end
; and shows "sectorllm stub on ConOut\n" through screen_hook (which shows "\n" as CR LF), then ends through port 0xF4
; with status 0; with -DFAULT it raises an invalid-opcode exception (6) at `fault` instead.

        bits 32
        cpu 386
        org 0x8000

%include "../src/sectorllm/boot/layout.asm"

engine_start:                           ; the BIOS entry point: unused here
        hlt
main32:
        mov esi, msg_handshake
        call serial_text
        mov dx, COM1 + 5
        in al, dx
        test al, 1                      ; data ready
        jz .none
        mov dx, COM1
        in al, dx
        shl eax, 24
        mov ecx, 2
        call serial_hex.digits
        jmp .sum_text
.none:  mov al, '-'
        call serial_put
        call serial_put
.sum_text:
        mov esi, msg_sum
        call serial_text
        mov esi, MODEL_BASE
        mov ecx, [RUN_BLOCK + RB_MODEL_BYTES]
        add ecx, 511
        shr ecx, 9
        shl ecx, 7
        xor ebx, ebx
        xor edx, edx
.sum:   lodsd
        add ebx, eax
        add edx, ebx
        loop .sum
        mov eax, ebx
        call serial_hex
        mov esi, msg_weighted
        call serial_text
        mov eax, edx
        call serial_hex
        mov esi, msg_top
        call serial_text
        mov edi, [RUN_BLOCK + RB_MEMORY_END]
        mov dword [edi - 4], 0x5EC7011A
        mov eax, [edi - 4]
        call serial_hex
        mov al, 10
        call serial_put

        mov esi, msg_screen
.show:  lodsb
        test al, al
        jz .end
        mov ebx, eax                    ; the hook must keep every register
        call [screen_hook]
        cmp eax, ebx
        jne .broken
        jmp .show
.broken:
        mov al, 1
        out 0xF4, al
.end:
%ifdef FAULT
fault:  ud2                             ; after the screen's ConOut calls: the loader's IDT is back in place
%endif
        xor eax, eax
        out 0xF4, al
.halt:  hlt
        jmp .halt

serial_text:                            ; NUL-terminated ESI to COM1
        lodsb
        test al, al
        jz .done
        call serial_put
        jmp serial_text
.done:  ret

serial_hex:                             ; EAX as 8 hex digits to COM1 (.digits: the top CL digits)
        mov ecx, 8
.digits:
.digit: rol eax, 4
        push eax
        and al, 15
        add al, '0'
        cmp al, '9'
        jbe .put
        add al, 'A' - '9' - 1
.put:   call serial_put
        pop eax
        loop .digit
        ret

serial_put:
        push edx
        push eax
        mov dx, COM1 + 5
.wait:  in al, dx
        test al, 0x20
        jz .wait
        pop eax
        mov dx, COM1
        out dx, al
        pop edx
        ret

msg_handshake:  db "stub handshake=", 0
msg_sum:        db " sum=", 0
msg_weighted:   db " weighted=", 0
msg_top:        db " top=", 0
msg_screen:     db "sectorllm stub on ConOut", 10, 0
screen_hook:    dd 0
