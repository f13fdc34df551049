#!/usr/bin/env python3
"""MiB of weights a pipeline stage holds: layers [START, END) of a GGUF, plus
the embedding table if it is the first stage (a stage reads all its mapped
pages at load so the first request pays no page faults) and the output head
(output.weight, or the tied token_embd, and output_norm) if it is the last.

    gguf_share.py FILE START END FIRST(0|1) LAST(0|1)
"""
import struct
import sys

SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
# ggml type -> (block elements, block bytes)
BLOCKS = {0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24),
          8: (32, 34), 10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176),
          14: (256, 210), 30: (1, 2)}


def tensors(path):
    with open(path, "rb") as f:
        data = f.read(64 << 20)
    n_t, n_kv = struct.unpack_from("<QQ", data, 8)
    pos = 24

    def skip(t, pos):
        if t == 8:
            return pos + 8 + struct.unpack_from("<Q", data, pos)[0]
        if t == 9:
            at, n = struct.unpack_from("<IQ", data, pos)
            pos += 12
            if at == 8:
                for _ in range(n):
                    pos = skip(8, pos)
                return pos
            return pos + SIZES[at] * n
        return pos + SIZES[t]

    for _ in range(n_kv):
        n = struct.unpack_from("<Q", data, pos)[0]
        pos += 8 + n
        t = struct.unpack_from("<I", data, pos)[0]
        pos = skip(t, pos + 4)
    for _ in range(n_t):
        n = struct.unpack_from("<Q", data, pos)[0]
        name = data[pos + 8:pos + 8 + n].decode()
        pos += 8 + n
        nd = struct.unpack_from("<I", data, pos)[0]
        dims = struct.unpack_from("<" + "Q" * nd, data, pos + 4)
        ty = struct.unpack_from("<I", data, pos + 4 + 8 * nd)[0]
        pos += 4 + 8 * nd + 12
        elems = 1
        for d in dims:
            elems *= d
        be, bb = BLOCKS[ty]
        yield name, elems // be * bb


def main():
    path, start, end = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    first, last = sys.argv[4] == "1", sys.argv[5] == "1"
    sizes = dict(tensors(path))
    total = 0
    for name, b in sizes.items():
        if name.startswith("blk.") and start <= int(name.split(".")[1]) < end:
            total += b
    if first:
        total += sizes["token_embd.weight"]
    if last:
        total += sizes.get("output.weight", sizes["token_embd.weight"])
        total += sizes.get("output_norm.weight", 0)
    print(total >> 20)


if __name__ == "__main__":
    main()
