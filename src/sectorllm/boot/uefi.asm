; uefi.asm - sectorllm UEFI loader (\EFI\BOOT\BOOTX64.EFI): loads the run block, the engine and the model from the
; EFI System Partition and runs the unchanged 32-bit engine (engine.asm) in a compatibility-mode code segment, with
; the firmware's console still up for the screen.
;
; Why this way: the engine needs fixed linear addresses (RUN_BLOCK, ENGINE_BASE, MODEL_BASE up to memory_end) and
; the screen needs ConOut, a boot service. So the loader stays in long mode with boot services up: it takes one
; block of RAM from the UEFI memory map (AllocatePages) and its own page tables show that block to the engine at
; linear 0 .. memory_end, wherever the firmware put it; everything else in the low 4 GiB stays identity-mapped.
; The engine runs with those page tables (CR3 = TABLES) and interrupts off. For each byte it shows, it calls
; screen_hook's target, hook32 here: back to 64-bit mode and the firmware's CR3 and stack, ConOut->OutputString,
; and back again. The code that switches CR3 (the resident part) is copied next to the page tables, at an address
; both page tables map to itself.
;
; The payload is the file \SECTORLLM.BIN on the partition we booted from (uefi.py writes it): the run block sector,
; the engine's sectors, then the model, as the legacy image holds them from LBA 1 on.
; COM1 is the engine's (port I/O, as under a BIOS): the loader disconnects the firmware's terminal from it, so the
; firmware neither writes console text into the serial protocol nor reads the runner's bytes; other serial ports
; keep their consoles. Secure Boot must be off: the file is not signed.
;
; PE32+ image, written by nasm -f bin with the header laid out below: one read-write-execute section at RVA = file
; offset, alignment 512 (below a page, so the firmware applies no page protections to it); the code is position-
; independent (RIP-relative), so the image has an empty relocation directory and loads at any address.
;
; MEMORY (physical; W = memory_end rounded up to 2 MiB)
;   BLOCK           the engine's linear 0 .. W (2 MiB-aligned, found by AllocatePages below 4 GiB): RUN_BLOCK at
;                   BLOCK + 0x7E00, the engine at BLOCK + ENGINE_BASE, the model at BLOCK + MODEL_BASE; the engine's
;                   stack from BLOCK + STACK_TOP down
;   TABLES          BLOCK + W: PML4, one PDPT, four page directories (0 .. 4 GiB in 2 MiB pages; linear 0 .. W to
;                   BLOCK, the rest to itself), then the resident page: hook32 and friends, their variables, the
;                   engine's IDT, the GDT
;
; REGISTER CONVENTIONS
;   Loader (64-bit, Microsoft x64 calling convention for firmware calls): RBX = boot services, R12 = ConOut,
;   R13 = BLOCK, R14 = TABLES, R15 = the file (once open). Routines preserve RBX, RBP, RSI, RDI, R12 - R15
;   unless their banner says otherwise.
;   Engine (compatibility mode): engine.asm's contract at main32: CS = CODE32, DS = ES = SS = DATA32 (flat, 32-bit),
;   ESP = STACK_TOP, interrupts off; screen_hook (a dword in the engine) holds hook32's address.
;
; EXCEPTIONS: while the engine runs, its own IDT (64-bit gates, as long mode needs) leads to exception64, which
; goes back to the firmware's state and prints "sectorllm: CPU exception N at 0xEIP" like engine.asm's handler,
; then ends the run with STATUS_CPU_EXCEPTION. The firmware's IDT is back in place around every firmware call.
;
; SERIAL AND EXIT: the loader prints "sectorllm: UEFI loader" once it has COM1, then waits up to HANDSHAKE_MS for
; a byte in the UART: the runner's handshake (engine.asm SERIAL PROTOCOL), which it sends on seeing that line, as it
; cannot send it before the boot (the firmware's serial driver resets the UART). Like boot.asm, a failure prints
; "sectorllm: " and a reason to COM1 and ConOut and ends the run through QEMU's isa-debug-exit (port 0xF4) with
; image.py's Status, then halts; the engine ends its runs the same way.

        bits 64
        default rel

%ifndef ENGINE_MAIN32
%error "ENGINE_MAIN32 (the engine's main32 address) must be defined: uefi.py assembles this file"
%endif
%ifndef ENGINE_SCREEN_HOOK
%error "ENGINE_SCREEN_HOOK (the engine's screen_hook address) must be defined: uefi.py assembles this file"
%endif

%include "layout.asm"                   ; the engine's memory map, run block fields, statuses, COM1

HANDSHAKE_MS        equ 1000            ; how long the runner has to answer msg_loader
LARGE_PAGE          equ 1 << 21
PAGE                equ 4096
PTE_PRESENT_WRITE   equ 0x03
PTE_LARGE           equ 0x80
TABLE_PAGES         equ 6               ; PML4, PDPT, 4 page directories
RESIDENT_OFFSET     equ TABLE_PAGES * PAGE
TABLES_BYTES        equ RESIDENT_OFFSET + PAGE
N_VECTORS           equ 20              ; the engine's IDT: exceptions 0..19
ERROR_CODE_VECTORS  equ 1 << 8 | 1 << 10 | 1 << 11 | 1 << 12 | 1 << 13 | 1 << 14 | 1 << 17  ; push an error code
RESIDENT_IDT        equ (resident_end - resident + 15) & -16  ; offsets in the resident page: the IDT, then
RESIDENT_GDT        equ RESIDENT_IDT + 16 * N_VECTORS           ; the GDT up to the page's end
GDT_ROOM            equ PAGE - RESIDENT_GDT  ; the firmware's descriptors and our two

; UEFI (spec 2.x): table offsets in bytes
ST_CONOUT           equ 64              ; EFI_SYSTEM_TABLE
ST_BOOT_SERVICES    equ 96
BS_ALLOCATE_PAGES   equ 40              ; EFI_BOOT_SERVICES
BS_HANDLE_PROTOCOL  equ 152
BS_STALL            equ 248
BS_SET_WATCHDOG     equ 256
BS_DISCONNECT       equ 272
BS_LOCATE_HANDLES   equ 312
OUT_STRING          equ 8               ; EFI_SIMPLE_TEXT_OUTPUT_PROTOCOL
OUT_CLEAR_SCREEN    equ 48
LI_DEVICE_HANDLE    equ 24              ; EFI_LOADED_IMAGE_PROTOCOL
FS_OPEN_VOLUME      equ 8               ; EFI_SIMPLE_FILE_SYSTEM_PROTOCOL
FILE_OPEN           equ 8               ; EFI_FILE_PROTOCOL
FILE_READ           equ 32
ALLOCATE_MAX_ADDRESS    equ 1           ; EFI_ALLOCATE_TYPE
LOADER_CODE             equ 1           ; EFI_MEMORY_TYPE: the pages hold code both page tables run
BY_PROTOCOL             equ 2           ; EFI_LOCATE_SEARCH_TYPE
FILE_MODE_READ          equ 1
DP_ACPI             equ 0x02            ; device path node: type ACPI, subtype ACPI_DP, HID, UID
DP_ACPI_HID         equ 0x01
DP_END              equ 0x7F
COM1_HID            equ 0x050141D0      ; EISA "PNP0501", a 16550 UART; UID 0 is COM1

IMAGE_BASE          equ 0x10000000      ; preferred only: the code is position-independent
FILE_ALIGN          equ 512

; ---------------------------------------------------------------------------------------------------------------
; PE32+ header (Microsoft PE/COFF specification): a DOS stub header pointing at the PE signature, the COFF file
; header, the optional header with 16 data directories (all empty), one section.
; ---------------------------------------------------------------------------------------------------------------
        org 0
header:
        db "MZ"
        times 0x3C - ($ - header) db 0
        dd pe_signature                 ; e_lfanew
pe_signature:
        db "PE", 0, 0
        dw 0x8664                       ; Machine: x86-64
        dw 1                            ; NumberOfSections
        dd 0, 0, 0                      ; TimeDateStamp, PointerToSymbolTable, NumberOfSymbols
        dw optional_header_end - optional_header
        dw 0x0022                       ; EXECUTABLE_IMAGE | LARGE_ADDRESS_AWARE (relocations not stripped)
optional_header:
        dw 0x020B                       ; PE32+
        db 0, 0                         ; linker version
        dd image_end - code_start       ; SizeOfCode
        dd 0, 0                         ; SizeOfInitializedData, SizeOfUninitializedData
        dd efi_main                     ; AddressOfEntryPoint (an RVA: org 0 makes labels RVAs)
        dd code_start                   ; BaseOfCode
        dq IMAGE_BASE
        dd FILE_ALIGN, FILE_ALIGN       ; SectionAlignment, FileAlignment
        dw 0, 0, 0, 0, 0, 0             ; OS, image, subsystem versions
        dd 0                            ; Win32VersionValue
        dd image_end                    ; SizeOfImage
        dd code_start                   ; SizeOfHeaders
        dd 0                            ; CheckSum
        dw 10                           ; Subsystem: EFI application
        dw 0                            ; DllCharacteristics
        dq 0x10000, 0x10000, 0, 0       ; stack and heap reserve and commit (the firmware's stack is used)
        dd 0                            ; LoaderFlags
        dd 16                           ; NumberOfRvaAndSizes
        times 16 dq 0                   ; data directories: no exports, imports, resources or relocations
optional_header_end:
        db ".text", 0, 0, 0
        dd image_end - code_start       ; VirtualSize
        dd code_start                   ; VirtualAddress
        dd image_end - code_start       ; SizeOfRawData
        dd code_start                   ; PointerToRawData
        dd 0, 0                         ; relocations, line numbers
        dw 0, 0
        dd 0xE0000060                   ; code, initialized data, execute, read, write
        times FILE_ALIGN - ($ - header) db 0

code_start:

; ---------------------------------------------------------------------------------------------------------------
; efi_main: the image's entry point: take COM1 and the screen, load the payload, set up the engine's memory and
; run it. Never returns: the engine (or fail) ends the run.
; Entry:    RCX = image handle, RDX = system table
; ---------------------------------------------------------------------------------------------------------------
efi_main:
        sub rsp, 40                     ; shadow space, and RSP 16-aligned for the calls
        mov [image_handle], rcx
        mov rbx, [rdx + ST_BOOT_SERVICES]
        mov r12, [rdx + ST_CONOUT]
        xor ecx, ecx                    ; no watchdog: the boot manager's 5 minutes would reset a long story
        xor edx, edx
        xor r8d, r8d
        xor r9d, r9d
        call [rbx + BS_SET_WATCHDOG]
        call release_com1
        mov rcx, r12
        call [r12 + OUT_CLEAR_SCREEN]
        lea rsi, [msg_loader]           ; the runner's cue: COM1 is ours now, send the handshake byte
        call say
        mov ebp, HANDSHAKE_MS
.handshake:                             ; until a byte waits in the UART for the engine's serial_handshake (a
        mov dx, UART_LSR                ; byte the runner sent before the firmware reset the UART is gone)
        in al, dx
        test al, LSR_DATA_READY
        jnz .load
        mov ecx, 1000                   ; 1 ms
        call [rbx + BS_STALL]
        dec ebp
        jnz .handshake
.load:  call open_payload

        lea rdx, [run_block]            ; the run block sector: what to allocate, how much to read
        mov ecx, SECTOR
        call read_file
        lea rsi, [msg_bad_run_block]
        mov al, STATUS_BAD_RUN_BLOCK
        cmp dword [run_block + RB_MAGIC], RUN_MAGIC
        jne fail
        cmp word [run_block + RB_VERSION], RUN_VERSION
        jne fail
        movzx ecx, word [run_block + RB_ENGINE_SECTORS]
        dec ecx                         ; 1..MAX_ENGINE_SECTORS
        cmp ecx, MAX_ENGINE_SECTORS - 1
        ja fail
        mov edx, [run_block + RB_MODEL_BYTES]
        add rdx, MODEL_BASE
        mov r9d, [run_block + RB_MEMORY_END]
        cmp rdx, r9
        ja fail                         ; the model would run past memory_end

        add r9, LARGE_PAGE - 1          ; W
        and r9, -LARGE_PAGE
        mov [window], r9
        lea rdx, [r9 + LARGE_PAGE + TABLES_BYTES]   ; bytes: W, alignment slack, TABLES
        mov [needed], rdx
        shr rdx, 12
        mov r8, rdx                     ; pages
        mov eax, 0xFFFFFFFF
        mov [block], rax                ; in: the highest address (hook32 runs in 32-bit code); out: the base
        lea r9, [block]
        mov ecx, ALLOCATE_MAX_ADDRESS
        mov edx, LOADER_CODE
        call [rbx + BS_ALLOCATE_PAGES]
        test rax, rax
        jnz out_of_memory
        mov r13, [block]
        add r13, LARGE_PAGE - 1
        and r13, -LARGE_PAGE            ; BLOCK
        mov r14, r13
        add r14, [window]               ; TABLES
        mov rdi, r13                    ; zeros, as a freshly powered machine's RAM: the same run every time
        mov rcx, [window]
        shr rcx, 3
        xor eax, eax
        rep stosq

        lea rsi, [run_block]
        lea rdi, [r13 + RUN_BLOCK]
        mov ecx, SECTOR
        rep movsb
        movzx ecx, word [run_block + RB_ENGINE_SECTORS]
        shl ecx, 9
        lea rdx, [r13 + ENGINE_BASE]
        call read_file
        mov ecx, [run_block + RB_MODEL_BYTES]
        lea rdx, [r13 + MODEL_BASE]
        call read_file

        call build_tables
        jmp run_engine

; ---------------------------------------------------------------------------------------------------------------
; release_com1: disconnect the drivers on COM1's serial port (the firmware's terminal: console text and polling
; for keys), so COM1 carries only what the loader and the engine send and the runner's bytes stay in the UART.
; Serial ports are found by protocol; COM1 is the one whose device path has the ACPI node PNP0501 with UID 0.
; Clobbers: RAX, RCX, RDX, R8 - R11, RSI, RDI
; ---------------------------------------------------------------------------------------------------------------
release_com1:
        push rbp
        sub rsp, 48
        mov ecx, BY_PROTOCOL
        lea rdx, [serial_io_guid]
        xor r8d, r8d
        lea r9, [handle_count]
        lea rax, [handles]
        mov [rsp + 32], rax
        call [rbx + BS_LOCATE_HANDLES]
        test rax, rax
        jnz .done                       ; no serial port at all
        mov rsi, [handles]
        mov rbp, [handle_count]
