; boot.asm - sectorllm boot sector: checks for a 386, finds how to read the boot drive, loads the run block and the
; engine, and jumps to the engine's loader, which calls back into read_sectors, print, fail and stop here.
;
; One sector for every medium: bytes 3..61 hold a floppy's BIOS parameter block on a floppy image, bytes 446..509
; the partition table on a disk image (image.py writes both; zeros where a medium has none), the code lives in
; between. PAYLOAD_LBA (-D, from image.py) is where the run block sits; the engine follows it (docs: image.py).
; Reads use the INT 13h extensions on a hard disk whose BIOS has them (AH=41h), else CHS with the geometry of
; AH=08h (floppies, and BIOSes from before EDD), one track at a time, retried after a drive reset.
;
; Memory map and run block fields: layout.asm. On failure it prints "sectorllm: " and a one-line reason to COM1
; and the screen and ends the run through QEMU's isa-debug-exit, then halts for machines without that device.

%include "layout.asm"

        bits 16
        cpu 8086                        ; until the CPU check has passed
        org BOOT_SECTOR

BPB_END             equ 62              ; a FAT boot sector's jump and BIOS parameter block end here
PARTITION_TABLE     equ 446
READ_TRIES          equ 3               ; floppy drives fail the first read while their motor spins up

start:  jmp short entry
        nop
        times BPB_END - ($ - $$) db 0
entry:  xor ax, ax
        mov ds, ax
        mov ss, ax
        mov sp, STACK_TOP
        cld                             ; (some BIOSes enter at 07C0:0000: CS is never used)
        mov [drive], dl
        test dl, dl
        jns .chs                        ; a floppy: CHS (floppy drivers refuse the packet calls)
        mov ah, 0x41
        mov bx, 0x55AA
        int 0x13
        jc .chs
        cmp bx, 0xAA55
        jne .chs
        test cl, 1                      ; the packet calls (AH=42h..44h)
        jz .chs
        mov byte [sectors_per_track], 0 ; 0: LBA reads
        jmp short .com1
