; memory.asm - the loader, right after the boot sector: opens A20 and sizes the memory in real mode, enters
; protected mode, fills the IDT, refuses a machine too small for the run with both figures, and loads the model
; above 1 MiB through the boot sector's READ_SECTORS (its address comes from boot.asm's map through image.py).

; ---------------------------------------------------------------------------------------------------------------
; engine_start: entered from the boot sector: DS = SS = 0, ES = 0, SP = STACK_TOP, the run block at RUN_BLOCK.
; Output:   protected mode at load_model, EAX = the end of the RAM from 1 MiB
; ---------------------------------------------------------------------------------------------------------------
engine_start:
        mov ax, 0x2401                  ; A20 on: the BIOS knows its machine's way; port 0x92 for BIOSes that
        int 0x15                        ; do not
        in al, SYSTEM_CONTROL_A
        or al, 0x02
        and al, 0xFE                    ; bit 0 would reset the machine
        out SYSTEM_CONTROL_A, al
        push 0xFFFF
        pop fs
        mov [MEM_TOP], al               ; with A20 closed, 1 MiB higher is the same byte
        not al
        mov [fs:MEM_TOP + 0x10], al
        mov si, msg_a20_closed
        cmp [MEM_TOP], al
        je FAIL
        call memory_size
%ifdef SELFTEST
        mov [MEM_TOP], eax              ; for the self-test's report
%endif
        lgdt [gdt]
        push dword load_model           ; what real_call.protected returns to, with a pushad frame: EAX = the
        pushad                          ; memory's end
        jmp real_call.protected

; ---------------------------------------------------------------------------------------------------------------
; memory_size: the end of the RAM that starts at 1 MiB: the INT 15h E820h range that starts there, else E801h's
; answer, else AH=88h's.
; Output:   EAX = the first address past it
; Clobbers: EBX, ECX, EDX, DI
; ---------------------------------------------------------------------------------------------------------------
memory_size:
        xor ebx, ebx                    ; E820h's continuation
        mov di, E820_ENTRY
.e820:  mov eax, 0xE820
        mov edx, 0x534D4150             ; 'SMAP'
        mov ecx, 20
        int 0x15
        jc .e801                        ; no E820h, or past its last range
        cmp word [di + 2], MODEL_BASE >> 16  ; a range from 1 MiB (bits 16..31 of its base, which is whole KiB)
        jne .next
        cmp byte [di + 16], 1           ; usable RAM
        jne .next
        mov eax, [di]
        add eax, [di + 8]
        ret
.next:  test ebx, ebx
        jnz .e820
.e801:  mov ax, 0xE801                  ; KiB from 1 to 16 MiB and 64 KiB blocks above, in AX/BX, CX/DX or both
        xor bx, bx
        xor cx, cx                      ; (a BIOS that answers in CX answers in DX too)
        int 0x15
        jnc .answer
        mov ah, 0x88                    ; KiB above 1 MiB
        int 0x15
        jnc .answer
        xor ax, ax
.answer:
        jcxz .ax_bx
        xchg ax, cx
        mov bx, dx
.ax_bx: movzx eax, ax
        shl eax, 10
        add eax, MODEL_BASE
        bt eax, 24                      ; below 16 MiB: a hole; what lies above it is not contiguous
        jnc .done
        movzx ebx, bx
        shl ebx, 16
        add eax, ebx
.done:  ret
        bits 32

msg_a20_closed:     db STATUS_A20_CLOSED, "A20 closed", 13, 10, 0
msg_out_of_memory:  db "out of memory: needs ", 0
msg_found:          db " KiB, found ", 0
msg_kib:            db " KiB", 10, 0

; ---------------------------------------------------------------------------------------------------------------
; load_model (entered in protected mode, EAX = the memory's end): refuse the run if the RAM ends before
; RB_MEMORY_END; load the model ([RUN_BLOCK + RB_MODEL_BYTES] long from LBA [RUN_BLOCK + RB_MODEL_LBA]) to
; MODEL_BASE, each piece read to DISK_BUFFER in real mode and copied up here; then on to main32.
; ---------------------------------------------------------------------------------------------------------------
load_model:
        mov ebx, [RUN_BLOCK + RB_MEMORY_END]
        cmp ebx, eax
        jbe .fits
        xchg eax, ebp
        mov esi, msg_prefix             ; "sectorllm: out of memory: needs N KiB, found M KiB"
        call say
        mov esi, msg_out_of_memory
        call say
        xchg eax, ebx
        call say_kib
        call say                        ; msg_found
        xchg eax, ebp
        call say_kib
        call say                        ; msg_kib
        mov al, STATUS_OUT_OF_MEMORY
        jmp end_run

.fits:  mov edx, [RUN_BLOCK + RB_MODEL_BYTES]
        dec edx
        shr edx, SECTOR_SHIFT
        inc edx                         ; sectors left to load
        mov edi, MODEL_BASE
        mov eax, [RUN_BLOCK + RB_MODEL_LBA]
.chunk: push byte LOAD_CHUNK_SECTORS
        pop ecx
        cmp edx, ecx
        jae .read
        mov ecx, edx
.read:  mov ebx, DISK_BUFFER >> 4
        mov si, READ_SECTORS
        call real_call
        mov esi, DISK_BUFFER
        push ecx
        shl ecx, SECTOR_SHIFT - 2
        rep movsd
        pop ecx
        add eax, ecx
        sub edx, ecx
        jnz .chunk
        ; fall through into main32 (engine.asm)

