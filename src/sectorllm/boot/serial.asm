; serial.asm - what the engine says, on COM1 and the screen: the handshake that chooses plain text or records
; (engine.asm SERIAL PROTOCOL), the screen through the BIOS, token reports and the end of the run.

; ---------------------------------------------------------------------------------------------------------------
; serial_handshake: records if the runner left SERIAL_RECORDS in the UART; else the mode stays as it was (plain
; text from the start), so a second call changes nothing.
; Output:   [serial_mode] = 0 (text) or 1 (records)
; Clobbers: EAX, EDX
; ---------------------------------------------------------------------------------------------------------------
serial_handshake:
        mov dx, UART_LSR
        in al, dx                       ; (no UART at all reads 0xFF: not a handshake byte)
        test al, LSR_DATA_READY
        jz .done
        mov dl, COM1 & 0xFF
        in al, dx
        cmp al, SERIAL_RECORDS
        jne .done
        inc byte [serial_mode]
.done:  ret

; ---------------------------------------------------------------------------------------------------------------
; end_run: with records, the end record, then wait for the runner's next byte (it may take a screenshot first);
; then leave through QEMU's isa-debug-exit (QEMU exits with status (AL << 1) | 1) and halt where that device does
; not exist.
; Entry:    AL = status (0..127)
; Output:   never returns
; ---------------------------------------------------------------------------------------------------------------
end_run:
        xchg eax, ebx
        cmp byte [serial_mode], 0
        je .exit
        mov ax, STX | 'E' << 8
        call serial_pair
        mov al, bl
        call serial_put
        mov dx, UART_LSR
.wait:  in al, dx
        test al, LSR_DATA_READY
        jz .wait
.exit:  xchg eax, ebx
        out DEBUG_EXIT_PORT, al
.halt:  hlt
        jmp .halt

; ---------------------------------------------------------------------------------------------------------------
; serial_put: send one byte to COM1 once its transmit holding register is empty (no UART reads 0xFF: no wait).
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

; serial_pair: AL, then AH, to COM1. Clobbers: AL
serial_pair:
        call serial_put
        mov al, ah
        jmp serial_put

; ---------------------------------------------------------------------------------------------------------------
; show: a byte of the story on the screen and COM1: in plain text "\n" goes out as CR LF on both; inside a record
; COM1 gets the byte as it is.
; Entry:    AL = byte
; Clobbers: nothing
; ---------------------------------------------------------------------------------------------------------------
show:
        cmp byte [serial_mode], 0
        jne .raw
        cmp al, 10
        jne .raw
        push eax
        mov al, 13
        call serial_put
        pop eax
.raw:   call serial_put
        jmp [screen_hook]

; ---------------------------------------------------------------------------------------------------------------
; teletype: AL to the screen through the BIOS (INT 10h AH=0Eh; "\n" as CR LF), in real mode through real_call
; past its pushad.
; Clobbers: nothing
; ---------------------------------------------------------------------------------------------------------------
teletype:
        pushad
        mov si, .bios
        jmp real_call.pushed
        bits 16
.bios:  cmp al, 10
        jne .byte
        mov al, 13
        call .byte
        mov al, 10
.byte:  mov ah, 0x0E
        xor bx, bx                      ; page 0, colour 0 (only used in graphics modes)
        int 0x10
        ret
        bits 32

; ---------------------------------------------------------------------------------------------------------------
; real_call: call a real-mode routine with the caller's registers: through a 16-bit code segment back to real mode
; with real mode's interrupt vectors and DS = ES = SS = 0, interrupts on; then back to protected mode and the IDT
; (memory.asm enters protected mode through this second half).
; Entry:    ESI = the routine (below 64 KiB); the other registers are its arguments, but EBP
; Clobbers: nothing
; ---------------------------------------------------------------------------------------------------------------
real_call:
        pushad
.pushed:
        jmp CODE16:.code16
        bits 16
.code16:                                ; (SS keeps DATA32's attributes in real mode, so the BIOS's pushes
        lidt [gdt.ivt]           ; there go through ESP: its high half is 0, so they are SP's)
        mov ebp, cr0
        dec bp                          ; PE off
        mov cr0, ebp
        jmp 0:.real
.real:  push byte 0                     ; segment values the BIOS can use (ES is each call's own)
        pop ss
        push ss
        pop ds
        sti
        call si
.protected:
        cli
        lidt [RUN_BLOCK + RB_IDT_DESCRIPTOR]
        mov ebp, cr0
        inc bp                          ; PE on
        mov cr0, ebp
        jmp dword CODE32:.code32
        bits 32
.code32:
        push byte DATA32
        pop ss
        push ss
        pop ds
        push ss
        pop es
        popad
        ret

; ---------------------------------------------------------------------------------------------------------------
; say: the NUL-terminated string at ESI, shown (plain text, or log text between records).
; Output:   ESI = the byte after the NUL
; Clobbers: EAX
; ---------------------------------------------------------------------------------------------------------------
say_next:
        call show
say:    lodsb
        test al, al
        jnz say_next
        ret

; ---------------------------------------------------------------------------------------------------------------
; say_kib: EAX / 1024 in decimal; say_decimal: EAX in decimal; both shown (ECX = 10, EDI = show on return);
; print_number: the digits of EAX in base ECX (2..16), most significant first, each given to the routine at EDI.
; Clobbers: EAX, EDX
; ---------------------------------------------------------------------------------------------------------------
say_kib:
        shr eax, 10
say_decimal:
        push byte 10
        pop ecx
        mov edi, show
print_number:
        xor edx, edx
        div ecx
        push edx
        test eax, eax
        jz .digit
        call print_number               ; the higher digits first
.digit: pop eax
        add al, '0'
        cmp al, '9'
        jbe .put
        add al, 'A' - '9' - 1
.put:   jmp edi

; ---------------------------------------------------------------------------------------------------------------
; report_token: a token: its record (id, byte count) when the runner asked for records, and its bytes shown.
; Entry:    EAX = token id, ESI = address of its bytes, ECX = byte count (0..255)
; Clobbers: nothing
; ---------------------------------------------------------------------------------------------------------------
report_token:
        pushad
        cmp byte [serial_mode], 0
        je .bytes
        push eax
        mov ax, STX | 'T' << 8
        call serial_pair
        pop eax
        call serial_pair                ; the id
        mov al, cl
        call serial_put
.bytes: jecxz .done
.byte:  lodsb
        call show
        loop .byte
.done:  popad
        ret