.handle:
        mov rcx, [rsi]
        lea rdx, [device_path_guid]
        call protocol
        jnz .next
        mov rdi, rcx
.node:  cmp byte [rdi], DP_END
        je .next
        cmp word [rdi], DP_ACPI | DP_ACPI_HID << 8
        jne .skip
        cmp dword [rdi + 4], COM1_HID
        jne .skip
        cmp dword [rdi + 8], 0
        jne .skip
        mov rcx, [rsi]
        xor edx, edx                    ; every driver, every child
        xor r8d, r8d
        call [rbx + BS_DISCONNECT]
        jmp .next
.skip:  movzx eax, word [rdi + 2]       ; node length
        add rdi, rax
        jmp .node
.next:  add rsi, 8
        dec rbp
        jnz .handle
.done:  add rsp, 48
        pop rbp
        ret

; ---------------------------------------------------------------------------------------------------------------
; open_payload: open \SECTORLLM.BIN on the partition this image was loaded from; fails the boot if it cannot.
; Output:   R15 = the file (EFI_FILE_PROTOCOL)
; Clobbers: RAX, RCX, RDX, R8 - R11
; ---------------------------------------------------------------------------------------------------------------
open_payload:
        sub rsp, 56
        mov rcx, [image_handle]
        lea rdx, [loaded_image_guid]
        call protocol
        jnz disk_error
        mov rcx, [rcx + LI_DEVICE_HANDLE]
        lea rdx, [file_system_guid]
        call protocol
        jnz disk_error
        lea rdx, [rsp + 48]             ; the volume's root directory
        call [rcx + FS_OPEN_VOLUME]
        test rax, rax
        jnz disk_error
        mov rcx, [rsp + 48]
        lea rdx, [rsp + 40]
        lea r8, [payload_name]
        mov r9d, FILE_MODE_READ
        mov qword [rsp + 32], 0         ; attributes
        call [rcx + FILE_OPEN]
        test rax, rax
        jnz disk_error
        mov r15, [rsp + 40]
        add rsp, 56
        ret

