#!/usr/bin/env python3
"""What a remote run brings back: its whole output folder in one xz archive, cut into
parts small enough to travel, beside a few summaries to read at once.

    deliver.py pack OUT [SUMMARY...]   # OUT becomes the archive's parts + the summaries
    deliver.py unpack SRC DEST         # the folder OUT was, rebuilt under DEST

A GPU machine reached through a job system or a copy tool usually returns a handful of
files of bounded size, not a tree: the GPU suite alone writes some forty files in
folders. `pack` puts every file under OUT (folders included) into
`results.tar.xz`, cut into `results.tar.xz.000`, `.001`, … of at most --part-bytes
(default 16,000,000) when it is larger, removes what it packed, and leaves beside the
parts the SUMMARY files (names at the top of OUT, in the order given) that fit within
--max-files files in all (default 8) and are no larger than a part: a summary also
stays in the archive, so the archive alone is the whole folder. It prints what it
left, with sizes. Parts that alone exceed --max-files are an error (exit 2, the parts
kept): carry less (large models elsewhere) or raise the limits.

`unpack` reassembles the parts in order (a missing or extra part is an error) and
extracts them under DEST, refusing members that would land outside it.
"""
import argparse
import lzma
import os
import re
import shutil
import sys
import tarfile

ARCHIVE = "results.tar.xz"
PART = re.compile(re.escape(ARCHIVE) + r"\.(\d{3})$")
# Names every transport takes: letters, digits, '.', '_' and '-'.
PLAIN_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def pack(out, summaries, part_bytes, max_files):
    out = os.path.abspath(out)
    if not os.path.isdir(out):
        sys.exit(f"deliver.py: {out} is not a folder")
    for name in summaries:
        if "/" in name or not PLAIN_NAME.match(name):
            sys.exit(f"deliver.py: summary {name!r} is not a plain file name at the top of OUT")
    entries = sorted(e for e in os.listdir(out) if not e.startswith(".deliver"))
    stale = [e for e in entries if e == ARCHIVE or PART.match(e)]
    if stale:
        sys.exit(f"deliver.py: {out} already holds {stale[0]}: pack it once")
    tmp = os.path.join(out, ".deliver.tar.xz")
    files = 0
    with lzma.open(tmp, "wb", preset=6) as raw, tarfile.open(fileobj=raw, mode="w") as tar:
        for entry in entries:
            tar.add(os.path.join(out, entry), arcname=entry)
        files = sum(1 for m in tar.getmembers() if m.isfile())
    size = os.path.getsize(tmp)
    parts = []
    if size <= part_bytes:
        parts.append((ARCHIVE, None))
    else:
        count = (size + part_bytes - 1) // part_bytes
        if count > 1000:
            sys.exit(f"deliver.py: {size} bytes make more than 1000 parts")
        parts = [(f"{ARCHIVE}.{i:03d}", i * part_bytes) for i in range(count)]
    kept = []
    room = max_files - len(parts)
    for name in summaries:
        path = os.path.join(out, name)
        if len(kept) < room and os.path.isfile(path) and os.path.getsize(path) <= part_bytes:
            kept.append(name)
    for entry in entries:
        if entry in kept:
            continue
        path = os.path.join(out, entry)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    if len(parts) == 1:
        os.replace(tmp, os.path.join(out, ARCHIVE))
    else:
        with open(tmp, "rb") as src:
            for name, start in parts:
                src.seek(start)
                with open(os.path.join(out, name + ".tmp"), "wb") as dst:
                    dst.write(src.read(part_bytes))
                os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))
        os.remove(tmp)
    for name in [p for p, _ in parts] + kept:
        print(f"{name}\t{os.path.getsize(os.path.join(out, name))} bytes")
    print(f"({files} files packed, {size} bytes compressed, {len(parts)} part(s))")
    if len(parts) > max_files:
        print(
            f"deliver.py: {len(parts)} parts exceed the {max_files} files that travel",
            file=sys.stderr,
        )
        sys.exit(2)


def parts_of(src):
    """The archive's parts in SRC, in order."""
    names = os.listdir(src)
    numbered = sorted((int(m.group(1)), n) for n in names if (m := PART.match(n)))
    whole = ARCHIVE in names
    if whole and numbered:
        sys.exit(f"deliver.py: {src} holds both {ARCHIVE} and numbered parts")
    if whole:
        return [os.path.join(src, ARCHIVE)]
    if not numbered:
        sys.exit(f"deliver.py: no {ARCHIVE} or {ARCHIVE}.000 in {src}")
    for expected, (index, name) in enumerate(numbered):
        if index != expected:
            sys.exit(f"deliver.py: part {expected:03d} is missing in {src} (found {name})")
    return [os.path.join(src, n) for _, n in numbered]


class Joined:
    """The parts read as one stream."""

    def __init__(self, paths):
        self.files = [open(p, "rb") for p in paths]

    def read(self, n=-1):
        chunks = []
        while self.files and (n < 0 or n > 0):
            data = self.files[0].read(n)
            if not data:
                self.files.pop(0).close()
                continue
            chunks.append(data)
            if n > 0:
                n -= len(data)
        return b"".join(chunks)


def unpack(src, dest):
    dest = os.path.abspath(dest)
    os.makedirs(dest, exist_ok=True)
    stream = lzma.LZMAFile(Joined(parts_of(src)))
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            target = os.path.abspath(os.path.join(dest, member.name))
            if os.path.isabs(member.name) or os.path.commonpath([dest, target]) != dest:
                sys.exit(f"deliver.py: {member.name!r} would land outside {dest}")
            if member.issym() or member.islnk():
                continue
            if hasattr(tarfile, "data_filter"):
                tar.extract(member, dest, filter="data")
            else:
                tar.extract(member, dest)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack")
    p.add_argument("out")
    p.add_argument("summaries", nargs="*")
    p.add_argument("--part-bytes", type=int, default=16_000_000)
    p.add_argument("--max-files", type=int, default=8)
    u = sub.add_parser("unpack")
    u.add_argument("src")
    u.add_argument("dest")
    args = parser.parse_args()
    if args.command == "pack":
        if args.part_bytes < 1 or args.max_files < 1:
            sys.exit("deliver.py: --part-bytes and --max-files must be at least 1")
        pack(args.out, args.summaries, args.part_bytes, args.max_files)
    else:
        unpack(args.src, args.dest)


if __name__ == "__main__":
    main()
