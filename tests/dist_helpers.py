"""Spawning gloo worker processes for the distributed tests (CPU).

One rendezvous through a file (no port to pick: another process on the machine may take a "free" port
first), one thread per worker, a barrier before the group is destroyed, and a passing worker that leaves
without the interpreter's teardown: gloo's threads have been seen to abort the process there ("terminate
called without an active exception", SIGABRT, after every check had passed), which ``mp.spawn`` reports
as a failure. The barrier keeps one rank from tearing down its pairs while the other still sends.
"""

import os
import sys
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, world, init_file, fn, args):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    except Exception:
        traceback.print_exc()
        dist.destroy_process_group()
        raise
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn, world, *args):
    """Run ``fn(rank, world, *args)`` on ``world`` gloo processes; raises if any of them fails."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "rendezvous"), fn, args), nprocs=world, join=True)