.chs:   mov ah, 0x08
        mov dl, [drive]
        xor di, di                      ; ES:DI = 0 guards against BIOSes that use it
        int 0x13                        ; (it points ES:DI at a floppy's table: read_sectors ends with ES = 0)
        jc .com1                        ; no answer: keep a 1.44 MB floppy's geometry
        and cl, 0x3F
        mov [sectors_per_track], cl
        inc dh
        mov [heads], dh

.com1:  mov ax, 0x00E3                  ; COM1 at 9600 baud, 8N1 (INT 14h AH=00h); no FIFOs: the UART keeps the
        cwd                             ; handshake byte a runner sent before we started
        int 0x14
        mov si, msg_needs_386
        pushf
        mov ax, 0x7000                  ; FLAGS bits 12..14 read back as 0x7 on a 386, as 0xF on an 8086 (bits
        push ax                         ; 12..15 always set) and as 0 on a 286 in real mode
        popf
        pushf
        pop ax
        popf
        cmp ah, 0x70                    ; (bits 8..11, TF IF DF OF, were cleared with them)
        jne fail
        cpu 386

.load:  mov eax, PAYLOAD_LBA            ; the run block and the engine: a whole engine's room, whatever it holds
        mov cx, 1 + MAX_ENGINE_SECTORS
        mov bx, RUN_BLOCK >> 4
        call read_sectors
        mov si, msg_bad_image
        cmp dword [RUN_BLOCK + RB_MAGIC], RUN_MAGIC
        jne fail
        jmp ENGINE_BASE                 ; relative, as every jump here: right with CS = 0 or 07C0h

; ---------------------------------------------------------------------------------------------------------------
; read_sectors: read CX sectors from LBA EAX into memory from BX:0000 on, in pieces the drive takes (LBA: all at
; once; CHS: up to the end of a track), each tried READ_TRIES times with a drive reset in between.
; Entry:    EAX = first LBA, CX = sector count (1..127; the buffer must not cross a 64 KiB boundary: floppy DMA),
;           BX = destination segment
; Output:   the sectors in memory; on a read that keeps failing, the boot ends (disk error)
; Clobbers: nothing
; ---------------------------------------------------------------------------------------------------------------
read_sectors:
        pushad
.piece: mov di, READ_TRIES
.try:   pushad
        mov bp, sp
        mov [piece], cx
        movzx esi, byte [sectors_per_track]
        test si, si
        jnz .chs
        push dword 0                    ; the disk address packet: LBA (high, low), buffer, count, size
        push eax
        push bx
        push si                         ; offset 0
        push cx
        push byte 16
        mov si, sp
        mov ah, 0x42
        jmp short .call
.chs:   xor edx, edx
        div esi                         ; EAX = track, DX = its sector - 1
        sub si, dx                      ; sectors to the end of the track
        cmp cx, si
        jbe .fits
        mov cx, si
.fits:  mov [piece], cx
        push cx
        inc dx
        mov cl, dl                      ; sector number (bits 0..5)
        xor dx, dx
        movzx esi, byte [heads]
        div esi                         ; EAX = cylinder, DX = head
        mov dh, dl
        mov ch, al                      ; cylinder bits 0..7, and 8..9 in CL's bits 6..7
        shl ah, 6
        or cl, ah
        mov es, bx
        xor bx, bx
        pop ax
        mov ah, 0x02
.call:  mov dl, [drive]
        int 0x13
        mov sp, bp
        jnc .done
        xor ax, ax                      ; reset the drive (DL still holds it) and try again
        int 0x13
        popad
        dec di
        jnz .try
        mov si, msg_disk_error
        jmp short fail
.done:  popad
        movzx edx, word [piece]
        add eax, edx
        sub cx, dx
        shl dx, SECTOR_SHIFT - 4        ; sectors -> paragraphs
        add bx, dx
        test cx, cx
        jnz .piece
        push ds
        pop es
        popad
        ret

        cpu 8086                        ; what follows also serves the CPU check

; ---------------------------------------------------------------------------------------------------------------
; fail: "sectorllm: " and the message at SI to COM1 and the screen, then stop with its status.
; Entry:    SI = message: its status byte, then NUL-terminated text
; ---------------------------------------------------------------------------------------------------------------
fail:   lodsb
        push ax
        push si
        mov si, msg_prefix
        call print
        pop si
        call print
        pop ax
        ; fall through into stop

; stop: end the run with status AL through isa-debug-exit, and halt where that device does not exist.
stop:   out DEBUG_EXIT_PORT, al
.halt:  cli
        hlt
        jmp short .halt

; ---------------------------------------------------------------------------------------------------------------
; print: the NUL-terminated string at SI to COM1 and the screen; put_char: the byte in AL. Lines end in CR LF.
; Clobbers: AX, BX, DX; print also SI
; ---------------------------------------------------------------------------------------------------------------
print:  lodsb
        test al, al
        jz put_char.done
        call put_char
        jmp short print

put_char:
        push ax
        mov dx, UART_LSR
.wait:  in al, dx                       ; wait for an empty transmit register (no UART reads 0xFF: no wait)
        test al, LSR_THR_EMPTY
        jz .wait
        mov dl, COM1 & 0xFF
        pop ax
        out dx, al
        mov ah, 0x0E
        xor bx, bx
        int 0x10
.done:  ret

msg_prefix:         db "sectorllm: ", 0
msg_needs_386:      db STATUS_NEEDS_386, "needs a 386", 13, 10, 0
msg_bad_image:      db STATUS_BAD_RUN_BLOCK, "bad image", 13, 10, 0
msg_disk_error:     db STATUS_DISK_ERROR, "disk error", 13, 10, 0

drive:              db 0                ; the BIOS drive we booted from
sectors_per_track:  db 18               ; 0 for LBA reads; else the CHS geometry (a 1.44 MB floppy's by default)
heads:              db 2
piece:              dw 0                ; sectors in the current read

code_end:
%if code_end - $$ > PARTITION_TABLE
%error "the boot sector's code runs into the partition table"
%endif
        times PARTITION_TABLE - ($ - $$) db 0
        times 510 - ($ - $$) db 0       ; the partition table (image.py)
        dw 0xAA55
