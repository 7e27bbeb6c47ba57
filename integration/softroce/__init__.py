"""Soft-RoCE CI harness: boots a Debian kernel under QEMU (virtme-ng) with the host root shared read-only,
creates two rxe devices (rxe0/rxe1 = NIC port 1/2) and runs one command there. Host-side modules
(`prepare`, `vm`) run in the user's shell or pytest; `guest` is imported inside the VM too.
"""

from .guest import GUEST_ENV, RXE_LINKS, hw_counter, in_guest, packet_counters
from .prepare import Prepared, SoftRoceSetupError, cache_dir, prepare
from .vm import GuestRun, run_in_guest

__all__ = [
    "GUEST_ENV", "RXE_LINKS", "GuestRun", "Prepared", "SoftRoceSetupError", "cache_dir", "hw_counter",
    "in_guest", "packet_counters", "prepare", "run_in_guest",
]