; protocol: the interface of a protocol on a handle (HandleProtocol).
; Entry:    RCX = handle, RDX = the protocol's GUID
; Output:   ZF set and RCX = the interface if the handle has it; ZF clear if not
; Clobbers: RAX, RDX, R8 - R11
protocol:
        sub rsp, 40
        lea r8, [rsp + 32]
        call [rbx + BS_HANDLE_PROTOCOL]
        mov rcx, [rsp + 32]
        add rsp, 40
        test rax, rax
        ret

; ---------------------------------------------------------------------------------------------------------------
; read_file: the payload's next ECX bytes to RDX; fails the boot if the read fails or comes up short.
; Clobbers: RAX, RCX, RDX, R8 - R11
; ---------------------------------------------------------------------------------------------------------------
read_file:
        push rcx
        push rcx                        ; in: the bytes wanted; out: the bytes read
        sub rsp, 40
        mov r8, rdx
        lea rdx, [rsp + 40]
        mov rcx, r15
        call [r15 + FILE_READ]
        add rsp, 40
        pop rcx
        pop rdx
        test rax, rax
        jnz disk_error
        cmp rcx, rdx
        jne disk_error
        ret

; ---------------------------------------------------------------------------------------------------------------
; build_tables: the engine's page tables at TABLES, the resident code and the GDT after them, screen_hook.
; The GDT is the firmware's (its selectors stay valid for the firmware's code and interrupts) with flat 32-bit
; code and data descriptors appended for the engine.
; Clobbers: RAX, RCX, RDX, RSI, RDI, R8 - R11
; ---------------------------------------------------------------------------------------------------------------
build_tables:
        mov rdi, r14
        xor eax, eax
        mov ecx, TABLES_BYTES / 8
        rep stosq
        lea rax, [r14 + PAGE + PTE_PRESENT_WRITE]
        mov [r14], rax                  ; PML4[0]: the PDPT
        mov ecx, 4
        lea rdi, [r14 + PAGE]
