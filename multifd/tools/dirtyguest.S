# The guest of the QEMU live benchmark: a boot sector that dirties guest RAM at a set rate.
#
# SeaBIOS loads it at 0x7c00 and runs it in real mode. It switches to 32-bit protected mode
# (flat segments, no paging: guest-physical addresses up to 4 GiB), wakes on a 1 kHz timer and,
# each time, adds 1 to the first byte of as many pages as the rate owes since the last wake.
# The pages are drawn uniformly from [BASE, BASE + PAGES * 4096) by a 32-bit LCG. Between
# wakes the vCPU halts, so a slow rate costs the host little CPU.
#
# Time is read from PIT channel 2 (1193182 Hz, free-running over 65536 counts, no interrupt),
# so a late wake loses nothing as long as it comes within 55 ms; channel 0's interrupt is only
# the alarm clock. The interrupt gate jumps straight into the loop and drops its frame: no IRET
# (some hypervisors' instruction emulators, which run this code, do not handle it).
#
# What the host reads, in guest-physical memory (pmemsave):
#   0x6008  pages dirtied so far (u32)
#   0x600c  "DIRT" once the loop runs
# The parameters (u32, little-endian) lie at the end of the sector, before 0x55aa:
#   0x1ee RATE_FX  pages per PIT tick, 16.16 fixed point (below 65536: under 4.8 GB/s)
#   0x1f2 PAGES    pages in the region
#   0x1f6 BASE     first byte of the region
#   0x1fa SEED     the LCG's start
#
# Built with binutils (the bytes are embedded in dirtyguest.py; tests/test_dirtyguest.py
# checks that they match this source):
#   as --32 -o d.o dirtyguest.S && ld -m elf_i386 -Ttext 0x7c00 --oformat binary -o d.bin d.o

.code16
.globl _start
_start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    lgdtl gdt_desc
    mov %cr0, %eax
    or $1, %al                  # protection on
    mov %eax, %cr0
    ljmp $0x08, $flat
.code32
flat:
    mov $0x10, %ax              # every data segment flat: some hypervisors refuse real-mode
    mov %ax, %ds                # leftovers in FS and GS
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs
    mov $0x7000, %esp
    mov $0x11, %al              # 8259 PICs: IRQ 0-7 at vectors 0x20-0x27, 8-15 at 0x28-0x2f
    out %al, $0x20
    out %al, $0xa0
    mov $0x20, %al
    out %al, $0x21
    mov $0x28, %al
    out %al, $0xa1
    mov $4, %al
    out %al, $0x21
    mov $2, %al
    out %al, $0xa1
    mov $1, %al
    out %al, $0x21
    out %al, $0xa1
    mov $0xfe, %al              # only IRQ 0, the timer
    out %al, $0x21
    mov $0xff, %al
    out %al, $0xa1
    mov $0x34, %al              # PIT channel 0: rate generator, 1193 counts (1000.15 Hz)
    out %al, $0x43
    mov $1193, %ax
    out %al, $0x40
    mov %ah, %al
    out %al, $0x40
    mov $0xb4, %al              # PIT channel 2: rate generator, 65536 counts, the clock
    out %al, $0x43
    xor %al, %al
    out %al, $0x42
    out %al, $0x42
    in $0x61, %al               # gate channel 2 on, speaker off
    and $0xfc, %al
    or $1, %al
    out %al, $0x61
    lidtl idt_desc
    mov rate, %esi
    mov pages, %ecx
    mov base, %edi
    mov seed, %ebx
    xor %ebp, %ebp              # pages owed, fraction (16.16)
    movl $0, 0x6000             # channel 2's count at the last wake (it starts from 65536)
    movl $0, 0x6008
    movl $0x54524944, 0x600c    # "DIRT"
idle:
    sti
    hlt
    jmp idle
tick:                           # vector 0x20, interrupts off
    add $12, %esp               # the interrupt's frame: never returned to
    mov $0x20, %al              # end of interrupt
    out %al, $0x20
    mov $0x80, %al              # latch channel 2
    out %al, $0x43
    in $0x42, %al
    mov %al, %dl
    in $0x42, %al
    mov %al, %dh
    movzwl %dx, %edx
    mov 0x6000, %eax
    mov %edx, 0x6000
    sub %edx, %eax              # ticks since the last wake (it counts down)
    and $0xffff, %eax
    mul %esi
    add %ebp, %eax
    mov %eax, %ebp
    and $0xffff, %ebp
    shr $16, %eax               # whole pages owed
    jz idle
    mov %eax, 0x6004
page:
    imul $1664525, %ebx, %ebx
    add $1013904223, %ebx
    mov %ebx, %eax
    mul %ecx                    # edx = ebx * PAGES >> 32: a page index, uniform
    shl $12, %edx
    incb (%edi,%edx)
    incl 0x6008                 # counted once written: exact whenever the guest stops
    decl 0x6004
    jnz page
    jmp idle
.p2align 3
gdt:
    .quad 0
    .quad 0x00CF9A000000FFFF    # 0x08: code, flat, 32-bit
    .quad 0x00CF92000000FFFF    # 0x10: data, flat
idt_entry:                      # vector 0x20 (the IDT's base lies 0x20 entries before it)
    .word tick
    .word 0x08
    .byte 0
    .byte 0x8e                  # present, 32-bit interrupt gate
    .word 0
gdt_desc:
    .word 23
    .long gdt
idt_desc:
    .word 0x107
    .long idt_entry - 0x100
.org 0x1ee
rate: .long 0
pages: .long 0
base: .long 0
seed: .long 0
.word 0xaa55
