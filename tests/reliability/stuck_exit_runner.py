"""Run by test_rel_rank_failure.py under torchrun with 2 processes (plain gloo, no DeepSpeed):
rank 1 starts an all-reduce that rank 0 never joins, then raises. Without
``grpo.engine.install_rank_failure_hook`` rank 1's exit blocks on that pending collective (for
the process group's timeout, 30 min by default) and so does the whole job; with it, rank 1 ends within
GRPO_EXIT_TIMEOUT_S seconds. Prints ``FAILING rank=1 t=<time.time()>`` before raising."""
import sys
import time

import torch
import torch.distributed as dist

from grpo.engine import install_rank_failure_hook

torch.set_num_threads(1)
dist.init_process_group("gloo")
if sys.argv[1:] != ["--no-hook"]:  # --no-hook: the hang, for comparison
    install_rank_failure_hook()
rank = dist.get_rank()
if rank == 1:
    pending = dist.all_reduce(torch.ones(4), async_op=True)  # rank 0 never joins this one
    print(f"FAILING rank=1 t={time.time():.3f}", flush=True)
    raise ValueError("injected failure with a collective pending")
time.sleep(1.0)
dist.barrier()  # a different collective: it can only end with an error once rank 1 is gone
print("DONE rank=0", flush=True)
