#!/usr/bin/env python3
"""Writes the virtio_request seeds: one request of each type, laid out as
a Linux driver does (header, data, status in separate descriptors), plus
an indirect chain and a chain whose header and data share a descriptor.
The layout is the target's (fuzz_targets/virtio_request.rs)."""

import os
import struct

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "corpus", "virtio_request")
DATA = 0x1000
NEXT, WRITE, INDIRECT = 1, 2, 4
IN, OUT_, FLUSH, GET_ID, DISCARD, WZ, BAD = 0, 1, 4, 8, 11, 13, 99


def seed(name, descs, mem, flags=0, head=0):
    table = b"".join(struct.pack("<QIHH", *d) for d in descs).ljust(256, b"\0")
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "seed-" + name), "wb") as f:
        f.write(bytes([flags | head]) + table + mem)


def mem_at(parts):
    """Guest memory from 0x1000 on, with `parts` = [(addr, bytes)]."""
    m = bytearray(0x3000)
    for addr, b in parts:
        m[addr - DATA : addr - DATA + len(b)] = b
    return bytes(m)


def hdr(t, sector):
    return struct.pack("<IIQ", t, 0, sector)


H, D, S = 0x1000, 0x1100, 0x3f00
for name, t, dlen, dflags in [("read", IN, 4096, WRITE), ("write", OUT_, 1024, 0),
                              ("get-id", GET_ID, 20, WRITE)]:
    seed(name, [(H, 16, NEXT, 1), (D, dlen, NEXT | dflags, 2), (S, 1, WRITE, 0)],
         mem_at([(H, hdr(t, 8)), (D, b"\x5a" * 1024)]))
seed("flush", [(H, 16, NEXT, 1), (S, 1, WRITE, 0)], mem_at([(H, hdr(FLUSH, 0))]))
seed("unsupported", [(H, 16, NEXT, 1), (S, 1, WRITE, 0)], mem_at([(H, hdr(BAD, 0))]))
for name, t in [("discard", DISCARD), ("write-zeroes", WZ)]:
    segs = struct.pack("<QII", 16, 64, 0) + struct.pack("<QII", 1024, 8, 1)
    seed(name, [(H, 16, NEXT, 1), (D, len(segs), NEXT, 2), (S, 1, WRITE, 0)],
         mem_at([(H, hdr(t, 0)), (D, segs)]))
# Indirect: the head points at a table of three descriptors at 0x2000.
table = struct.pack("<QIHH", H, 16, NEXT, 1) + struct.pack("<QIHH", D, 512, NEXT | WRITE, 2) \
    + struct.pack("<QIHH", S, 1, WRITE, 0)
seed("indirect-read", [(0x2000, 48, INDIRECT, 0)], mem_at([(H, hdr(IN, 1)), (0x2000, table)]))
# Header and data in one descriptor; data and status in one; 4 KiB sectors.
seed("shared-write-4k", [(H, 16 + 4096, NEXT, 1), (S, 1, WRITE, 0)],
     mem_at([(H, hdr(OUT_, 8) + b"\x77" * 4096)]), flags=0x10)
seed("shared-read", [(H, 16, NEXT, 1), (D, 513, WRITE, 0)], mem_at([(H, hdr(IN, 3))]))
# A write on a read-only device; a chain that loops back to its head.
seed("write-readonly", [(H, 16, NEXT, 1), (D, 512, NEXT, 2), (S, 1, WRITE, 0)],
     mem_at([(H, hdr(OUT_, 0))]), flags=0x20)
seed("loop", [(H, 16, NEXT, 1), (S, 1, NEXT | WRITE, 0)], mem_at([(H, hdr(IN, 0))]))
