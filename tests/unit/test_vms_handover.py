"""The handover instance's VM service (scaleboxd --handover): it reads, it never writes.

Real files and real guest processes under tmp_path: a main VMService makes
and deletes VMs while a read-only one beside it, on the same DATA_DIR, sees
each change through state.json and refuses every change of its own with a
retryable 503, leaving DATA_DIR exactly as it was.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from scalebox.config import ServerConfig
from scalebox.daemon.vms.service import HandingOver, VMService

from .test_vms import config, guests, service, snapshot_of  # noqa: F401  (fixtures)

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBvY6iHp0l8tMIW2RwA5d6kXyP1u7oSxDpvq2EN0lJ8k test"


def _reader(config: ServerConfig) -> VMService:  # noqa: F811
    reader = VMService(
        config, logging.getLogger("test.handover"), use_systemd=False, read_only=True
    )
    reader.start()
    return reader


def test_read_only_service_follows_the_main_one_through_state_json(
    config: ServerConfig,  # noqa: F811
    service: VMService,  # noqa: F811
) -> None:
    reader = _reader(config)
    assert reader.list_vms() == []
    made = service.create_vm(template="debian-base", ssh_public_key=KEY, name="one")
    assert [vm.id for vm in reader.list_vms()] == [made.id]
    assert reader.get_vm("one").id == made.id
    service.delete_vm(made.id)
    assert reader.list_vms() == []


def test_read_only_service_refuses_every_change_and_writes_nothing(
    config: ServerConfig,  # noqa: F811
    service: VMService,  # noqa: F811
) -> None:
    made = service.create_vm(template="debian-base", ssh_public_key=KEY, name="kept")
    before = snapshot_of(config.data_dir)
    state_before = (config.data_dir / "state.json").stat().st_mtime_ns
    reader = _reader(config)
    changes = [
        lambda: reader.create_vm(template="debian-base", ssh_public_key=KEY),
        lambda: reader.delete_vm(made.id),
        lambda: reader.snapshot_vm(made.id, "snap"),
        lambda: reader.delete_template("snap"),
    ]
    for change in changes:
        with pytest.raises(HandingOver) as refused:
            change()
        assert refused.value.status == 503
        assert refused.value.retry_after == 1
    reader.close()
    assert snapshot_of(config.data_dir) == before
    assert (config.data_dir / "state.json").stat().st_mtime_ns == state_before
    assert Path(config.data_dir / "vms" / made.id).is_dir()