.pdpt:  add rax, PAGE                   ; PDPT[0..3]: the page directories
        stosq
        loop .pdpt
        lea rdi, [r14 + 2 * PAGE]       ; 2048 entries of 2 MiB: 0 .. 4 GiB
        mov eax, PTE_LARGE | PTE_PRESENT_WRITE
        lea rdx, [r13 + PTE_LARGE + PTE_PRESENT_WRITE]
        mov ecx, 2048
.pd:    cmp rax, [window]
        mov r8, rdx                     ; linear 0 .. W: BLOCK
        jb .entry
        mov r8, rax                     ; the rest: itself
.entry: mov [rdi], r8
        add rdi, 8
        add rax, LARGE_PAGE
        add rdx, LARGE_PAGE
        loop .pd

        lea rsi, [resident]
        lea rdi, [r14 + RESIDENT_OFFSET]
        mov ecx, resident_end - resident
        rep movsb
        lea rdx, [r14 + RESIDENT_OFFSET]        ; RDX: the resident copy, fields at RDX + (label - resident)
        mov [rdx + r_our_cr3 - resident], r14
        mov rax, cr3
        mov [rdx + r_fw_cr3 - resident], rax
        mov [rdx + r_conout - resident], r12
        mov [rdx + r_code64 - resident], cs
        mov [rdx + r_fw_data - resident], ss
        sgdt [rdx + r_gdtr - resident]
        movzx ecx, word [rdx + r_gdtr - resident]
        inc ecx                         ; the firmware GDT's bytes
        lea rsi, [msg_bad_gdt]
        mov al, STATUS_BAD_RUN_BLOCK
        cmp ecx, GDT_ROOM - 16
        ja fail
        mov rsi, [rdx + r_gdtr + 2 - resident]
        lea rdi, [rdx + RESIDENT_GDT]
        mov [rdx + r_gdtr + 2 - resident], rdi
        rep movsb
        add rdi, 7
        and rdi, -8
        mov rax, rdi
        sub rax, [rdx + r_gdtr + 2 - resident]
        mov [rdx + r_code32 - resident], ax
        mov rcx, 0x00CF9B000000FFFF     ; flat 32-bit code: base 0, 4 GiB, present, DPL 0, execute/read
        mov [rdi], rcx
        add eax, 8
        mov [rdx + r_data32 - resident], ax
        mov rcx, 0x00CF93000000FFFF     ; flat 32-bit data: base 0, 4 GiB, present, DPL 0, read/write
        mov [rdi + 8], rcx
        add eax, 7
        mov [rdx + r_gdtr - resident], ax   ; limit
        lea rax, [rdx + hook32 - resident]
        mov [r13 + ENGINE_SCREEN_HOOK], eax

        sidt [rdx + r_fw_idtr - resident]
        lea rdi, [rdx + RESIDENT_IDT]
        mov word [rdx + r_idtr - resident], 16 * N_VECTORS - 1
        mov [rdx + r_idtr + 2 - resident], rdi
        lea rax, [engine_exception]
        mov [rdx + r_report - resident], rax
        lea rax, [rdx + exception_gates - resident]
        mov ecx, N_VECTORS
