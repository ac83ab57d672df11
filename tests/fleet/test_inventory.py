"""inventory/aws_ec2.yml with the real amazon.aws.aws_ec2 plugin, against moto's EC2 API."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml

from tests.fleet.bed import REPO_ROOT, SUBNET, Bed

VENV_BIN = Path(sys.executable).parent
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# The bed's hosts as EC2 instances: (name, private address, enclave-enabled, tags).
INSTANCES = [
    ("p1", f"{SUBNET}.11", True, {"enclaveops:app": "hello", "enclaveops:os": "al2023"}),
    ("p2", f"{SUBNET}.12", True, {"enclaveops:app": "hello", "enclaveops:os": "ubuntu"}),
    ("p3", f"{SUBNET}.13", True, {"enclaveops:app": "payments", "enclaveops:os": "al2023"}),
    ("builder", f"{SUBNET}.14", False, {"enclaveops:role": "builder"}),
]


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.fleet.moto_ec2", "-H", "127.0.0.1", "-p", str(port)],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            assert server.poll() is None, "moto's server exited"
            assert time.monotonic() < deadline, "moto's server did not answer within 60 s"
            time.sleep(0.2)
        endpoint = f"http://127.0.0.1:{port}"
        _launch(endpoint)
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=10)


def _launch(endpoint: str) -> None:
    ec2 = boto3.client("ec2", endpoint_url=endpoint, region_name="us-east-1", **_keys())
    vpc = ec2.create_vpc(CidrBlock=f"{SUBNET}.0/24")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock=f"{SUBNET}.0/24")["Subnet"]["SubnetId"]
    image = ec2.describe_images()["Images"][0]["ImageId"]
    unmanaged = [("stray", f"{SUBNET}.30", True, {"enclaveops:managed": "false"})]
    for name, address, enclaves, own_tags in INSTANCES + unmanaged:
        tags = {"enclaveops:managed": "true", "Name": name, **own_tags}
        ec2.run_instances(
            ImageId=image,
            MinCount=1,
            MaxCount=1,
            InstanceType="m5.xlarge",
            SubnetId=subnet,
            PrivateIpAddress=address,
            EnclaveOptions={"Enabled": enclaves},
            TagSpecifications=[
                {
                    "ResourceType": "instance",
                    "Tags": [{"Key": k, "Value": v} for k, v in tags.items()],
                }
            ],
        )


def _keys() -> dict[str, str]:
    return {
        "aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    }


@pytest.fixture
def inventory(moto_endpoint: str, tmp_path: Path) -> Path:
    """inventory/aws_ec2.yml and its group_vars, pointed at moto, plus one application override."""
    config = yaml.safe_load((REPO_ROOT / "inventory" / "aws_ec2.yml").read_text())
    config.update({"regions": ["us-east-1"], "endpoint_url": moto_endpoint})
    (tmp_path / "aws_ec2.yml").write_text(yaml.safe_dump(config))
    shutil.copytree(REPO_ROOT / "inventory" / "group_vars", tmp_path / "group_vars")
    (tmp_path / "group_vars" / "enclave_app_payments.yml").write_text(
        "nitro_host_allocator_cpu_count: 3\nnitro_host_backend: emulator\n"
    )
    return tmp_path / "aws_ec2.yml"


def _inventory(inventory: Path, *args: str) -> str:
    result = subprocess.run(
        [str(VENV_BIN / "ansible-inventory"), "-i", str(inventory), *args],
        cwd=REPO_ROOT,
        env={**os.environ, **CREDENTIALS, "ANSIBLE_CONFIG": str(REPO_ROOT / "ansible.cfg")},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Invalid group name" not in result.stderr
    return result.stdout


def _plain(value: Any) -> Any:
    """ansible-inventory's JSON without its markers of unsafe (inventory-sourced) strings."""
    if isinstance(value, dict):
        if set(value) == {"__ansible_unsafe"}:
            return value["__ansible_unsafe"]
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def test_the_fleet_inventory_groups_as_documented(inventory: Path) -> None:
    listing = json.loads(_inventory(inventory, "--list"))
    hosts_of = {group: set(listing.get(group, {}).get("hosts", [])) for group in listing}
    parents = {address for _, address, enclaves, _ in INSTANCES if enclaves}
    assert hosts_of["nitro_parents"] == parents
    assert hosts_of["nitro_builders"] == {f"{SUBNET}.14"}
    assert hosts_of["enclave_app_hello"] == {f"{SUBNET}.11", f"{SUBNET}.12"}
    assert hosts_of["enclave_app_payments"] == {f"{SUBNET}.13"}
    assert hosts_of["os_ubuntu"] == {f"{SUBNET}.12"}
    assert f"{SUBNET}.30" not in listing["_meta"]["hostvars"], "an unmanaged instance is listed"
    assert "@nitro_parents:" in _inventory(inventory, "--graph")


def test_group_vars_override_what_compose_leaves_to_them(inventory: Path) -> None:
    hostvars = _plain(json.loads(_inventory(inventory, "--list"))["_meta"]["hostvars"])
    for _, address, _, _ in INSTANCES:
        assert hostvars[address]["ansible_host"] == address
    merged = {
        address: _plain(json.loads(_inventory(inventory, "--host", address)))
        for _, address, _, _ in INSTANCES
    }
    assert merged[f"{SUBNET}.11"]["ansible_user"] == "ec2-user"
    assert merged[f"{SUBNET}.12"]["ansible_user"] == "ubuntu"
    assert merged[f"{SUBNET}.13"]["nitro_host_allocator_cpu_count"] == 3
    assert merged[f"{SUBNET}.13"]["nitro_host_backend"] == "emulator"
    assert merged[f"{SUBNET}.11"]["nitro_host_backend"] == "nitro"


def test_ansible_reaches_the_bed_through_the_ec2_inventory(bed: Bed, inventory: Path) -> None:
    result = bed.ansible(
        "ansible",
        "aws_ec2",
        "-m",
        "ansible.builtin.ping",
        "-e",
        json.dumps(
            {
                "ansible_user": "root",
                "ansible_become": False,
                "ansible_ssh_private_key_file": str(bed.key),
                "ansible_python_interpreter": "/usr/bin/python3",
            }
        ),
        inventory=inventory,
        extra_env=CREDENTIALS,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert result.stdout.count("SUCCESS") == len(bed.hosts), result.stderr
