#!/usr/bin/env python3
"""Writes link/hot-text.ld: the functions a running agent executes, grouped at the front
of the binary's code.

The kernel maps a binary's code in 64 KiB windows around each page it faults in (more
where readahead brought in more), so a function touched once at start keeps its whole
window resident. Spread over 10 MB of code, the few MB an agent executes kept most of the
binary resident. Grouping them makes those windows land on code the agent runs anyway.

usage: hot_text.py collect PID BINARY LIBRDKAFKA_A OUT.list
       hot_text.py write [--shuffle] OUT.ld LIST... [-- LIST...]...
       hot_text.py intersect OUT.list LIST LIST

`collect`: PID is an agent running BINARY (with symbols) that was started with the binary out of the
page cache and readahead off, so that its resident code pages are the ones it executed
(scripts/hot-text arranges that). LIBRDKAFKA_A is the librdkafka archive the binary was
linked with: its objects have no per-function sections, so whole objects are placed.

Patterns leave out what changes between builds: a crate's disambiguator in v0 names and
the numbers LLVM appends to local copies. They keep the hash of a legacy Rust symbol,
which tells one instantiation of a generic function from the others: it depends on the
target, the profile and the compiler, not on the rest of the code, so it holds across
rebuilds of one profile (without it a name matched every instantiation, and the group of
functions an idle agent runs was half as large again as what it ran). `write` merges the lists of several builds (the
release and dist profiles inline differently): a pattern that matches nothing in a build
costs that build nothing. Groups of lists split by `--` are placed one after the other:
scripts/hot-text puts what an idle agent runs first, then what only starting ran, so
that the code an idle agent reads back after giving its start-up code to the kernel
fills as few pages as it can.

A resident page holds whatever functions share it with one that ran, so one run's list
is about twice what ran. scripts/hot-text links a second time with the first list in a
shuffled order and keeps what is resident in both runs (`intersect`): a function that
never ran seldom has a neighbour that did in both layouts.
"""
import bisect
import random
import re
import struct
import subprocess
import sys

PAGE = 4096