.gate:  mov [rdi], ax                   ; 64-bit interrupt gates: offset 0..15, selector, present DPL 0 type 14,
        mov [rdi + 2], cs               ; offset 16..31 (the copy is below 4 GiB: offset 32..63 stays 0)
        mov [rdi + 4], eax
        mov word [rdi + 4], 0x8E00
        add rax, 5                      ; the next `call exception64`
        add rdi, 16
        loop .gate
        ret

; ---------------------------------------------------------------------------------------------------------------
; out_of_memory, engine_exception, disk_error, fail: print "sectorllm: " and the reason to COM1 and ConOut, end the
; run with a status through isa-debug-exit, halt.
; Entry:    engine_exception (from the resident exception64, the firmware's state back): EAX = vector, ESI = EIP
;           fail: RSI = NUL-terminated message, AL = status; fail.reason: the same, the prefix already shown
; ---------------------------------------------------------------------------------------------------------------
out_of_memory:
        lea rsi, [msg_prefix]
        call say
        lea rsi, [msg_out_of_memory]
        call say
        mov rax, [needed]
        shr rax, 10
        mov ecx, 10
        call say_number
        lea rsi, [msg_kib]
        mov al, STATUS_OUT_OF_MEMORY
        jmp fail.reason
engine_exception:
        push rsi
        push rax
        lea rsi, [msg_prefix]
        call say
        lea rsi, [msg_exception]
        call say
        pop rax
        mov ecx, 10
        call say_number
        lea rsi, [msg_at]
        call say
        pop rax
        mov ecx, 16
        call say_number
        lea rsi, [msg_line_end]
        mov al, STATUS_CPU_EXCEPTION
        jmp fail.reason
disk_error:
        lea rsi, [msg_disk_error]
        mov al, STATUS_DISK_ERROR
fail:
        push rax
        push rsi
        lea rsi, [msg_prefix]
        call say
        pop rsi
        pop rax
.reason:
        push rax
        call say
        pop rax
        out DEBUG_EXIT_PORT, al
.halt:  cli
        hlt
        jmp .halt

; say_number: the digits of RAX in base ECX (2..16) to COM1 and ConOut, as say. Clobbers: as say, RDI
say_number:
        lea rdi, [digits_end]
.digit: xor edx, edx
        div rcx
        add dl, '0'
        cmp dl, '9'
        jbe .put
        add dl, 'A' - '9' - 1
.put:   dec rdi
        mov [rdi], dl
        test rax, rax
        jnz .digit
        mov rsi, rdi
        ; fall through into say

; say: a NUL-terminated ASCII string at RSI to COM1 and ConOut ("\n" as CR LF on both). Clobbers: RAX, RCX, RDX,
; R8 - R11, RSI
say:
        lodsb
        test al, al
        jz .done
        cmp al, 10
        jne .char
        mov al, 13
        call say_char
        mov al, 10
.char:  call say_char
        jmp say
.done:  ret

say_char:
        mov ecx, eax
        mov dx, UART_LSR
.wait:  in al, dx
        test al, LSR_THR_EMPTY
        jz .wait
        mov dl, COM1 & 0xFF
        mov eax, ecx
        out dx, al
        movzx eax, al
        mov [char16], eax               ; the character and a NUL
        push rbp
        mov rbp, rsp
        and rsp, -16                    ; fail may come from any depth
        sub rsp, 32
        mov rcx, r12
        lea rdx, [char16]
        call [r12 + OUT_STRING]
        mov rsp, rbp
        pop rbp
        ret

; ---------------------------------------------------------------------------------------------------------------
; run_engine: load the GDT with the engine's descriptors and enter the resident copy's start_engine.
; ---------------------------------------------------------------------------------------------------------------
run_engine:
        lea rdx, [r14 + RESIDENT_OFFSET]
        lgdt [rdx + r_gdtr - resident]
        add rdx, start_engine - resident
        jmp rdx

; ---------------------------------------------------------------------------------------------------------------
; The resident part, copied to TABLES + RESIDENT_OFFSET, which both the firmware's page tables and the engine's
; map to itself (TABLES lies past linear W and below 4 GiB): every CR3 switch happens here.
; Position-independent: 64-bit code addresses its variables RIP-relative, 32-bit code has no need to.
; ---------------------------------------------------------------------------------------------------------------
        align 16                        ; the copy starts a page: alignments below hold in it too
resident:

; start_engine: enter main32 in compatibility mode. Entry: RSP = the firmware's stack, to be used for ConOut
start_engine:
        cli                             ; no firmware interrupt handler while the engine's CR3 is loaded
        and rsp, -16
        mov [r_fw_rsp], rsp
        mov eax, ENGINE_MAIN32
        mov ecx, STACK_TOP
        ; fall through into to_engine

; to_engine: switch to the engine's page tables and data segments, then far return into compatibility mode.
; Entry: RAX = address to continue at (32-bit code), ECX = ESP there
to_engine:
        mov rdx, [r_our_cr3]
        mov cr3, rdx
        lidt [r_idtr]
        mov dx, [r_data32]
        mov ss, dx
        mov ds, dx
        mov es, dx
        mov esp, ecx
        push qword [r_code32]
        push rax
        o64 retf

; hook32: the engine's screen_hook: show AL on ConOut ("\n" as CR LF). Entry: AL = byte. Clobbers: nothing (flags
; excepted)
        bits 32
