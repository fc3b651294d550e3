"""How many torch threads a conversion's steps run on: one for the small dense algebra, all for the big products.

Converting a layer is mostly small dense algebra — eigen-decompositions and solves of a few hundred rows — where
the thread pool only adds contention (on a busy 2-core machine an fp64 ``eigh`` of 224 rows took ~1 s inside the
pool's wake and ~3 ms on one thread), and where the result itself depends on the thread count: LAPACK splits the
work differently.  So a layer's conversion runs inside ``one_thread``.

A few steps of it are large products over every calibration token — the source layer and each converted layer run
forward, the refit's ZᵀZ — and those give the same bits on any number of threads: a matmul's threads each compute
their own block of the output, every element summed in the same order (checked: ZᵀZ of 16,384 × 576 in fp64 and a
linear layer in fp32 are bit-identical on one and two threads), and softmax, masks and RoPE act row by row.  Inside
``one_thread``, ``all_threads`` lends those steps the threads it took:

    with one_thread():          # eigh, solve, sums: one thread
        ...
        with all_threads():     # matmuls, a layer's forward: every thread, the same result
            gram = z.T @ z

Long sums (``.sum()``, ``.mean()`` over many elements) are split among threads and may round differently, so they
stay outside ``all_threads``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_taken: list[int] = []  # the thread counts the enclosing one_thread blocks took, innermost last


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the enclosed work on one torch thread (``all_threads`` inside it gives the others back for a while)."""
    threads = torch.get_num_threads()
    _taken.append(threads)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        _taken.pop()
        torch.set_num_threads(threads)


@contextlib.contextmanager
def all_threads() -> Iterator[None]:
    """Run the enclosed work on the threads the innermost ``one_thread`` took (outside one: as it is).

    Only for work whose result does not depend on the thread count (see the module docstring)."""
    if not _taken:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(_taken[-1])
    try:
        yield
    finally:
        torch.set_num_threads(threads)
