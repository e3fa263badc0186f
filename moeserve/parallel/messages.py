"""Rank 0 -> worker messages over the control group, bounded on the sending side.

Workers wait for their next message without a time limit (the server may idle for days), so the
control group's timeout is unbounded. A gloo send to a rank that stopped answering (alive, but
not receiving) blocks until the group's timeout, so rank 0 sends with isend and waits at most
`timeout`: a silent worker fails the step instead of hanging the server. (Measured with a
SIGSTOPped peer: an 8-byte isend waits exactly as long as wait(timeout) allows.)
"""

from __future__ import annotations

import pickle
from datetime import timedelta

import torch
import torch.distributed as dist


def send(group: dist.ProcessGroup, messages: dict[int, object], timeout: timedelta) -> None:
    """Sends messages[rank] to each rank (pickled: a length, then the bytes)."""
    works, keep, pickled = [], [], {}
    for dst, message in messages.items():
        if id(message) not in pickled:     # the same message to many ranks is pickled once
            data = bytearray(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
            pickled[id(message)] = torch.frombuffer(data, dtype=torch.uint8)
        payload = pickled[id(message)]
        size = torch.tensor([payload.numel()], dtype=torch.int64)
        keep += [size, payload]
        works.append(dist.isend(size, dst, group=group))
        works.append(dist.isend(payload, dst, group=group))
    for work in works:
        work.wait(timeout)


def receive(group: dist.ProcessGroup, src: int = 0) -> object:
    """The next message from src; waits as long as the group allows."""
    size = torch.empty(1, dtype=torch.int64)
    dist.recv(size, src, group=group)
    payload = torch.empty(int(size), dtype=torch.uint8)
    dist.recv(payload, src, group=group)
    return pickle.loads(payload.numpy().tobytes())
