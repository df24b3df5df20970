"""Every route of the API contract and every error code it lists, on a real scaleboxd."""

from __future__ import annotations

import json
import re
import socket
from typing import Any

import httpx
import pytest

import scalebox
from tests.api.conftest import SSH_KEY, assert_error, guest_answer, raw_request, state_of
from tests.conftest import Scaleboxd

VM_KEYS = {"id", "name", "template", "ip", "ssh_port", "ssh", "url", "status", "created_at"}


def test_health_reports_ok_and_the_version(scaleboxd: Scaleboxd) -> None:
    with scaleboxd.client(token="") as client:
        response = client.get("/health")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"
    if scaleboxd.local:
        assert response.json()["version"] == scalebox.__version__
    else:
        assert re.fullmatch(r"\d+\.\d+\.\d+\S*", response.json()["version"])


def test_info_needs_no_token_and_has_the_contract_fields(scaleboxd: Scaleboxd) -> None:
    with scaleboxd.client(token="") as client:
        response = client.get("/info")
    assert response.status_code == 200
    info = response.json()
    for key in ("host_ip", "api_domain", "vm_domain", "templates_count", "vms_count"):
        assert key in info
    assert set(info["storage"]) == {"total_gb", "used_gb", "free_gb"}
    assert set(info["memory"]) == {"total_gb", "free_gb"}
    assert isinstance(info["cpu_percent"], int | float)
    assert info["templates_count"] >= 1


def test_openapi_document_lists_every_route(scaleboxd: Scaleboxd) -> None:
    with scaleboxd.client(token="") as client:
        response = client.get("/openapi.json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    for path in ("/health", "/info", "/caddy/check", "/templates", "/vms"):
        assert path in paths
    assert any(p.startswith("/vms/") and p.endswith("/snapshot") for p in paths)


def test_unknown_route_and_wrong_method_are_json_errors(scaleboxd: Scaleboxd) -> None:
    with scaleboxd.client() as client:
        assert_error(client.get("/no-such-route"), 404, "/no-such-route")
        assert_error(client.post("/health"), 405, "POST")
        assert_error(client.put("/vms"), 405, "PUT")
        # A 405 says which methods the route takes (RFC 9110).
        assert client.post("/info").headers["allow"] == "GET, HEAD"
        assert set(client.put("/vms").headers["allow"].split(", ")) == {"GET", "HEAD", "POST"}


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nno colon in this header\r\n\r\n",
    ],
)
def test_what_is_not_http_gets_a_json_400(scaleboxd: Scaleboxd, request_bytes: bytes) -> None:
    """uvicorn answered these in plain text ("Invalid HTTP request received.")."""
    url = httpx.URL(scaleboxd.url)
    if url.scheme != "http":
        pytest.skip("sends raw bytes over a plain socket; SCALEBOX_URL is not http://")
    with socket.create_connection((url.host, url.port or 80), timeout=10) as conn:
        conn.sendall(request_bytes)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), head
    assert b"content-type: application/json" in head.lower()
    assert json.loads(body)["error"] == "invalid HTTP request: it could not be read as HTTP/1.1"


def test_health_answers_head_and_a_trailing_slash_is_not_redirected(scaleboxd: Scaleboxd) -> None:
    with scaleboxd.client(token="") as client:
        head = client.head("/health")
        assert head.status_code == 200 and head.content == b""
        # Every route that reads answers HEAD as GET, without the body (HTTP asks it).
        for path in ("/info", "/caddy/check?domain=x"):
            assert client.head(path).status_code == client.get(path).status_code
    with scaleboxd.client() as client:
        for path in ("/templates", "/vms", "/vms/no-such-vm"):
            head, get = client.head(path), client.get(path)
            assert (head.status_code, head.content) == (get.status_code, b""), path
        # Was a 307 to http://<the request's Host header>/health.
        slash = client.get("/health/", headers={"Host": "evil.example"})
        assert slash.status_code == 404 and "location" not in slash.headers
        assert slash.json()["error"] == "no such route: GET /health/"


def test_templates_list_has_the_protected_base(scaleboxd: Scaleboxd) -> None:
    with scaleboxd.client() as client:
        response = client.get("/templates")
    assert response.status_code == 200
    templates = {t["name"]: t for t in response.json()["templates"]}
    base = templates["debian-base"]
    assert {"name", "size_bytes", "created_at"} <= set(base)
    assert isinstance(base["size_bytes"], int)


def test_delete_template_errors(scaleboxd: Scaleboxd) -> None:
    before = state_of(scaleboxd)
    with scaleboxd.client() as client:
        assert_error(client.delete("/templates/debian-base"), 403, "protected")
        assert_error(client.delete("/templates/no-such-template"), 404, "not found")
        assert_error(client.delete("/templates/bad.name"), 400, "template name")
    assert_error(raw_request(scaleboxd, "DELETE", "/templates/a%2Fb"), 400, "template name")
    assert_error(raw_request(scaleboxd, "DELETE", "/templates/../../etc"), 400)
    assert state_of(scaleboxd) == before