hook32:
        pushad
        call .here                      ; where this copy runs, for the far return into 64-bit mode
.here:  pop edx
        add edx, hook64 - .here
        push dword [edx + r_code64 - hook64]
        push edx
        retf
        bits 64
hook64:
        mov [r_engine_esp], esp
        call to_firmware
        movzx eax, al
        cmp al, 10
        jne .char
        mov eax, 13 | 10 << 16          ; "\n" as CR LF, as the BIOS teletype shows it
.char:  mov [r_char], eax               ; one or two CHAR16s; r_char + 4 stays NUL
        sub rsp, 32
        mov rcx, [r_conout]
        lea rdx, [r_char]
        call [rcx + OUT_STRING]
        cli                             ; (the firmware turns interrupts on as it lowers its TPL)
        lea rax, [hook_return]
        mov ecx, [r_engine_esp]
        jmp to_engine
        bits 32
hook_return:
        popad
        ret
        bits 64

; to_firmware: back to the firmware's page tables, stack (RSP = its stack as start_engine left it), data segments
; and IDT. Clobbers: RCX, RDX
to_firmware:
        pop rcx
        mov rdx, [r_fw_cr3]
        mov cr3, rdx
        mov rsp, [r_fw_rsp]
        mov dx, [r_fw_data]
        mov ss, dx
        mov ds, dx
        mov es, dx
        lidt [r_fw_idtr]
        jmp rcx

