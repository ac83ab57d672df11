"""The nitro_host role's vsock-proxy allowlist and extra units, held to AWS's packaging facts.

The facts (data/aws_vsock_proxy.yml) were read from aws/aws-nitro-enclaves-cli; the templates are
rendered with Jinja as the role renders them, and the result is parsed back.
"""

from __future__ import annotations

import configparser
from pathlib import Path

import jinja2
import pytest
import yaml
from ansible.errors import AnsibleFilterError
from ansible_collections.enclaveops.nitro.plugins.filter.vsock_proxy import (
    FilterModule,
    vsock_proxy_allowlist,
    vsock_proxy_instances,
)

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE.parents[3] / "roles" / "nitro_host" / "templates"
AWS = yaml.safe_load((HERE / "data" / "aws_vsock_proxy.yml").read_text())


def render(name: str, **variables: object) -> str:
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES))
    for filter_name, function in FilterModule().filters().items():
        environment.filters[f"enclaveops.nitro.{filter_name}"] = function
    return environment.get_template(name).render(ansible_managed="managed", **variables)


def allowlist_file(region: str, extra: list, proxies: list) -> dict:
    return yaml.safe_load(
        render(
            "vsock-proxy.yaml.j2",
            nitro_host_vsock_proxy_region=region,
            nitro_host_vsock_proxy_allowlist=extra,
            nitro_host_vsock_proxies=proxies,
        )
    )


def stock_target(region: str) -> dict:
    """The target of the stock nitro-enclaves-vsock-proxy.service in ``region``."""
    words = AWS["stock_service"]["exec"].split()
    return {"address": words[2].replace("$${REGION}", region), "port": int(words[3])}


@pytest.mark.parametrize("region", ["eu-south-2", "us-east-1", "il-central-1"])
def test_the_allowlist_keeps_the_stock_services_kms_target(region: str) -> None:
    rendered = allowlist_file(region, [{"address": "api.example.com", "port": 443}], [])
    assert stock_target(region) in rendered["allowlist"]
    assert {"address": f"kms-fips.{region}.amazonaws.com", "port": 443} in rendered["allowlist"]
    assert {"address": "api.example.com", "port": 443} in rendered["allowlist"]


def test_a_region_missing_from_awss_stock_file_still_gets_its_kms() -> None:
    assert "eu-south-2" not in AWS["stock_allowlist"]["regions"]
    assert allowlist_file("eu-south-2", [], [])["allowlist"][0] == stock_target("eu-south-2")


def test_the_rendered_file_has_awss_format() -> None:
    stock = yaml.safe_load(AWS["stock_allowlist"]["head"])
    ours = allowlist_file("us-east-2", [], [])
    assert set(ours) == set(stock) == {"allowlist"}
    assert ours["allowlist"][:2] == stock["allowlist"][:2]
    assert all(set(entry) == {"address", "port"} for entry in ours["allowlist"])


def test_extra_proxies_join_the_allowlist_once() -> None:
    proxies = [{"local_port": 8001, "address": "kms.eu-west-1.amazonaws.com", "port": 443}]
    extra = [{"address": "kms.eu-west-1.amazonaws.com", "port": 443}]
    entries = vsock_proxy_allowlist(extra, "eu-central-1", proxies)
    assert entries.count({"address": "kms.eu-west-1.amazonaws.com", "port": 443}) == 1
    assert entries[0] == stock_target("eu-central-1")


def test_an_extra_proxy_unit_runs_vsock_proxy_like_the_stock_unit() -> None:
    [instance] = vsock_proxy_instances(
        [{"local_port": 8101, "address": "secrets.example.com", "port": 8443}]
    )
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read_string(render("vsock-proxy-instance.service.j2", item=instance))
    exec_start = unit["Service"]["ExecStart"].split()
    assert exec_start[:4] == ["/usr/bin/vsock-proxy", "8101", "secrets.example.com", "8443"]
    options = dict(zip(exec_start[4::2], exec_start[5::2]))
    assert set(options) <= set(AWS["vsock_proxy_cli"]["options"])
    assert options["--config"] == AWS["vsock_proxy_cli"]["config_default"]
    assert options["--num_workers"] == str(AWS["vsock_proxy_cli"]["num_workers_default"])
    stock = AWS["stock_service"]["unit"]
    for section in ("Unit", "Service", "Install"):
        for key, value in unit[section].items():
            if key in stock:
                assert value == stock[key], key
    assert {key for section in unit.sections() for key in unit[section]} >= set(stock)
    assert instance["unit"] == "enclaveops-vsock-proxy-8101"


@pytest.mark.parametrize(
    ("proxies", "message"),
    [
        ([{"local_port": 8000, "address": "a", "port": 443}], "local_port: 8000 is already"),
        (
            [{"local_port": 8001, "address": "a", "port": 1}] * 2,
            "nitro_host_vsock_proxies[1].local_port: 8001 is already taken",
        ),
        ([{"local_port": 8001, "address": "a", "port": 0}], "[0].port: 0 is not a TCP port"),
        ([{"local_port": 8001, "port": 443}], "[0]: give address"),
    ],
)
def test_bad_proxies_are_refused_naming_the_field(proxies: list, message: str) -> None:
    with pytest.raises(AnsibleFilterError) as caught:
        vsock_proxy_instances(proxies)
    assert message in str(caught.value)


@pytest.mark.parametrize("region", ["", "EU-WEST-1", "kms.eu-west-1", None])
def test_a_missing_or_malformed_region_is_refused(region: object) -> None:
    with pytest.raises(AnsibleFilterError) as caught:
        vsock_proxy_allowlist([], region)  # type: ignore[arg-type]
    assert "nitro_host_vsock_proxy_region" in str(caught.value)
