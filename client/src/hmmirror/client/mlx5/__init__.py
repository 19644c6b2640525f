"""The mlx5 ODP device model: MRs with MTTs, page faults, prefetch, implicit ODP, RDMA.

>>> async with connect(endpoint, name="nic") as session:
...     nic = Nic(session)
...     mr = await nic.reg_mr(pid, addr, length, AccessFlags.LOCAL_WRITE
...                           | AccessFlags.REMOTE_READ | AccessFlags.ON_DEMAND)
...     data = await nic.read(mr.rkey, addr, 4096)

``RdmaService`` serves a Nic to remote requesters (``hm-agent`` runs one), and
``RdmaPeer`` is the requester's side.
"""

from hmmirror.client.errors import RemoteAccessError
from hmmirror.client.mlx5.mr import MemoryRegion
from hmmirror.client.mlx5.nic import Nic
from hmmirror.client.mlx5.peer import RdmaPeer
from hmmirror.client.mlx5.service import RdmaService
from hmmirror.client.mlx5.verbs import (
    ADVISE_FLUSH,
    IMPLICIT_CHILD_SIZE,
    MAX_PREFETCH_LEN,
    WHOLE_ADDRESS_SPACE,
    AccessFlags,
    Advice,
    AtomicOp,
    Sge,
)

__all__ = [
    "ADVISE_FLUSH",
    "IMPLICIT_CHILD_SIZE",
    "MAX_PREFETCH_LEN",
    "WHOLE_ADDRESS_SPACE",
    "AccessFlags",
    "Advice",
    "AtomicOp",
    "MemoryRegion",
    "Nic",
    "RdmaPeer",
    "RdmaService",
    "RemoteAccessError",
    "Sge",
]