def test_vm_lifecycle_create_get_list_snapshot_delete(scaleboxd: Scaleboxd, make_vm: Any) -> None:
    vm = make_vm(name="api-test-vm", vcpu_count=1, mem_size_mib=128, disk_size_gib=1)
    assert set(vm) == VM_KEYS
    assert re.fullmatch(r"vm-[0-9a-f]{12}", vm["id"])
    assert vm["name"] == "api-test-vm"
    assert vm["template"] == "debian-base"
    assert vm["status"] == "running"
    assert vm["ssh"].startswith(f"ssh -p {vm['ssh_port']} user@")
    if scaleboxd.local:
        assert vm["ssh"] == f"ssh -p {vm['ssh_port']} user@127.0.0.1"
        assert vm["url"] == "https://api-test-vm.vms.test"
        assert guest_answer(scaleboxd, vm["ssh_port"]) == {
            "vm": vm["id"],
            "file": "hello from debian-base\n",
        }

    with scaleboxd.client() as client:
        assert client.get(f"/vms/{vm['id']}").json()["id"] == vm["id"]
        assert client.get("/vms/api-test-vm").json()["id"] == vm["id"]
        # Names are unique regardless of case (as in DNS): any case finds the VM.
        assert client.get("/vms/API-Test-VM").json()["id"] == vm["id"]
        assert vm["id"] in [v["id"] for v in client.get("/vms").json()["vms"]]

        snap = client.post(f"/vms/{vm['id']}/snapshot", json={"template_name": "api-test-snap"})
        assert snap.status_code == 201, snap.text
        assert snap.json()["template"] == "api-test-snap"
        assert snap.json()["source_vm"] == vm["id"]
        assert isinstance(snap.json()["size_bytes"], int)
        assert snap.json()["created_at"]
        try:
            assert_error(
                client.post(f"/vms/{vm['id']}/snapshot", json={"template_name": "api-test-snap"}),
                409,
                "exists",
            )
            names = [t["name"] for t in client.get("/templates").json()["templates"]]
            assert "api-test-snap" in names
            child = make_vm(template="api-test-snap")
            if scaleboxd.local:
                answer = guest_answer(scaleboxd, child["ssh_port"])
                assert answer == {"vm": child["id"], "file": "hello from debian-base\n"}
            assert client.delete(f"/vms/{child['id']}").status_code == 204
        finally:
            assert client.delete("/templates/api-test-snap").status_code == 204
        assert_error(client.delete("/templates/api-test-snap"), 404)

        assert client.delete("/vms/api-test-vm").status_code == 204
        assert_error(client.get(f"/vms/{vm['id']}"), 404, "VM not found")
        assert_error(client.delete(f"/vms/{vm['id']}"), 404)
        assert vm["id"] not in [v["id"] for v in client.get("/vms").json()["vms"]]


def test_create_vm_domain_errors_leave_state_unchanged(scaleboxd: Scaleboxd) -> None:
    before = state_of(scaleboxd)
    body = {"template": "debian-base", "ssh_public_key": SSH_KEY}
    with scaleboxd.client() as client:
        assert_error(client.post("/vms", json={**body, "template": "nope"}), 404, "not found")
        assert_error(client.post("/vms", json={**body, "template": "a/b"}), 400, "template")
        assert_error(client.post("/vms", json={**body, "disk_size_gib": 0}), 400, "disk_size_gib")
        too_big = 101 if scaleboxd.local else 65537  # local: MAX_DISK_SIZE_GIB's default 100
        assert_error(
            client.post("/vms", json={**body, "disk_size_gib": too_big}),
            400,
            "disk_size_gib",
        )
    assert state_of(scaleboxd) == before


def test_snapshot_errors(scaleboxd: Scaleboxd, make_vm: Any) -> None:
    vm = make_vm()
    before = state_of(scaleboxd)
    with scaleboxd.client() as client:
        assert_error(client.post("/vms/vm-000000000000/snapshot", json={"template_name": "x"}), 404)
        assert_error(client.post(f"/vms/{vm['id']}/snapshot", json={}), 400, "template_name")
        assert_error(
            client.post(f"/vms/{vm['id']}/snapshot", json={"template_name": "../evil"}),
            400,
            "template_name",
        )
        assert_error(
            client.post(f"/vms/{vm['id']}/snapshot", json={"template_name": "debian-base"}),
            409,
        )
    assert state_of(scaleboxd) == before


def test_caddy_check_answers_for_known_vm_names_only(scaleboxd: Scaleboxd, make_vm: Any) -> None:
    scaleboxd.require_local("needs VM_DOMAIN=vms.test, set by the test config")
    vm = make_vm()
    with scaleboxd.client(token="") as client:
        known = client.get("/caddy/check", params={"domain": f"{vm['name']}.vms.test"})
        assert known.status_code == 200 and known.content == b""
        # As a browser or Caddy may send it: host names are told apart regardless of
        # case and may end in a dot (was 404: no certificate for such a VM).
        for domain in (f"{vm['name'].upper()}.VMS.TEST", f"{vm['name']}.vms.test."):
            response = client.get("/caddy/check", params={"domain": domain})
            assert response.status_code == 200, domain
        for domain in ("unknown-name.vms.test", f"{vm['name']}.other.test", "", "vms.test"):
            response = client.get("/caddy/check", params={"domain": domain})
            assert response.status_code == 404 and response.content == b"", domain
        assert client.get("/caddy/check").status_code == 404


def test_caddy_check_is_404_without_vm_domain(fresh_scaleboxd: Scaleboxd) -> None:
    fresh_scaleboxd.require_local("rewrites the config")
    assert fresh_scaleboxd.config_path is not None
    text = fresh_scaleboxd.config_path.read_text().replace("VM_DOMAIN=vms.test", "VM_DOMAIN=")
    fresh_scaleboxd.config_path.write_text(text)
    fresh_scaleboxd.restart()
    with fresh_scaleboxd.client() as client:
        vm = client.post("/vms", json={"template": "debian-base", "ssh_public_key": SSH_KEY})
        assert vm.status_code == 201
        assert vm.json()["url"] is None
        response = client.get("/caddy/check", params={"domain": f"{vm.json()['name']}."})
        assert response.status_code == 404