; exception_gates, exception64: vector N's gate enters at the Nth call, whose return address names the vector;
; then the error code if the vector has one, and the faulting RIP, as the CPU pushed them. To engine_exception.
exception_gates:
%rep N_VECTORS
        call exception64
%endrep
exception64:
        pop rax
        lea rdx, [exception_gates + 5]
        sub eax, edx
        mov cl, 5
        div cl
        movzx eax, al                   ; the vector
        mov edx, ERROR_CODE_VECTORS
        bt edx, eax
        jnc .eip
        pop rdx
.eip:   pop rsi
        call to_firmware
        mov r12, [r_conout]             ; (compatibility mode leaves R8 - R15 undefined)
        jmp [r_report]

        align 8
r_our_cr3:          dq 0
r_fw_cr3:           dq 0
r_fw_rsp:           dq 0
r_conout:           dq 0
r_code64:           dq 0                ; selectors: the firmware's code segment, then ours
r_code32:           dq 0
r_data32:           dw 0
r_fw_data:          dw 0
r_engine_esp:       dd 0
r_char:             dd 0
                    dw 0
r_report:           dq 0                ; engine_exception in the loader
r_gdtr:             dw 0                ; limit, then base
                    dq 0
                    dw 0
r_idtr:             dw 0                ; the engine's IDT, in the copy after resident_end
                    dq 0
                    dw 0
