"""The encrypted file format: a bit-exact round trip, the mutation table (every kind of tampering, each refused),
peak memory against chunk size, and MB/s, beside references measured in the same run.

    python benchmarks/encryption.py                 # 256 MiB of random data
    python benchmarks/encryption.py --mib 64

Speed rows: chatforge's stream (memory to /dev/null, the format's own cost), the same file to file (read, write and
fsync included), next to one-shot AES-256-GCM over the same chunks (the cipher alone, no format) and a plain
copy + fsync (what the disk allows). Memory: Python's peak allocations (tracemalloc) while a file streams through,
which stays a few chunks whatever the file size. Exit 1 if a mutation is not refused, the round trip is not exact,
or encryption or decryption is under 500 MB/s.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import shutil
import sys
import tempfile
import time
import tracemalloc


def _mb_s(n: int, fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n / best / 1e6


def mutations(key, rng: random.Random) -> list[tuple[str, int, int]]:
    """(mutation, tried, refused) over a 5-chunk file."""
    from chatforge.errors import ChatforgeError
    from chatforge.privacy import crypto

    chunk = 4096
    plain = os.urandom(5 * chunk - 100)
    out = io.BytesIO()
    crypto.encrypt_stream(io.BytesIO(plain), out, key, chunk)
    blob = out.getvalue()
    other = io.BytesIO()
    crypto.encrypt_stream(io.BytesIO(plain), other, key, chunk)
    other = other.getvalue()
    h = 6 + 1 + 4 + 32 + 7 + 16
    size = chunk + 16
    chunks = [blob[h + i: h + i + size] for i in range(0, len(blob) - h, size)]

    def refused(data: bytes, k=key) -> bool:
        try:
            b"".join(crypto.iter_decrypt(io.BytesIO(data), k))
        except ChatforgeError:
            return True
        return False

    def flip(pos: int) -> bytes:
        m = bytearray(blob)
        m[pos] ^= 1 << rng.randrange(8)
        return bytes(m)

    cases = {
        "wrong key": [(blob, crypto.Key(raw=os.urandom(32))) for _ in range(20)],
        "flipped bit in the header (every byte)": [(flip(p), key) for p in range(h)],
        "flipped bit in a chunk (2,000 random places)": [(flip(rng.randrange(h, len(blob))), key) for _ in range(2000)],
        "truncated at every chunk boundary": [(blob[: h + i * size], key) for i in range(len(chunks))],
        "truncated at 200 random lengths": [(blob[: rng.randrange(len(blob))], key) for _ in range(200)],
        "last chunk dropped": [(blob[:h] + b"".join(chunks[:-1]), key)],
        "a middle chunk dropped": [(blob[:h] + b"".join(chunks[:i] + chunks[i + 1:]), key) for i in range(1, 4)],
        "two chunks swapped": [(blob[:h] + b"".join(chunks[:i] + [chunks[j]] + chunks[i + 1: j] + [chunks[i]]
                                                       + chunks[j + 1:]), key)
                               for i in range(5) for j in range(i + 1, 5)],
        "a chunk repeated": [(blob[:h] + b"".join(chunks[: i + 1] + chunks[i:]), key) for i in range(5)],
        "a chunk appended": [(blob + c, key) for c in chunks] + [(blob + b"\0", key)],
        "another file's header": [(other[:h] + blob[h:], key)],
        "a chunk from another file (same key)": [(blob[:h] + other[h: h + size] + blob[h + size:], key)],
    }
    return [(name, len(trials), sum(refused(d, k) for d, k in trials)) for name, trials in cases.items()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from chatforge.privacy import crypto

    key = crypto.Key(raw=os.urandom(32))
    n = args.mib * 2**20
    data = os.urandom(n)
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        plain, enc, back = (os.path.join(tmp, x) for x in ("plain", "enc", "back"))
        with open(plain, "wb") as f:
            f.write(data)

        crypto.encrypt_file(plain, enc, key)
        crypto.decrypt_file(enc, back, key)
        with open(back, "rb") as f:
            exact = f.read() == data
        ok &= exact
        overhead = os.path.getsize(enc) - n
        print(f"{args.mib} MiB random data: round trip {'bit-exact' if exact else 'NOT EXACT'}, "
              f"{overhead:,} bytes of header and tags at the default {crypto.DEFAULT_CHUNK // 1024} KiB chunk\n")

        rows = mutations(key, random.Random(args.seed))
        print("| mutation | tried | refused |")
        print("|---|---:|---:|")
        for name, tried, refused in rows:
            print(f"| {name} | {tried} | {refused} |")
            ok &= tried == refused
        tried, refused = sum(r[1] for r in rows), sum(r[2] for r in rows)
        print(f"| all | {tried} | {refused} ({100 * refused / tried:.1f}%) |\n")

        print("| chunk | encrypt stream MB/s | decrypt stream MB/s | encrypt file->file MB/s | decrypt file->file MB/s"
              " | AES-GCM alone MB/s | copy+fsync MB/s | peak memory encrypt / decrypt (MiB) |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")

        def copy() -> None:
            dst = os.path.join(tmp, "copy")
            with open(plain, "rb") as s, open(dst, "wb") as d:
                shutil.copyfileobj(s, d, 1 << 20)
                d.flush()
                os.fsync(d.fileno())
            os.unlink(dst)

        copy_mbs = _mb_s(n, copy)
        for chunk in (64 * 1024, 256 * 1024, 1024 * 1024, 4 * 1024 * 1024):
            stream = io.BytesIO()
            crypto.encrypt_stream(io.BytesIO(data), stream, key, chunk)
            ciphertext = stream.getvalue()

            def enc_stream() -> None:
                with open(os.devnull, "wb") as sink:
                    crypto.encrypt_stream(io.BytesIO(data), sink, key, chunk)

            def dec_stream() -> None:
                for _ in crypto._verified_chunks(io.BytesIO(ciphertext), key, "bench"):
                    pass

            def enc_file() -> None:
                os.unlink(enc)
                crypto.encrypt_file(plain, enc, key, chunk)

            def dec_file() -> None:
                os.unlink(back)
                crypto.decrypt_file(enc, back, key)

            aead, view = AESGCM(os.urandom(32)), memoryview(data)

            def cipher_alone() -> None:
                for i in range(0, n, chunk):
                    aead.encrypt(b"\0" * 12, view[i: i + chunk], b"")

            speeds = [_mb_s(n, f) for f in (enc_stream, dec_stream, enc_file, dec_file, cipher_alone)]
            ok &= speeds[0] >= 500 and speeds[1] >= 500 if chunk <= 1024 * 1024 else True
            peaks = []
            for fn in (enc_file, dec_file):
                tracemalloc.start()
                fn()
                peaks.append(tracemalloc.get_traced_memory()[1] / 2**20)
                tracemalloc.stop()
            print(f"| {chunk // 1024} KiB | " + " | ".join(f"{s:.0f}" for s in speeds)
                  + f" | {copy_mbs:.0f} | {peaks[0]:.2f} / {peaks[1]:.2f} |")
    print("\ntargets (round trip exact, 100% of mutations refused, >= 500 MB/s encrypt and decrypt at 64 KiB-1 MiB):",
          "met" if ok else "NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
