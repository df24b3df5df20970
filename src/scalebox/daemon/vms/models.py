"""The data that crosses module lines: VM and Template (re-exported by service.py)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime


def now_iso() -> str:
    """UTC time as the old daemon wrote it (JavaScript's toISOString)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class RecordError(ValueError):
    """A saved VM record is not what ``VM.to_record`` writes."""


@dataclass(frozen=True)
class VM:
    id: str
    name: str
    template: str
    ip: str
    ssh_port: int
    status: str
    created_at: str
    vcpu_count: int
    mem_size_mib: int
    disk_size_gib: int
    ssh_public_key: str = ""
    # The guest's process id as last seen (process backend: recorded at start;
    # systemd: the unit's MainPID). None when not running or unknown.
    pid: int | None = None
    # nspawn backend: the VM's own address on its veth (``ip`` is HOST_IP,
    # where users connect). Empty on the process backend.
    guest_ip: str = ""
    # nspawn backend: the first host UID of the VM's 65536 (its root's UID on
    # the host, see idmap.py); 0 when it runs without a user namespace.
    uid_base: int = 0

    def to_api(self, host_ip: str, vm_domain: str) -> dict[str, object]:
        """The VM object of the API contract."""
        return {
            "id": self.id,
            "name": self.name,
            "template": self.template,
            "ip": self.ip,
            "ssh_port": self.ssh_port,
            "ssh": f"ssh -p {self.ssh_port} user@{host_ip}",
            "url": f"https://{self.name}.{vm_domain}" if vm_domain else None,
            "status": self.status,
            "created_at": self.created_at,
        }

    def to_record(self) -> dict[str, object]:
        """What is saved in state.json and vm.json: everything but the live status."""
        return {
            "id": self.id,
            "name": self.name,
            "template": self.template,
            "ip": self.ip,
            "ssh_port": self.ssh_port,
            "created_at": self.created_at,
            "vcpu_count": self.vcpu_count,
            "mem_size_mib": self.mem_size_mib,
            "disk_size_gib": self.disk_size_gib,
            "ssh_public_key": self.ssh_public_key,
            "pid": self.pid,
            "guest_ip": self.guest_ip,
            "uid_base": self.uid_base,
        }

    @classmethod
    def from_record(cls, record: object) -> VM:
        """Rebuild a VM from ``to_record``'s output; RecordError says what is wrong."""
        if not isinstance(record, dict):
            raise RecordError(f"a VM record must be an object, not {type(record).__name__}")
        values: dict[str, object] = {}
        for field, kind in _RECORD_FIELDS.items():
            value = record.get(field)
            if field == "pid" and value is None:
                values[field] = None
                continue
            if not isinstance(value, kind) or isinstance(value, bool):
                raise RecordError(f"VM record field {field!r} is missing or not a {kind.__name__}")
            values[field] = value
        for field, default in _OPTIONAL_FIELDS.items():
            # Added after format 1 was released: older records lack them.
            value = record.get(field, default)
            if not isinstance(value, type(default)) or isinstance(value, bool):
                raise RecordError(f"VM record field {field!r} is not a {type(default).__name__}")
            values[field] = value
        return cls(status="unknown", **values)  # type: ignore[arg-type]


_RECORD_FIELDS: dict[str, type] = {
    "id": str,
    "name": str,
    "template": str,
    "ip": str,
    "ssh_port": int,
    "created_at": str,
    "vcpu_count": int,
    "mem_size_mib": int,
    "disk_size_gib": int,
    "ssh_public_key": str,
    "pid": int,
}
_OPTIONAL_FIELDS: dict[str, object] = {"guest_ip": "", "uid_base": 0}


@dataclass(frozen=True)
class Template:
    name: str
    size_bytes: int
    created_at: str
    protected: bool

    def to_api(self) -> dict[str, object]:
        """The template object of the API contract."""
        return {"name": self.name, "size_bytes": self.size_bytes, "created_at": self.created_at}
