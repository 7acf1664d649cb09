#!/usr/bin/env python3
"""Drives an mtunnel target the way a PVE-minded Python user would, with proxmoxer.

Run by tests/proxmoxer.rs as: proxmoxer_test.py HOST PORT NODE TOKEN_SECRET
(the token is root@pam!mtunnel). Prints OK at the end; any failed check raises.
"""

import sys

import urllib3
from proxmoxer import ProxmoxAPI, ResourceException
from proxmoxer.tools import Tasks


def main():
    host, port, node, secret = sys.argv[1:5]
    # The target's certificate is self-signed; PVE users pin it, proxmoxer can only switch
    # verification off.
    urllib3.disable_warnings()
    px = ProxmoxAPI(
        host,
        port=int(port),
        user="root@pam",
        token_name="mtunnel",
        token_value=secret,
        verify_ssl=False,
    )

    version = px.version.get()
    assert version["repoid"] == "mtunnel", version

    local = [n for n in px.cluster.status.get() if n["type"] == "node" and n["local"] == 1]
    assert [n["name"] for n in local] == [node], local

    # Python booleans arrive as "True"/"False".
    storages = px.nodes(node).storage.get(enabled=True, content="images")
    assert [s["storage"] for s in storages] == ["local"], storages

    # What Datacenter Manager asks before a migration (on node "localhost" too).
    assert px.cluster.nextid.get() == "100", "nextid is a string, as PVE's"
    bridges = px.nodes("localhost").network.get(type="any_bridge")
    assert "vmbr0" in [b["iface"] for b in bridges], bridges
    assert all(b["type"] == "bridge" for b in bridges), bridges
    perms = px.access.permissions.get(path="/")
    assert perms["/"]["Sys.Incoming"] == 1, perms
    assert px.cluster.qemu("custom-cpu-models").get() == []

    # Open a tunnel.
    tunnel = px.nodes(node).qemu(100).mtunnel.post(storages="local", bridges="vmbr0")
    assert px.cluster.nextid.get() == "101", "an open tunnel reserves its VMID"
    assert sorted(tunnel) == ["socket", "ticket", "upid"], tunnel
    upid = tunnel["upid"]
    assert tunnel["socket"].endswith("/100.mtunnel"), tunnel
    assert tunnel["ticket"].startswith("PVETUNNEL:"), tunnel

    decoded = Tasks.decode_upid(upid)
    assert decoded["node"] == node, decoded
    assert decoded["type"] == "qmtunnel", decoded
    assert decoded["id"] == "100", decoded
    assert decoded["user"] == "root@pam", decoded
    assert decoded["comment"] == "", decoded

    # The UPID goes into the path raw (':', '@', '!' unescaped).
    status = px.nodes(node).tasks(upid).status.get()
    assert status["status"] == "running", status
    assert status["upid"] == upid, status
    assert status["pid"] == decoded["pid"], status
    assert status["starttime"] == decoded["starttime"], status
    assert status["user"] == "root@pam", status
    assert status["tokenid"] == "mtunnel", status

    log = px.nodes(node).tasks(upid).log.get(start=0, limit=50)
    assert log[0] == {"n": 1, "t": "mtunnel started"}, log
    assert Tasks.decode_log(log) == "mtunnel started", log

    # The VMID is taken now: 400, with the message as the reason phrase.
    try:
        px.nodes(node).qemu(100).mtunnel.post(storages="local")
        raise AssertionError("a second tunnel for VM 100 was opened")
    except ResourceException as e:
        assert e.status_code == 400, e
        assert e.status_message == "Bad Request", e
        assert e.content == "Parameter verification failed.", e
        want = f"unable to create empty VM config - VM 100 already exists on node '{node}'"
        assert e.errors == {"vmid": want}, e.errors
        assert str(e) == f"400 Bad Request: Parameter verification failed. - {{'vmid': \"{want}\"}}", str(e)

    # Stop the waiting worker and block until it is stopped.
    assert px.nodes(node).tasks(upid).delete() is None
    final = Tasks.blocking_status(px, upid, timeout=10, polling_interval=0.1)
    assert final is not None, "task did not stop within 10 s"
    assert final["status"] == "stopped", final
    assert final["exitstatus"] == "received interrupt", final

    # With the reserved config gone, the VMID can be opened again.
    again = px.nodes(node).qemu(100).mtunnel.post()
    assert again["upid"] != upid, again

    print("OK")


if __name__ == "__main__":
    main()
