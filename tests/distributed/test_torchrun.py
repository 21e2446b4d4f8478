"""End to end under torchrun: init() reads its environment, the ring runs, nothing is left
in /dev/shm."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from .harness import free_port
from .test_allreduce import no_segment_left_behind  # noqa: F401  (autouse fixture)

SCRIPT = textwrap.dedent("""
    import torch
    import ringfuse.distributed as rd

    rank, world = rd.init()
    x = torch.full((1000,), float(rank + 1))
    rd.all_reduce(x)
    shard = rd.reduce_scatter(torch.arange(4 * world, dtype=torch.int64), "sum")
    print(f"rank {rank}/{world} backend {rd.backend_for(x)} sum {x[0].item()} shard {shard.tolist()}", flush=True)
""")


def test_init_and_all_reduce_under_torchrun(tmp_path):
    script = tmp_path / "prog.py"
    script.write_text(SCRIPT)
    # --log-dir: without it torchrun leaves an empty /tmp/torchelastic_* tree behind per run
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "--log-dir", str(tmp_path / "torchrun"), str(script)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the two ranks share one pipe: their lines may interleave, so split on the marker
    lines = sorted("rank " + part.strip() for part in proc.stdout.split("rank ")[1:])
    assert lines == ["rank 0/2 backend shm sum 3.0 shard [0, 2, 4, 6]",
                     "rank 1/2 backend shm sum 3.0 shard [8, 10, 12, 14]"], proc.stdout  # fmt: skip
