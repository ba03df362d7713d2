"""Reading a process's memory, for claims about what a process holds (its environment, heap and
stacks, not only what /proc shows of its start)."""

from __future__ import annotations

import os


def memory_holds(pid: int, needle: bytes) -> bool:
    """Whether ``needle`` is anywhere in the readable memory of process ``pid``. The process must
    be this one's descendant (Yama ptrace scope 1) or run as the same user without Yama."""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            span, perms, *rest = line.split()
            if perms[0] != "r" or (rest and rest[-1] in ("[vvar]", "[vsyscall]", "[vvar_vclock]")):
                continue
            lo, hi = (int(x, 16) for x in span.split("-"))
            tail = b""  # the end of the previous chunk: a needle may straddle two
            for at in range(lo, hi, 1 << 24):
                try:
                    chunk = os.pread(mem.fileno(), min(1 << 24, hi - at), at)
                except OSError:
                    break
                if needle in chunk or (tail and needle in tail + chunk[:len(needle) - 1]):
                    return True
                tail = chunk[-(len(needle) - 1):] if len(needle) > 1 else b""
    return False
