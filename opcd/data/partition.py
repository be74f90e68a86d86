"""Which rows of a batch each rank takes: a balanced partition by length, so that every rank has about
the same number of tokens to process (the busiest rank sets the step's time)."""

from __future__ import annotations


def balanced_rows(lengths: list[int], parts: int) -> list[list[int]]:
    """Split rows 0..len-1 into `parts` lists (each in increasing order) whose row counts differ by at
    most one and whose summed `lengths` are close: the longest rows first, each to the least loaded part
    that still has room (ties: the lower part). The spread between the fullest and the emptiest part is
    at most the longest row; deterministic, so every rank computes the same partition alone."""
    count = len(lengths)
    room = [count // parts + (part < count % parts) for part in range(parts)]
    loads, out = [0] * parts, [[] for _ in range(parts)]
    for row in sorted(range(count), key=lambda i: (-lengths[i], i)):
        part = min((p for p in range(parts) if room[p]), key=lambda p: (loads[p], p))
        out[part].append(row)
        loads[part] += lengths[row]
        room[part] -= 1
    return [sorted(rows) for rows in out]
