; layout.asm - what boot.asm and engine.asm agree on: the memory map, the run block's fields, the end-of-run
; statuses and the serial handshake (image.py mirrors every value here; tests check that they match).
;
; MEMORY MAP (physical addresses, while the engine runs under a BIOS)
;   0x00000 - 0x004FF   interrupt vectors, BIOS data area                                      BIOS
;   0x00500 - 0x00503   MEM_TOP: the A20 probe's byte; with -DSELFTEST, the end of the RAM from 1 MiB
;   0x00504 - 0x0051B   E820_ENTRY: one INT 15h E820h answer
;   0x00600 - 0x06FFF   stack: ESP from STACK_TOP down (below 64 KiB, so real mode shares it; not on the boot
;                       sector's page: QEMU takes a slow path on every write to a page that holds code it ran)
;   0x07C00 - 0x07DFF   the boot sector: its read_sectors, print, fail and stop serve the engine's loader
;   0x07E00 - 0x07FFF   RUN_BLOCK: the run block sector, fields at RB_* (image.py RunBlock), with the IDT
;   0x08000 - 0x0FFFF   ENGINE_BASE: engine.asm, then its variables, IDT and section entries (engine.asm)
;   0x10000 - 0x17FFF   DISK_BUFFER while the model loads: each piece is read here and copied above 1 MiB
;   0x10000 - 0x7FFFF   LOW_ARENA afterwards: image.py places the buffers and KV cache here when they fit
;   0x80000 - 0xFFFFF   EBDA, VGA memory, option ROMs, BIOS                                    not ours
;   0x100000            MODEL_BASE: the packed model (docs/format.md), [RUN_BLOCK + RB_MODEL_BYTES] long; then
;                       the buffers and KV cache that did not fit the low arena, up to RB_MEMORY_END
;
; RUN BLOCK (little-endian; image.py RUN_BLOCK_FORMAT). RB_SETTINGS .. RB_SETTINGS_END is copied as it is to the
; engine's VARS: the sampler's integers and the memory layout image.py resolved from the model's header. The IDT
; and its descriptor are resolved there too, from the engine's map.

STACK_TOP           equ 0x7000
MEM_TOP             equ 0x0500
E820_ENTRY          equ 0x0504
BOOT_SECTOR         equ 0x7C00
RUN_BLOCK           equ 0x7E00
ENGINE_BASE         equ 0x8000
DISK_BUFFER         equ 0x10000
MODEL_BASE          equ 0x100000
SECTOR              equ 512
SECTOR_SHIFT        equ 9
MAX_ENGINE_SECTORS  equ 63              ; the engine lives in 0x8000..0xFDFF: the boot sector reads it whole

RUN_MAGIC           equ 'SLRB'
RUN_VERSION         equ 6
RB_MAGIC            equ 0               ; 4s
RB_VERSION          equ 4               ; u16
RB_ENGINE_SECTORS   equ 6               ; u16
RB_MODEL_LBA        equ 8               ; u32, from the start of the disk
RB_MODEL_BYTES      equ 12              ; u32
RB_MEMORY_END       equ 16              ; u32: the end of everything the run uses (image.py memory_end)
RB_STEPS            equ 20              ; u16, run.c's -n (0 = the whole context), for the runner
RB_IDT_DESCRIPTOR   equ 22              ; u16 limit, u32 base: lidt's operand for the IDT at RB_IDT
RB_KERNEL_DISP      equ 28              ; i32, -4 x the multiply-adds in each dot-product kernel (the longest dot
                                        ; product): the first multiply-add's v displacement
RB_SETTINGS         equ 32              ; from here to RB_SETTINGS_END: the engine's VARS, in their order
RB_INV_TEMPERATURE  equ 32              ; u32, round(65536 / temperature); 0 = greedy
RB_TOPP             equ 36              ; u32, round(65536 * top-p); 65536 = off
RB_TOPK             equ 40              ; u32, 0 = off
RB_MINP             equ 44              ; u32, round(65536 * min-p); 0 = off
RB_SEED             equ 48              ; u64, the xorshift64* state
RB_PASSES           equ 56              ; u16, forward passes to run, prompt included (image.py: run.c's rule)
RB_PROMPT_COUNT     equ 58              ; u16
RB_BUFFERS          equ 60              ; u32 x 8: x, xb, act, qkv, hb, att, logits, kernel (engine.asm)
XB_DISTANCE         equ 0x10000         ; xb is always x + XB_DISTANCE: rmsnorm writes it with no register to spare
RB_EXP_TABLE        equ 92              ; u32, the packed model's exp table in memory (sampler, attention)
RB_KV_BASE          equ 96              ; u32 x 6: the KV cache and its geometry (engine.asm store_kv)
RB_POS              equ 120             ; u32, 0: the first position
RB_SETTINGS_END     equ 124
RB_IDT              equ 128             ; 8 bytes x N_VECTORS (engine.asm): the IDT's gates into exception_sled
RB_PROMPT_IDS       equ 240             ; u16[RB_PROMPT_COUNT >= 1], BOS first

STATUS_OK               equ 0x00        ; the end record's status and the byte sent to isa-debug-exit (port 0xF4)
STATUS_DISK_ERROR       equ 0x02
STATUS_BAD_RUN_BLOCK    equ 0x03
STATUS_A20_CLOSED       equ 0x04
STATUS_OUT_OF_MEMORY    equ 0x05
STATUS_CPU_EXCEPTION    equ 0x06
STATUS_NEEDS_386        equ 0x07
DEBUG_EXIT_PORT         equ 0xF4        ; QEMU's isa-debug-exit: QEMU exits with status (value << 1) | 1

COM1                equ 0x3F8
UART_LSR            equ COM1 + 5
LSR_DATA_READY      equ 0x01
LSR_THR_EMPTY       equ 0x20
; The serial handshake: a runner that wants records sends this byte before the machine starts (the UART holds
; it); a terminal sends nothing, or a key a person types, and gets the story as plain text.
SERIAL_RECORDS      equ 0x1E            ; RS: a control byte no terminal sends for flow control or a person types
