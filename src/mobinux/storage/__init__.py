"""Block storage under the SCSI layer: the BlockDevice contract and its implementations.

Nothing here knows SCSI or iSCSI.  Modules::

    device    the BlockDevice protocol, WouldBlock, range helpers
    file      FileDevice: a regular file or block device (preadv/pwritev, RWF_NOWAIT,
              hole punching, SEEK_DATA/SEEK_HOLE extents)
    memory    MemoryDevice: a sparse RAM disk for tests; ZeroDevice: a blank disk
    overlay   Overlay: a client's copy-on-write layer over a shared read-only base
    chain     UserDisk: a user's persistent disk, a chain of overlays with snapshots
    powerloss PowerLossDir: overlay/user-disk directories that lose power on demand
    volatile  VolatileCacheDevice: a write-back cache that loses unflushed data on
              power_cut(), for durability tests

Errors are OSError with the operating system's errno; the SCSI layer maps them
to sense data (ENOSPC/EDQUOT -> SPACE ALLOCATION FAILED WRITE PROTECT, ...).
"""
