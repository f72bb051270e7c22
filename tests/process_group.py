"""Two-process gloo groups on this machine for tests of code that all ranks run."""
import socket
from datetime import timedelta

import torch.distributed as dist

# A rank that waits for a peer which never comes fails the test within a minute, instead of
# hanging the run for gloo's default 30 minutes.
GROUP_TIMEOUT = timedelta(seconds=60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_gloo_group(rank: int, world_size: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=GROUP_TIMEOUT)