r_fw_idtr:          dw 0
                    dq 0
resident_end:                           ; the copy's IDT and GDT follow (RESIDENT_IDT, RESIDENT_GDT)

; ---------------------------------------------------------------------------------------------------------------
; constant data
; ---------------------------------------------------------------------------------------------------------------
code_end:
%macro guid 11                          ; a GUID as the spec writes it: u32, u16, u16, 8 bytes
        dd %1
        dw %2, %3
        db %4, %5, %6, %7, %8, %9, %10, %11
%endmacro
loaded_image_guid:  guid 0x5B1B31A1, 0x9562, 0x11D2, 0x8E, 0x3F, 0x00, 0xA0, 0xC9, 0x69, 0x72, 0x3B
file_system_guid:   guid 0x964E5B22, 0x6459, 0x11D2, 0x8E, 0x39, 0x00, 0xA0, 0xC9, 0x69, 0x72, 0x3B
serial_io_guid:     guid 0xBB25CF6F, 0xF1D4, 0x11D2, 0x9A, 0x0C, 0x00, 0x90, 0x27, 0x3F, 0xC1, 0xFD
device_path_guid:   guid 0x09576E91, 0x6D3F, 0x11D2, 0x8E, 0x39, 0x00, 0xA0, 0xC9, 0x69, 0x72, 0x3B
payload_name:       dw __utf16__("\SECTORLLM.BIN"), 0
msg_loader:         db "sectorllm: UEFI loader", 10, 0     ; uefi.py HANDSHAKE_CUE
msg_prefix:         db "sectorllm: ", 0
msg_bad_run_block:  db "bad image", 10, 0
msg_bad_gdt:        db "firmware GDT too large", 10, 0
msg_disk_error:     db "disk error", 10, 0
msg_out_of_memory:  db "out of memory: the run needs ", 0
msg_kib:            db " KiB of RAM below 4 GiB", 10, 0
msg_exception:      db "CPU exception ", 0
msg_at:             db " at 0x", 0
msg_line_end:       db 10, 0

; variables
        align 8
image_handle:       dq 0
handles:            dq 0
handle_count:       dq 0
window:             dq 0
needed:             dq 0
block:              dq 0
char16:             dd 0
                    times 20 db 0       ; say_number's digits, written backwards
digits_end:         db 0
run_block:          times SECTOR db 0
        align FILE_ALIGN, db 0
image_end:
