#!/usr/bin/env python3
"""Writes a random-weight GGUF with the shape of a real model, in Q4_K_M's mix.

No 3B/8B/14B file ships here, so the size ladder runs on files of their
shapes: the layer count, widths, heads and vocabulary of the real model, the
Q4_K_M recipe's types (Q4_K, with Q6_K for the output, and for attn_v and
ffn_down in the layers llama.cpp gives more bits), and random blocks whose
scales keep activations finite (each matrix's rows have unit-RMS output on
a unit-RMS input). Speed and memory depend on the shape and the block types,
not on the values, so the same file run by shoal and by llama.cpp compares
them as a real one would. The tokenizer is copied from a real GGUF
(Qwen2.5's, 151,936 tokens) so both programs load it.

    random_gguf.py SHAPE OUT.gguf TOKENIZER_SOURCE.gguf
    SHAPE: llama3.2-3b | llama3.1-8b | qwen2.5-14b | tiny (tests)

Pure Python (no numpy): blocks are random bytes with each block's scale
fields set by strided slice assignment, written tensor by tensor.
"""
import os
import struct
import sys

SHAPES = {
    # arch, embd, layers, heads, kv heads, ffn, rope base, biases, tied output
    "llama3.2-3b": ("llama", 3072, 28, 24, 8, 8192, 500000.0, False, True),
    "llama3.1-8b": ("llama", 4096, 32, 32, 8, 14336, 500000.0, False, False),
    "qwen2.5-14b": ("qwen2", 5120, 48, 40, 8, 13824, 1000000.0, True, False),
    "tiny": ("qwen2", 512, 4, 8, 2, 1024, 1000000.0, True, False),
}

GGUF_MAGIC = b"GGUF"
ALIGN = 32
F32, Q4_K, Q6_K = 0, 12, 14
BLOCK = {Q4_K: (256, 144), Q6_K: (256, 210)}
T_U32, T_F32, T_STR = 4, 6, 8


def f16(x):
    return struct.pack("<e", x)


def gguf_string(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def kv(key, vtype, value):
    out = gguf_string(key) + struct.pack("<I", vtype)
    if vtype == T_U32:
        return out + struct.pack("<I", value)
    if vtype == T_F32:
        return out + struct.pack("<f", value)
    return out + gguf_string(value)


def tokenizer_kvs(path):
    """The raw bytes of every `tokenizer.*` key of a GGUF, and the vocab size."""
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    with open(path, "rb") as f:
        data = f.read(64 << 20)  # the header: metadata is well inside this
    assert data[:4] == GGUF_MAGIC, f"{path} is not a GGUF"
    n_kv = struct.unpack_from("<Q", data, 16)[0]
    pos, out, vocab = 24, [], None

    def skip_value(t, pos):
        if t == T_STR:
            n = struct.unpack_from("<Q", data, pos)[0]
            return pos + 8 + n
        if t == 9:
            at, n = struct.unpack_from("<IQ", data, pos)
            pos += 12
            if at == T_STR:
                for _ in range(n):
                    pos = skip_value(T_STR, pos)
                return pos
            return pos + sizes[at] * n
        return pos + sizes[t]

    for _ in range(n_kv):
        start = pos
        n = struct.unpack_from("<Q", data, pos)[0]
        key = data[pos + 8 : pos + 8 + n].decode()
        pos += 8 + n
        t = struct.unpack_from("<I", data, pos)[0]
        if key == "tokenizer.ggml.tokens":
            vocab = struct.unpack_from("<Q", data, pos + 8)[0]
        pos = skip_value(t, pos + 4)
        if key.startswith("tokenizer.") and key != "tokenizer.chat_template":
            out.append(data[start:pos])
    return out, vocab


def quant_tensor(ty, rows, k, sigma):
    """`rows` rows of `k` random weights of std `sigma` in `ty` blocks."""
    elems, size = BLOCK[ty]
    nb = rows * k // elems
    buf = bytearray(os.urandom(nb * size))
    if ty == Q4_K:
        # Every scale and min 32: w = 32·d·(q − dmin/d), q uniform 0..15
        # (std 4.6), dmin = 7.5·d centres it.
        d = sigma / (32 * 4.6)
        head = f16(d) + f16(7.5 * d) + bytes([160] * 8 + [0] * 4)
        for i, b in enumerate(head):
            buf[i::size] = bytes([b]) * nb
    else:
        # Scales 32, q uniform 0..63 (std 18.5) around the format's 32.
        d = sigma / (32 * 18.5)
        tail = bytes([32] * 16) + f16(d)
        for i, b in enumerate(tail):
            buf[192 + i :: size] = bytes([b]) * nb
    return bytes(buf)


def more_bits(i, n):
    """llama.cpp's `use_more_bits`: Q4_K_M's Q6_K layers for attn_v/ffn_down."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensors(shape, vocab):
    arch, d, n_layer, heads, kv_heads, ffn, _, bias, tied = SHAPES[shape]
    hd = d // heads
    yield "token_embd.weight", Q6_K if tied else Q4_K, (d, vocab), 1.0
    for i in range(n_layer):
        p = f"blk.{i}."
        hi = Q6_K if more_bits(i, n_layer) else Q4_K
        yield p + "attn_norm.weight", F32, (d,), 1.0
        yield p + "attn_q.weight", Q4_K, (d, d), d**-0.5
        yield p + "attn_k.weight", Q4_K, (d, kv_heads * hd), d**-0.5
        yield p + "attn_v.weight", hi, (d, kv_heads * hd), d**-0.5
        if bias:
            yield p + "attn_q.bias", F32, (d,), 0.0
            yield p + "attn_k.bias", F32, (kv_heads * hd,), 0.0
            yield p + "attn_v.bias", F32, (kv_heads * hd,), 0.0
        yield p + "attn_output.weight", Q4_K, (d, d), d**-0.5
        yield p + "ffn_norm.weight", F32, (d,), 1.0
        yield p + "ffn_gate.weight", Q4_K, (d, ffn), d**-0.5
        yield p + "ffn_up.weight", Q4_K, (d, ffn), d**-0.5
        yield p + "ffn_down.weight", hi, (ffn, d), ffn**-0.5
    yield "output_norm.weight", F32, (d,), 1.0
    if not tied:
        yield "output.weight", Q6_K, (d, vocab), d**-0.5


def nbytes(ty, dims):
    n = 1
    for x in dims:
        n *= x
    if ty == F32:
        return 4 * n
    elems, size = BLOCK[ty]
    return n // elems * size


def main():
    shape, out, source = sys.argv[1:4]
    arch, d, n_layer, heads, kv_heads, ffn, rope, _, _ = SHAPES[shape]
    tok, vocab = tokenizer_kvs(source)
    meta = [
        kv("general.architecture", T_STR, arch),
        kv("general.name", T_STR, f"random {shape}"),
        kv("general.basename", T_STR, f"random-{shape.split('-')[0]}"),
        kv("general.size_label", T_STR, shape.split("-")[-1].upper()),
        kv("general.file_type", T_U32, 15),
        kv(f"{arch}.block_count", T_U32, n_layer),
        kv(f"{arch}.context_length", T_U32, 32768),
        kv(f"{arch}.embedding_length", T_U32, d),
        kv(f"{arch}.feed_forward_length", T_U32, ffn),
        kv(f"{arch}.attention.head_count", T_U32, heads),
        kv(f"{arch}.attention.head_count_kv", T_U32, kv_heads),
        kv(f"{arch}.rope.freq_base", T_F32, rope),
        kv(f"{arch}.attention.layer_norm_rms_epsilon", T_F32, 1e-6),
        kv("general.alignment", T_U32, ALIGN),
    ] + tok
    specs = list(tensors(shape, vocab))
    infos, offset = [], 0
    for name, ty, dims, _ in specs:
        infos.append(
            gguf_string(name)
            + struct.pack("<I", len(dims))
            + b"".join(struct.pack("<Q", x) for x in dims)
            + struct.pack("<IQ", ty, offset)
        )
        offset += nbytes(ty, dims)
        offset += -offset % ALIGN
    tmp = out + ".part"
    with open(tmp, "wb") as f:
        f.write(GGUF_MAGIC + struct.pack("<IQQ", 3, len(specs), len(meta)))
        for m in meta + infos:
            f.write(m)
        f.write(b"\0" * (-f.tell() % ALIGN))
        for name, ty, dims, sigma in specs:
            if ty == F32:
                n = nbytes(ty, dims) // 4
                f.write(struct.pack("<f", sigma) * n)
            else:
                rows = 1
                for x in dims[1:]:
                    rows *= x
                f.write(quant_tensor(ty, rows, dims[0], sigma))
            f.write(b"\0" * (-f.tell() % ALIGN))
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