def resident_pages(pid, binary):
    """File offsets of the pages of BINARY's code that are resident in process PID."""
    name = binary.rsplit("/", 1)[-1]
    pages = []
    with open(f"/proc/{pid}/pagemap", "rb") as pm, open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            p = line.split()
            if len(p) < 6 or not p[5].endswith(name) or "x" not in p[1]:
                continue
            lo, hi = (int(x, 16) for x in p[0].split("-"))
            off = int(p[2], 16)
            for va in range(lo, hi, PAGE):
                pm.seek(va // PAGE * 8)
                if struct.unpack("<Q", pm.read(8))[0] >> 63:
                    pages.append(off + (va - lo))
    return pages


def load_segments(binary):
    out = subprocess.run(["readelf", "-lW", binary], capture_output=True, text=True, check=True)
    segs = []
    for line in out.stdout.splitlines():
        q = line.split()
        if q and q[0] == "LOAD":
            segs.append((int(q[1], 16), int(q[2], 16), int(q[4], 16)))
    return segs


def functions(binary):
    out = subprocess.run(["nm", "-n", "-S", "--defined-only", binary],
                         capture_output=True, text=True, check=True)
    syms = []
    for line in out.stdout.splitlines():
        q = line.split()
        if len(q) == 4 and q[2] in "tTwW":
            syms.append((int(q[0], 16), int(q[1], 16), q[3]))
    return syms


def archive_objects(archive):
    """Function name -> object file in the archive."""
    out = subprocess.run(["nm", "-A", "--defined-only", archive],
                         capture_output=True, text=True, check=True)
    owner = {}
    for line in out.stdout.splitlines():
        q = line.split()
        if len(q) >= 3 and q[-2] in "tT":
            owner.setdefault(q[-1], q[0].split(":")[1])
    return owner


def pattern(name):
    m = re.match(r"^(_ZN.*17h[0-9a-f]{16}E)(\..*)?$", name)
    if m:
        base = m.group(1)
    else:
        base = re.sub(r"\.(llvm\.)?\d+$", "", name)
        base = re.sub(r"Cs[0-9A-Za-z]+_", "Cs*_", base)
    # LLVM may put a function in .text.unlikely.NAME, .text.startup.NAME, …
    return ".text.*" + base


def collect(pid, binary, archive, out_path):
    pages = sorted(resident_pages(pid, binary))
    segs = load_segments(binary)

    def vaddr(off):
        for o, va, size in segs:
            if o <= off < o + size:
                return va + off - o
        return None

    syms = functions(binary)
    starts = [s[0] for s in syms]
    touched = []
    seen = set()
    for off in pages:
        lo = vaddr(off)
        if lo is None:
            continue
        hi = lo + PAGE
        i = max(0, bisect.bisect_right(starts, lo) - 1)
        while i < len(syms) and syms[i][0] < hi:
            s, size, name = syms[i]
            if s + size > lo and name not in seen:
                seen.add(name)
                touched.append((name, size))
            i += 1
    owner = archive_objects(archive)
    lines = unique(
        f"*librdkafka_sys*.rlib:{owner[name]}(.text .text.*)" if name in owner
        else f"*({pattern(name)})"
        for name, _ in touched
        if name != "_start"
    )
    with open(out_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"{binary}: {len(touched)} functions ({sum(s for _, s in touched)} bytes) on "
          f"{len(pages) * PAGE // 1024} KiB of resident code -> {len(lines)} lines")


def unique(lines):
    """The lines in their first order, each once."""
    return list(dict.fromkeys(lines))


def read_list(path):
    return [line.strip() for line in open(path) if line.strip()]


def intersect(out_path, a, b):
    first = read_list(a)
    keep = set(read_list(b))
    lines = [line for line in first if line in keep]
    with open(out_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"{len(lines)} of {len(first)} lines resident in both layouts -> {out_path}")


def write(out_path, groups, shuffle=False):
    """GROUPS: lists of list files; each group's lines go before the next group's."""
    lines = []
    for group in groups:
        placed = set(lines)
        own = [line for line in unique(line for path in group for line in read_list(path))
               if line not in placed]
        if shuffle:
            random.Random(11).shuffle(own)
        # Rust functions first, then whole librdkafka objects (the sort keeps the order within).
        own.sort(key=lambda l: l.startswith("*librdkafka"))
        lines += own
    with open(out_path, "w") as f:
        f.write("/* Generated by scripts/hot-text: the functions an agent running the demo devices\n")
        f.write("   executed (release and dist builds), placed first in .text so that the code\n")
        f.write("   pages the kernel maps around them hold code the agent runs: first what an idle\n")
        f.write("   agent runs after giving back its start-up code, then what starting ran.\n")
        f.write("   Regenerate after large changes; a stale file costs resident memory only. */\n")
        f.write("SECTIONS {\n  .text.hot : {\n")
        for line in lines:
            f.write(f"    {line}\n")
        f.write("  }\n} INSERT BEFORE .text;\n")
    print(f"{len(lines)} lines -> {out_path}")


def groups(args):
    """LIST... [-- LIST...]...: the list files split at each `--`."""
    out = [[]]
    for a in args:
        if a == "--":
            out.append([])
        else:
            out[-1].append(a)
    return [g for g in out if g]


def main():
    if len(sys.argv) == 6 and sys.argv[1] == "collect":
        collect(*sys.argv[2:6])
    elif len(sys.argv) >= 5 and sys.argv[1:3] == ["write", "--shuffle"]:
        write(sys.argv[3], groups(sys.argv[4:]), shuffle=True)
    elif len(sys.argv) >= 4 and sys.argv[1] == "write":
        write(sys.argv[2], groups(sys.argv[3:]))
    elif len(sys.argv) == 5 and sys.argv[1] == "intersect":
        intersect(*sys.argv[2:5])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
