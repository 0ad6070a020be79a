; uefi_mbr.asm - the boot sector of an image built for UEFI only (uefi.py uefi_disk_image): UEFI firmware reads its
; partition table and ignores this code; a BIOS that boots the image runs it and says why nothing else happens, on
; the screen and COM1, then ends the run through isa-debug-exit and halts.

        bits 16
        cpu 8086                        ; any PC gets to read the message
        org 0x7C00

%include "layout.asm"

PARTITION_TABLE     equ 446             ; uefi.py MBR_TABLE: the code ends before it
STATUS_NEEDS_UEFI   equ 0x08            ; image.py Status

start:
        xor ax, ax
        mov ds, ax
        mov si, message
.char:  lodsb
        test al, al
        jz .end
        mov ah, al
        mov dx, UART_LSR
.wait:  in al, dx                       ; (no UART reads 0xFF: no wait)
        test al, LSR_THR_EMPTY
        jz .wait
        mov dl, COM1 & 0xFF
        mov al, ah
        out dx, al
        mov ah, 0x0E
        xor bx, bx
        int 0x10
        jmp .char
.end:   mov al, STATUS_NEEDS_UEFI
        out DEBUG_EXIT_PORT, al
.halt:  cli
        hlt
        jmp .halt

message:            db "sectorllm: this image boots under UEFI only", 13, 10, 0
code_end:
        times PARTITION_TABLE - ($ - $$) db 0
