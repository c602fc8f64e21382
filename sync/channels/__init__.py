"""Channels: how bytes between processes travel, behind one interface (``base.Channel``).

``torch_p2p`` (the wire: torch.distributed point-to-point over the sync group, gloo or NCCL),
``ipc`` (between processes on one GPU: the sender's shared arena, or its tensors read in place),
``faulty`` (a fault-injecting wrapper of the wire, for tests and chaos runs). A new channel -- an
RDMA engine such as NIXL, a vLLM-native transfer engine -- is one more module here; the executor
schedules rounds and copies whatever the channel.
"""

from sync.channels.base import Channel, Message, wait_all
from sync.channels.ipc import IpcArena, IpcDirect, IpcSignals
from sync.channels.torch_p2p import TorchP2P

__all__ = ["Channel", "Message", "wait_all", "TorchP2P", "IpcArena", "IpcDirect", "IpcSignals"]
