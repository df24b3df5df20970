"""The VM domain of scaleboxd: VMs, templates, their disks, state and backends.

``service.VMService`` is the one entry point for the HTTP layer. This package
imports nothing heavy on purpose: the guest program (``guest.py``) imports
from it and must start fast.
"""
