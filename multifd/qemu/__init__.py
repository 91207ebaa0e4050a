"""QEMU's own multifd migration stream, received by `multifd-recv --qemu DIR`.

    wire     the main channel and the multifd channels, bytes to records (pure: no I/O)
    epochs   QEMU's synchronization rule: which pages may be applied when
    blocks   the output directory: one sparse file per RAM block, written atomically
    capture  the receiver: accept, tell the channels apart, apply pages epoch by epoch

docs/QEMU.md describes the stream byte by byte, with the versions it comes in.
"""
