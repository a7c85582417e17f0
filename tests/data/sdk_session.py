"""A session of the official hypeman SDK (PyPI `hypeman`) against hypemand's
REST API on a unix socket, through an httpx transport over the socket.

usage: sdk_session.py SOCKET MODE
  MODE admin:  the whole session on the L4 host (tests/rest.rs starts it);
  MODE member: a create that polkit grants (group hypeman), then its delete;
  MODE plain:  a create that polkit refuses: the SDK's PermissionDeniedError.

Prints one line per step; any failed expectation raises, and the exit
status is not 0.
"""
import sys

import httpx
import hypeman

sock, mode = sys.argv[1], sys.argv[2]
client = hypeman.Hypeman(
    base_url="http://hypemand",
    api_key="unused-on-a-local-socket",
    max_retries=0,
    http_client=hypeman.DefaultHttpxClient(transport=httpx.HTTPTransport(uds=sock)),
)


def expect(exc, status, fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except exc as e:
        assert e.status_code == status, (exc.__name__, e.status_code)
        body = e.body if isinstance(e.body, dict) else {}
        assert body.get("code") and body.get("message"), e.body
        print(f"{exc.__name__} {status} {body['code']}: {body['message']}")
        return
    raise AssertionError(f"expected {exc.__name__} from {fn.__name__}{args}")


if mode == "plain":
    before = len(client.devices.list())
    expect(hypeman.PermissionDeniedError, 403, client.devices.create, pci_address="0000:3b:00.0", name="plain")
    assert len(client.devices.list()) == before, "a refused create registered something"
    sys.exit(0)

if mode == "member":
    d = client.devices.create(pci_address="0000:3b:00.0", name="member-nic")
    print("created", d.id, d.name)
    client.devices.delete(d.id)
    print("deleted")
    sys.exit(0)

assert mode == "admin", mode
gpu = client.devices.create(pci_address="0000:a2:00.0", name="l4-gpu")
assert isinstance(gpu, hypeman.types.Device)
assert (gpu.name, gpu.iommu_group, gpu.type, gpu.bound_to_vfio) == ("l4-gpu", 82, "gpu", False), gpu
print("created with a name:", gpu.id)
nic = client.devices.create(pci_address="0000:3b:00.0")
assert nic.name == "pci-0000-3b-00-0", nic.name
print("created without a name:", nic.name)
nvme = client.devices.create(
    pci_address="0000:5e:00.0", name="nvme", tags={"team": "ml", "env": "prod"}
)
assert nvme.tags == {"team": "ml", "env": "prod"}, nvme.tags
print("created with tags:", nvme.tags)

listed = client.devices.list()
assert sorted(d.name for d in listed) == ["attached", "l4-gpu", "nvme", "pci-0000-3b-00-0"], listed
tagged = client.devices.list(tags={"team": "ml"})
assert [d.name for d in tagged] == ["nvme"], tagged
assert client.devices.list(tags={"team": "ml", "env": "dev"}) == []
print("listed, and listed by tags")

assert client.devices.retrieve(gpu.id).name == "l4-gpu"
assert client.devices.retrieve("l4-gpu").id == gpu.id
print("retrieved by id and by name")

available = client.devices.list_available()
assert sorted(a.pci_address for a in available) == [
    "0000:3b:00.0", "0000:3b:00.1", "0000:5e:00.0", "0000:a2:00.0"
], available
assert all(isinstance(a.iommu_group, int) for a in available)
print("list_available:", len(available), "passable functions")

expect(hypeman.ConflictError, 409, client.devices.create, pci_address="0000:a2:00.0")
expect(hypeman.ConflictError, 409, client.devices.create, pci_address="0000:a0:00.0")
expect(hypeman.NotFoundError, 404, client.devices.retrieve, "no-such-device")
expect(hypeman.NotFoundError, 404, client.devices.delete, "no-such-device")
expect(hypeman.NotFoundError, 404, client.devices.create, pci_address="0000:ff:1f.7")
expect(hypeman.BadRequestError, 400, client.devices.create, pci_address="not-an-address")
expect(hypeman.BadRequestError, 400, client.devices.create, pci_address="0000:3b:00.0", name="bad name!")
expect(hypeman.BadRequestError, 400, client.devices.create, pci_address="0000:5e:00.0", tags={"bad key!": "x"})
# Attached by the test over D-Bus before this session: in use.
expect(hypeman.ConflictError, 409, client.devices.delete, "attached")

assert client.devices.delete(nic.id) is None
assert sorted(d.name for d in client.devices.list()) == ["attached", "l4-gpu", "nvme"]
print("deleted")
