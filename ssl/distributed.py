"""Process-group set-up from environment variables (torchrun / our launcher / submitit) and collectives.

No module-level rank state: everything asks ``torch.distributed`` directly.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


TIMEOUT_ENV = "SCENESSL_COLLECTIVE_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0


def collective_timeout() -> datetime.timedelta:
    """How long a rank waits in the rendezvous or in one collective before failing (``$SCENESSL_COLLECTIVE_TIMEOUT``
    seconds, default 30 min: long enough for rank 0's work that the others wait for at the next collective —
    generating the embedded data, a checkpoint, the monitors at an epoch's end)."""
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(raw) if raw.strip() else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"${TIMEOUT_ENV}={raw!r}: expected a number of seconds") from None
    if seconds <= 0:
        raise ValueError(f"${TIMEOUT_ENV}={raw!r}: expected a positive number of seconds")
    return datetime.timedelta(seconds=seconds)


def _addresses(host: str) -> list:
    return sorted({info[4][0] for info in socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)})


def check_rendezvous(*, backend: str, world_size: int, local_world_size: int) -> None:
    """Fail in one line, before any waiting, where the rendezvous cannot work across hosts.

    - ``MASTER_ADDR`` must resolve here (every rank connects to it);
    - with gloo across hosts, this host's name must not resolve to a loopback address only (Debian's
      ``127.0.1.1 <hostname>`` line): gloo binds the address of the hostname unless ``GLOO_SOCKET_IFNAME`` names
      an interface, and the other hosts would be told to connect to 127.0.1.1.
    """
    master = os.environ.get("MASTER_ADDR", "")
    if not master:
        raise RuntimeError("MASTER_ADDR is not set: the launcher (or torchrun) sets it to the first host")
    try:
        _addresses(master)
    except OSError as err:
        raise RuntimeError(f"MASTER_ADDR={master} (the job's first host) does not resolve on {socket.gethostname()}: "
                           f"{err}; fix name resolution between the hosts (DNS or /etc/hosts)") from None
    if backend != "gloo" or local_world_size >= world_size or os.environ.get("GLOO_SOCKET_IFNAME"):
        return
    host = socket.gethostname()
    try:
        own = _addresses(host)
    except OSError:
        own = []
    if not own or all(ipaddress.ip_address(a).is_loopback for a in own):
        raise RuntimeError(f"this host's name {host} resolves to {', '.join(own) or 'nothing'}: gloo across hosts "
                           f"needs an address the other hosts reach; fix /etc/hosts or set GLOO_SOCKET_IFNAME to "
                           f"the interface between the hosts (e.g. GLOO_SOCKET_IFNAME=eth0)")


def init_distributed(*, device_type: str = "cpu") -> DistEnv:
    """Initialise the default process group when ``WORLD_SIZE > 1`` (NCCL on CUDA, gloo on CPU).

    Rendezvous: ``MASTER_ADDR:MASTER_PORT`` (rank 0 serves the store there); every wait (the rendezvous, each
    collective) fails after :func:`collective_timeout` instead of hanging on a dead rank or host.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        timeout = collective_timeout()
        check_rendezvous(backend=backend, world_size=world_size,
                         local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size))))
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout)
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world_size)


_PEER_LOST = ("gloo", "nccl", "pair closure", "connection closed by peer", "connection reset by peer",
              "timed out waiting", "socket timeout", "broken pipe", "no route to host")


def _raised_in_collective(err: BaseException) -> bool:
    """The exception came out of torch.distributed (a collective, the store, DDP's buffer broadcast/all-reduce)."""
    tb = err.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename.replace("\\", "/")
        if "/torch/distributed/" in name or name.endswith("/torch/nn/parallel/distributed.py"):
            return True
        tb = tb.tb_next
    return False


def collective_failure(err: BaseException, output_dir: Any) -> Optional[RuntimeError]:
    """A one-paragraph error for a collective or rendezvous that failed because another rank or host went away
    (gloo/NCCL/store errors, e.g. gloo's "Timed out waiting 20000ms for send operation" or "Application timeout
    caused pair closure"); None for any other exception (re-raised as it is)."""
    dist_errors = tuple(getattr(dist, name) for name in ("DistError", "DistBackendError", "DistNetworkError",
                                                          "DistStoreError") if hasattr(dist, name))
    text = str(err)
    if not isinstance(err, dist_errors) and not (isinstance(err, RuntimeError) and (
            _raised_in_collective(err) or any(marker in text.lower() for marker in _PEER_LOST))):
        return None
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(err).__name__)
    return RuntimeError(
        f"rank {os.environ.get('RANK', '?')}/{os.environ.get('WORLD_SIZE', '?')} on {socket.gethostname()}: a "
        f"collective failed ({first[:300]}): another rank died or its host is unreachable (wait limit "
        f"{collective_timeout().total_seconds():.0f} s, ${TIMEOUT_ENV}); the last checkpoint in {output_dir} is "
        f"intact: submit the same command again to resume from it")


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


@torch.no_grad()
def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from all ranks along dim 0 (no gradient); identity for one process."""
    if get_world_size() == 1:
        return tensor
    out = [torch.empty_like(tensor) for _ in range(get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return torch.cat(out, dim=0)


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    if get_world_size() > 1:
        dist.broadcast(tensor, src)
    return tensor


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
