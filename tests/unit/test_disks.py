"""Layered VM disks: which template layers are kept, which are collected, old full copies.

Mounting (loop, overlay) needs root and a real kernel: tests/system/test_sandbox_disk.py.
"""

from __future__ import annotations

from pathlib import Path

from scalebox.daemon.vms import disks


def template(data: Path, name: str) -> Path:
    disk = data / "templates" / name / "disk"
    (disk / "etc").mkdir(parents=True)
    return disk


def vm_using(data: Path, vm_id: str, disk: Path) -> None:
    vm_dir = data / "vms" / vm_id
    vm_dir.mkdir(parents=True)
    (vm_dir / disks.LAYER_FILE).write_text(disks.layer_of(disk) + "\n")


def test_a_retired_template_stays_while_a_vm_names_it_and_goes_with_the_last_one(
    tmp_path: Path,
) -> None:
    used, unused = template(tmp_path, "snap"), template(tmp_path, "other")
    vm_using(tmp_path, "vm-0123456789ab", used)
    disks.retire_tree(used.parent, tmp_path)
    disks.retire_tree(unused.parent, tmp_path)
    assert len(list((tmp_path / "layers").iterdir())) == 2  # retired, not yet collected
    [removed] = disks.collect_layers(tmp_path)
    assert removed.name.startswith("other-")
    kept = list((tmp_path / "layers").iterdir())
    assert len(kept) == 1 and (kept[0] / "disk/etc").is_dir()  # only the one in use
    found = disks.find_layer(tmp_path, "snap", disks.layer_of(kept[0] / "disk"))
    assert found == kept[0] / "disk"
    disks.remove_tree(tmp_path / "vms/vm-0123456789ab")
    assert disks.collect_layers(tmp_path) == kept
    assert list((tmp_path / "layers").iterdir()) == []


def test_a_vm_being_made_keeps_its_layer_too(tmp_path: Path) -> None:
    disk = template(tmp_path, "snap")
    vm_using(tmp_path, ".tmp-vm-0123456789ab", disk)
    disks.retire_tree(disk.parent, tmp_path)
    assert disks.collect_layers(tmp_path) == []
    assert len(list((tmp_path / "layers").iterdir())) == 1


def test_a_layer_is_found_by_identity_not_by_name(tmp_path: Path) -> None:
    old = template(tmp_path, "debian-base")
    vm_using(tmp_path, "vm-0123456789ab", old)
    ident = disks.layer_of(old)
    disks.retire_tree(old.parent, tmp_path)
    new = template(tmp_path, "debian-base")  # rebuilt under the same name
    found = disks.find_layer(tmp_path, "debian-base", ident)
    assert found is not None and found != new and found.parent.parent == tmp_path / "layers"


def test_a_vm_made_before_layered_disks_is_a_full_copy(tmp_path: Path) -> None:
    vm_dir = tmp_path / "vm"
    (vm_dir / "disk/etc").mkdir(parents=True)
    assert disks.is_full_copy(vm_dir)
    (vm_dir / disks.IMAGE).write_bytes(b"")
    assert not disks.is_full_copy(vm_dir)
