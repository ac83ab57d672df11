"""enclaver.yaml: upstream and fork compatibility, our extensions, every check and its message."""

from __future__ import annotations

import io
import json
import pickle
import sys
import textwrap
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from enclave_runtime.cli import manifest_cmd
from enclave_runtime.cli.enclaveops import main
from enclave_runtime.errors import FormatError
from enclave_runtime.formats import vsock_ports
from enclave_runtime.formats.manifest import (
    Api,
    AuxApi,
    Control,
    Defaults,
    Egress,
    Ingress,
    KmsProxy,
    Manifest,
    ManifestError,
    ManifestReadError,
    Runtime,
    Services,
    ServiceUnit,
    Signature,
    Sources,
    Spire,
    Tls,
    egress_rule_problem,
    format_path,
    load_manifest,
    manifest_schema,
    parse_manifest,
)

MANIFESTS = Path(__file__).parent / "data" / "manifests"
VALID_FIXTURES = sorted(
    path.name for path in MANIFESTS.glob("*.yaml") if "invalid" not in path.name
)

MINIMAL = """\
version: v1
name: hello
target: hello-enclave:latest
sources:
  app: hello:latest
"""


def manifest_with(extra: str) -> str:
    return MINIMAL + textwrap.dedent(extra)


def errors_of(text: str | dict[str, Any]) -> list[str]:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(text)
    return str(caught.value).splitlines()


def error_pairs(text: str | dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(text)
    return caught.value.errors


# --- upstream enclaver, the fork, and our extensions ------------------------------------------


def test_upstream_example_with_commented_out_allow_list_has_egress_switched_off() -> None:
    manifest = load_manifest(MANIFESTS / "upstream-hn.yaml")

    assert manifest.name == "example"
    assert manifest.sources == Sources(app="app:latest")
    assert manifest.defaults == Defaults(cpu_count=2, memory_mb=1500)
    assert manifest.ingress == (Ingress(8000),)
    assert manifest.egress == Egress(allow=(), deny=(), proxy_port=10000)
    assert not manifest.egress.enabled
    assert manifest.api is None
    assert manifest.aux_api is None


def test_upstream_kms_proxy_example_uses_public_kms_endpoints_by_default() -> None:
    manifest = load_manifest(MANIFESTS / "upstream-kms.yaml")

    assert manifest.kms_proxy == KmsProxy(listen_port=7123)
    assert manifest.kms_proxy.endpoint_for("eu-west-1") == "kms.eu-west-1.amazonaws.com"
    assert manifest.egress is not None
    assert manifest.egress.allow == ("kms.*.amazonaws.com", "169.254.169.254")
    assert manifest.sources.odyn == "odyn-dev:latest"
    assert manifest.sources.sleeve == "enclaver-wrapper-base:latest"


def test_every_upstream_key_is_read_into_the_typed_manifest() -> None:
    manifest = load_manifest(MANIFESTS / "upstream-full.yaml")

    assert manifest.signature == Signature(
        certificate="keys/signing-cert.pem", key="/etc/enclaver/keys/signing-key.pem"
    )
    assert manifest.ingress == (
        Ingress(8443, Tls(key_file="tls/key.pem", cert_file="tls/cert.pem")),
        Ingress(8080),
    )
    assert manifest.egress == Egress(
        allow=("**.amazonaws.com", "api.stripe.com", "169.254.169.254", "10.0.0.0/8"),
        deny=("10.0.13.0/24",),
        proxy_port=10080,
    )
    assert manifest.kms_proxy is not None
    assert manifest.kms_proxy.endpoint_for("us-east-1") == "kms-fips.us-east-1.amazonaws.com"
    assert manifest.api == Api(9000)
    assert manifest.spire == Spire(
        server_addr="https://host:8081",
        ca_cert="/etc/spire/ca.crt",
        trust_domain="example.org",
        svid_dir="/var/run/spiffe",
        workload_api_addr="127.0.0.1:5001",
    )


def test_relative_paths_resolve_beside_the_manifest_and_raw_values_are_kept() -> None:
    manifest = load_manifest(MANIFESTS / "upstream-full.yaml")
    assert manifest.signature is not None
    assert manifest.ingress[0].tls is not None

    assert manifest.resolve_path(manifest.signature.certificate) == (
        MANIFESTS.absolute() / "keys" / "signing-cert.pem"
    )
    assert manifest.resolve_path(manifest.signature.key) == Path(
        "/etc/enclaver/keys/signing-key.pem"
    )
    assert manifest.resolve_path(manifest.ingress[0].tls.cert_file) == (
        MANIFESTS.absolute() / "tls" / "cert.pem"
    )


def test_text_without_base_dir_resolves_against_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    manifest = parse_manifest(manifest_with("signature: {certificate: c.pem, key: k.pem}\n"))

    assert manifest.resolve_path("c.pem") == tmp_path / "c.pem"
    assert parse_manifest(MINIMAL, base_dir="/srv/app").resolve_path("k.pem") == Path(
        "/srv/app/k.pem"
    )


def test_fork_aux_api_with_explicit_port() -> None:
    manifest = load_manifest(MANIFESTS / "fork-aux-api.yaml")

    assert manifest.api == Api(9000)
    assert manifest.aux_api == AuxApi(9001)


def test_aux_api_without_port_defaults_to_api_port_plus_one() -> None:
    manifest = parse_manifest(manifest_with("api: {listen_port: 4000}\naux_api: {}\n"))

    assert manifest.aux_api == AuxApi(4001)


@pytest.mark.parametrize("aux", ["", "aux_api:\n", "aux_api: null\n"])
def test_aux_api_is_absent_unless_configured(aux: str) -> None:
    manifest = parse_manifest(manifest_with("api: {listen_port: 4000}\n" + aux))

    assert manifest.aux_api is None


def test_minimal_manifest_gets_every_default() -> None:
    manifest = parse_manifest(MINIMAL)

    assert manifest == Manifest(
        version="v1", name="hello", target="hello-enclave:latest", sources=Sources("hello:latest")
    )
    assert manifest.defaults == Defaults(cpu_count=2, memory_mb=4096)
    assert manifest.services == Services(
        directory="/etc/enclaver/services",
        log_directory="/var/log/enclave-services",
        max_log_size=1024 * 1024,
        max_log_files=5,
        units=(),
    )
    assert manifest.control == Control(
        unix_socket="/run/init.sock", vsock_port=9001, allowed_cids=(3,)
    )
    assert manifest.runtime == Runtime(log_buffer_size=131072)
    assert (manifest.egress, manifest.kms_proxy, manifest.signature, manifest.spire) == (
        None,
        None,
        None,
        None,
    )


def test_extensions_services_control_and_runtime() -> None:
    manifest = load_manifest(MANIFESTS / "extensions.yaml")
    services = manifest.services

    assert services.max_log_size == 2097152
    assert [unit.name for unit in services.units] == ["db", "migrate@1", "web"]
    assert services.unit("web") == ServiceUnit(
        name="web",
        exec_start="/usr/bin/python3 /app/server.py",
        environment=("PORT=8000", "REDIS_URL=redis://127.0.0.1:6379"),
        restart="on-failure",
        working_directory="/app",
        requires=("db",),
        after=("db",),
        kill_signal="SIGINT",
        timeout_stop_sec=30,
    )
    assert services.unit("web").environment_map == {
        "PORT": "8000",
        "REDIS_URL": "redis://127.0.0.1:6379",
    }
    db = services.unit("db")
    assert (db.restart, db.restart_sec, db.user, db.enable, db.kill_signal) == (
        "always",
        1.5,
        "redis",
        True,
        "SIGTERM",
    )
    assert services.unit("migrate@1").enable is False
    assert services.start_order() == ("db", "migrate@1", "web")
    assert manifest.control == Control("/run/init.sock", 9001, (3,))
    assert manifest.runtime == Runtime(262144)
    with pytest.raises(KeyError):
        services.unit("nope")


def test_yaml_is_read_as_yaml_1_2_like_enclaver() -> None:
    manifest = parse_manifest(
        manifest_with(
            """\
            ingress:
              - listen_port: 010
            services:
              units:
                web: {ExecStart: /web, Restart: no, User: 0o17}
            """
        )
    )

    assert manifest.ingress[0].listen_port == 10
    assert manifest.services.unit("web").restart == "no"
    assert manifest.services.unit("web").user == 15


def test_yaml_1_1_booleans_are_strings_and_so_not_booleans() -> None:
    errors = errors_of(
        manifest_with("services: {units: {web: {ExecStart: /w, ServiceEnable: yes}}}")
    )

    assert errors == [
        'services.units.web.ServiceEnable: expected a boolean (true or false), got "yes"'
    ]


def test_null_values_mean_absent_optional_keys() -> None:
    manifest = parse_manifest(
        manifest_with(
            """\
            signature:
            defaults: {cpu_count: null, memory_mb: 512}
            ingress:
            egress: {allow: [example.com], deny: null, proxy_port: null}
            services: {units: {web: {ExecStart: /w, Restart: null}}}
            control: {vsock_port: null}
            """
        )
    )

    assert manifest.signature is None
    assert manifest.defaults == Defaults(cpu_count=2, memory_mb=512)
    assert manifest.egress == Egress(allow=("example.com",), deny=(), proxy_port=10000)
    assert manifest.services.unit("web").restart == "no"
    assert manifest.control.vsock_port == 9001


def test_a_mapping_is_accepted_like_yaml_text() -> None:
    doc = {
        "version": "v1",
        "name": "hello",
        "target": "t:latest",
        "sources": {"app": "a:latest"},
        "ingress": ({"listen_port": 8000},),
    }

    assert parse_manifest(doc).ingress == (Ingress(8000),)


@pytest.mark.parametrize("fixture", VALID_FIXTURES)
def test_to_dict_parses_back_to_an_equal_manifest(fixture: str) -> None:
    manifest = load_manifest(MANIFESTS / fixture)
    as_dict = manifest.to_dict()

    assert parse_manifest(as_dict) == manifest
    assert parse_manifest(json.loads(json.dumps(as_dict))) == manifest


# --- the schema ---------------------------------------------------------------------------------


def test_shipped_schema_is_valid_draft_2020_12_and_a_private_copy() -> None:
    schema = manifest_schema()
    jsonschema.Draft202012Validator.check_schema(schema)

    schema["properties"].clear()
    assert manifest_schema()["properties"]


def test_schema_accepts_exactly_upstream_fork_and_our_keys() -> None:
    # Upstream: enclaver-io/enclaver enclaver/src/manifest.rs; fork: sparsity-xyz/enclaver.
    upstream = {"version", "name", "target", "sources", "signature", "ingress", "egress"}
    upstream |= {"defaults", "kms_proxy", "api", "spire"}
    ours = {"services", "control", "runtime"}

    assert set(manifest_schema()["properties"]) == upstream | {"aux_api"} | ours


def test_vsock_port_and_cid_constants_match_enclaver_and_nitro() -> None:
    assert (
        vsock_ports.HEARTBEAT_PORT,
        vsock_ports.INIT_CONTROL_PORT,
        vsock_ports.STATUS_PORT,
        vsock_ports.APP_LOG_PORT,
        vsock_ports.EGRESS_BROKER_PORT,
    ) == (9000, 9001, 17000, 17001, 17002)
    assert (vsock_ports.HOST_CID, vsock_ports.PARENT_CID, vsock_ports.FIRST_ENCLAVE_CID) == (
        2,
        3,
        16,
    )


# --- schema errors, translated ------------------------------------------------------------------


def test_unknown_keys_are_errors_with_the_closest_known_key() -> None:
    errors = errors_of(
        manifest_with(
            """\
            ingress:
              - listen: 8000
                listen_port: 8000
            egres: {}
            services: {units: {web: {ExecStart: /w, Requirse: []}}}
            """
        )
    )

    assert errors == [
        "ingress[0]: unknown key 'listen' (did you mean 'listen_port'?)",
        "unknown top-level key 'egres' (did you mean 'egress'?)",
        "services.units.web: unknown key 'Requirse' (did you mean 'Requires'?)",
    ]


def test_unknown_key_without_a_close_match_lists_the_known_keys() -> None:
    assert errors_of(manifest_with("api: {listen_port: 9000, zzz: 1}\n")) == [
        "api: unknown key 'zzz'; known keys: listen_port"
    ]


def test_the_forks_vsock_ports_is_refused_with_the_reason() -> None:
    (error,) = errors_of(manifest_with("vsock_ports: {status_port: 18000}\n"))

    assert error.startswith("unknown top-level key 'vsock_ports': the sparsity-xyz fork's")
    assert "remove the key" in error


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("egress: {proxy_port: x}", 'egress.proxy_port: expected an integer, got "x"'),
        ("egress: {allow: example.com}", 'egress.allow: expected a list, got "example.com"'),
        (
            "ingress: [{listen_port: 8080.0}]",
            "ingress[0].listen_port: expected an integer, got 8080.0",
        ),
        ("ingress: [{listen_port: true}]", "ingress[0].listen_port: expected an integer, got true"),
        (
            "ingress: [{listen_port: 0}]",
            "ingress[0].listen_port: must be between 1 and 65535, got 0",
        ),
        (
            "ingress: [{listen_port: 65536}]",
            "ingress[0].listen_port: must be between 1 and 65535, got 65536",
        ),
        ("api: {listen_port: -1}", "api.listen_port: must be between 1 and 65535, got -1"),
        ("defaults: {cpu_count: 0}", "defaults.cpu_count: must be at least 1, got 0"),
        (
            "defaults: {memory_mb: 32}",
            "defaults.memory_mb: must be at least 64 (MiB), the smallest enclave nitro-cli runs, "
            "got 32",
        ),
        ("ingress: {listen_port: 80}", "ingress: expected a list, got a mapping"),
        ("api: {}", "api.listen_port: required key is missing"),
        ("signature: {certificate: c.pem}", "signature.key: required key is missing"),
        (
            "control: {unix_socket: run/init.sock}",
            'control.unix_socket: must be an absolute path (starting with /), got "run/init.sock"',
        ),
        (
            "services: {units: {web: {ExecStart: /w, RestartSec: .inf}}}",
            "services.units.web.RestartSec: expected a number, got inf",
        ),
        (
            "services: {units: {web: {ExecStart: ''}}}",
            'services.units.web.ExecStart: must not be empty, got ""',
        ),
        (
            "services: {units: {web: {ExecStart: /w, Restart: sometimes}}}",
            'services.units.web.Restart: must be one of "no", "always", "on-failure", '
            '"on-success"; got "sometimes"',
        ),
        (
            "services: {units: {web: {ExecStart: /w, Environment: [PORT]}}}",
            "services.units.web.Environment[0]: must look like NAME=value (NAME: letters, digits, "
            "'_', not starting with a digit), got \"PORT\"",
        ),
        (
            "services: {units: {web: {ExecStart: /w, User: -1}}}",
            "services.units.web.User: must be a name or a numeric id, got -1",
        ),
        (
            "control: {allowed_cids: [3, 3]}",
            "control.allowed_cids: must not list the same value twice",
        ),
    ],
)
def test_schema_errors_name_the_path_and_the_reason(extra: str, expected: str) -> None:
    assert errors_of(manifest_with(extra + "\n")) == [expected]


def test_version_must_be_v1() -> None:
    errors = errors_of(MINIMAL.replace("version: v1", "version: v2"))

    assert errors == ['version: must be "v1", got "v2"']


def test_kill_signal_typo_gets_a_suggestion() -> None:
    (error,) = errors_of(
        manifest_with("services: {units: {web: {ExecStart: /w, KillSignal: SIGTEM}}}")
    )

    assert error.startswith('services.units.web.KillSignal: must be one of "SIGTERM"')
    assert error.endswith('got "SIGTEM" (did you mean "SIGTERM"?)')


def test_missing_required_top_level_keys_each_get_their_own_error() -> None:
    assert errors_of("name: x\n") == [
        "version: required key is missing",
        "target: required key is missing",
        "sources: required key is missing",
    ]


def test_invalid_service_names_are_quoted_in_the_path() -> None:
    errors = errors_of(
        manifest_with("services: {units: {'a b': {ExecStart: /x}, '..': {ExecStart: /y}}}")
    )

    reason = (
        "not a valid service name; use 1 to 128 letters, digits, '_', '.', '@' or '-', "
        "starting with a letter, digit, '_' or '@'"
    )
    assert sorted(errors) == sorted(
        [f'services.units["a b"]: {reason}', f'services.units[".."]: {reason}']
    )


# --- semantic checks ---------------------------------------------------------------------------


def test_ingress_ports_must_not_collide_with_reserved_vsock_ports() -> None:
    errors = errors_of(
        manifest_with(
            """\
            ingress:
              - listen_port: 8000
              - listen_port: 17000
              - listen_port: 17001
              - listen_port: 17002
              - listen_port: 9000
              - listen_port: 9001
            """
        )
    )

    assert errors == [
        "ingress[1].listen_port: 17000 collides with the reserved status port",
        "ingress[2].listen_port: 17001 collides with the reserved app log port",
        "ingress[3].listen_port: 17002 collides with the reserved egress broker port",
        "ingress[4].listen_port: 9000 collides with the reserved heartbeat port",
        "ingress[5].listen_port: 9001 collides with the reserved init control port",
    ]


def test_ingress_must_not_take_a_moved_init_control_port() -> None:
    errors = errors_of(
        manifest_with("ingress: [{listen_port: 9101}]\ncontrol: {vsock_port: 9101}\n")
    )

    assert errors == [
        "ingress[0].listen_port: 9101 collides with the init control port (control.vsock_port)"
    ]


def test_control_vsock_port_must_not_take_another_reserved_port() -> None:
    assert errors_of(manifest_with("control: {vsock_port: 17001}\n")) == [
        "control.vsock_port: 17001 collides with the reserved app log port"
    ]


def test_api_and_aux_api_may_use_tcp_ports_that_are_reserved_on_vsock() -> None:
    manifest = parse_manifest(manifest_with("api: {listen_port: 9000}\naux_api: {}\n"))

    assert (manifest.api, manifest.aux_api) == (Api(9000), AuxApi(9001))


def test_listening_ports_are_unique_across_every_section() -> None:
    errors = errors_of(
        manifest_with(
            """\
            ingress: [{listen_port: 8000}, {listen_port: 8000}]
            api: {listen_port: 8000}
            aux_api: {listen_port: 7000}
            kms_proxy: {listen_port: 7000}
            egress: {allow: [169.254.169.254, kms.*.amazonaws.com], proxy_port: 8000}
            """
        )
    )

    assert errors == [
        "ingress[0].listen_port: 8000 is api.listen_port: this would expose the full API "
        "(decrypt, sign) to the outside; expose aux_api instead",
        "ingress[1].listen_port: 8000 is already used by ingress[0].listen_port",
        "aux_api.listen_port: 7000 is already used by kms_proxy.listen_port",
        "egress.proxy_port: 8000 is already used by api.listen_port",
    ]


def test_ingress_exposes_the_aux_api_as_intended() -> None:
    manifest = parse_manifest(
        manifest_with("ingress: [{listen_port: 9101}]\napi: {listen_port: 9100}\naux_api: {}\n")
    )

    assert manifest.aux_api is not None
    assert manifest.aux_api.listen_port == manifest.ingress[0].listen_port == 9101


def test_a_defaulted_port_is_blamed_and_the_fix_named() -> None:
    errors = errors_of(
        manifest_with(
            """\
            ingress: [{listen_port: 10000}, {listen_port: 9001}]
            egress: {allow: [169.254.169.254, kms.*.amazonaws.com]}
            api: {listen_port: 9100}
            aux_api: {}
            kms_proxy: {listen_port: 9101}
            """
        )
    )

    assert errors == [
        "ingress[0].listen_port: 10000 is egress.proxy_port (the default): this would expose "
        "the egress proxy: outside clients would reach the network as the enclave; "
        "set egress.proxy_port to another port",
        "ingress[1].listen_port: 9001 collides with the reserved init control port",
        "aux_api.listen_port: 9101 (the default, api.listen_port + 1) is already used by "
        "kms_proxy.listen_port; set aux_api.listen_port to a free port",
    ]


def test_egress_proxy_port_only_counts_when_egress_allows_something() -> None:
    manifest = parse_manifest(
        manifest_with("ingress: [{listen_port: 10000}]\negress: {deny: [10.0.0.0/8]}\n")
    )

    assert manifest.egress is not None
    assert not manifest.egress.enabled


def test_spire_workload_api_port_takes_part_in_the_clash_check() -> None:
    spire = (
        "spire: {server_addr: 'https://host:8081', ca_cert: /ca, trust_domain: t, svid_dir: /s}\n"
    )

    assert errors_of(manifest_with("ingress: [{listen_port: 5000}]\n" + spire)) == [
        "ingress[0].listen_port: 5000 is spire.workload_api_addr (the default): this would "
        "expose the SPIFFE workload API to the outside; set spire.workload_api_addr to another port"
    ]
    assert errors_of(manifest_with(spire.replace("}", ", workload_api_addr: localhost:5}"))) == [
        'spire.workload_api_addr: must be IP:PORT such as 127.0.0.1:5000, got "localhost:5"'
    ]


@pytest.mark.parametrize("egress", ["", "egress: {}\n", "egress: {allow: []}\n"])
def test_kms_proxy_requires_egress_that_allows_something(egress: str) -> None:
    errors = errors_of(manifest_with("kms_proxy: {listen_port: 7123}\n" + egress))

    assert errors == [
        "kms_proxy: requires egress: the KMS proxy reaches IMDS and KMS through the egress proxy; "
        "add egress.allow with 169.254.169.254 and kms.*.amazonaws.com"
    ]


def test_aux_api_requires_api() -> None:
    assert errors_of(manifest_with("aux_api: {listen_port: 9001}\n")) == [
        "aux_api: requires api: the aux API is served next to the API; add api.listen_port"
    ]


def test_aux_api_default_past_the_last_port_must_be_set_explicitly() -> None:
    assert errors_of(manifest_with("api: {listen_port: 65535}\naux_api: {}\n")) == [
        "aux_api.listen_port: defaults to api.listen_port + 1 = 65536, which is not a port; "
        "set it explicitly"
    ]


@pytest.mark.parametrize(
    "rule",
    [
        "example.com",
        "EXAMPLE.com",
        "*.example.com",
        "**.amazonaws.com",
        "kms.*.amazonaws.com",
        "host",
        "**",
        "_dmarc.example.com",
        "xn--bcher-kva.example",
        "169.254.169.254",
        "10.0.0.0/8",
        "10.0.0.1/8",
        "::1",
        "fd00::/8",
    ],
)
def test_valid_egress_rules(rule: str) -> None:
    assert egress_rule_problem(rule) is None


@pytest.mark.parametrize(
    ("rule", "problem"),
    [
        ("", "is empty; give an IP address, a CIDR or a domain pattern"),
        (" example.com", '" example.com" has leading or trailing whitespace'),
        ("a..b", "empty label"),
        (".example.com", "empty label"),
        ("example.com.", "empty label"),
        ("foo.**.com", "'**' (one or more labels) is only allowed as the leftmost label"),
        ("api-*.example.com", "'*' must be a whole label"),
        ("exa mple.com", "label 'exa mple' may only hold letters, digits"),
        ("-bad.example.com", "may not start or end with '-'"),
        ("a" * 64 + ".com", "is longer than 63 characters"),
        ("a." * 127 + "com", "longer than 253 characters"),
        ("1.2.3.256", '"1.2.3.256" is not a valid IP address or CIDR'),
        ("10.0.0.0/33", '"10.0.0.0/33" is not a valid IP address or CIDR'),
        ("[::1]", '"[::1]" is not a valid IP address or CIDR'),
        ("example.com:443", "is not a valid IP address or CIDR"),
    ],
)
def test_invalid_egress_rules(rule: str, problem: str) -> None:
    found = egress_rule_problem(rule)

    assert found is not None
    assert problem in found


def test_egress_rule_errors_point_at_the_entry() -> None:
    errors = errors_of(
        manifest_with("egress: {allow: [example.com, 'a..b'], deny: ['10.0.0.0/40']}\n")
    )

    assert errors == [
        'egress.allow[1]: "a..b" is not a valid domain pattern: it has an empty label '
        "(look for '..' or a leading or trailing dot)",
        'egress.deny[0]: "10.0.0.0/40" is not a valid IP address or CIDR',
    ]


def test_service_references_must_name_defined_services() -> None:
    errors = errors_of(
        manifest_with(
            """\
            services:
              units:
                web: {ExecStart: /w, Requires: [dbb], After: [cache], Before: [db], RequiredBy: [x]}
                db: {ExecStart: /d}
            """
        )
    )

    assert errors == [
        'services.units.web.Requires[0]: unknown service "dbb" (did you mean "db"?)',
        'services.units.web.After[0]: unknown service "cache"; defined: db, web',
        'services.units.web.RequiredBy[0]: unknown service "x"; defined: db, web',
    ]


def test_service_dependency_cycles_are_errors_that_name_the_cycle() -> None:
    (error,) = errors_of(
        manifest_with(
            """\
            services:
              units:
                a: {ExecStart: /a, Requires: [b], RequiredBy: [c]}
                b: {ExecStart: /b, After: [c]}
                c: {ExecStart: /c}
            """
        )
    )

    assert error.startswith("services.units: dependency cycle: ")
    cycle = error.split("dependency cycle: ")[1].split(" (")[0].split(" -> ")
    assert sorted(cycle[:-1]) == ["a", "b", "c"]
    assert cycle[0] == cycle[-1]
    assert "(each starts before the next)" in error


def test_a_service_requiring_itself_is_a_cycle() -> None:
    (error,) = errors_of(manifest_with("services: {units: {a: {ExecStart: /a, Requires: [a]}}}\n"))

    assert error.startswith("services.units: dependency cycle: a -> a")


def test_start_order_honours_every_dependency_key() -> None:
    manifest = parse_manifest(
        manifest_with(
            """\
            services:
              units:
                web: {ExecStart: /w, Requires: [db]}
                db: {ExecStart: /d, After: [net]}
                net: {ExecStart: /n}
                audit: {ExecStart: /a, Before: [net]}
                seed: {ExecStart: /s, RequiredBy: [web], After: [db]}
            """
        )
    )

    assert manifest.services.start_order() == ("audit", "net", "db", "seed", "web")


def test_an_environment_variable_set_twice_is_an_error() -> None:
    errors = errors_of(
        manifest_with("services: {units: {w: {ExecStart: /w, Environment: [A=1, B=2, A=3]}}}")
    )

    assert errors == ["services.units.w.Environment[2]: sets A again (first set by Environment[0])"]


# --- errors: all of them, with paths and lines -------------------------------------------------


def test_all_errors_are_reported_in_file_order_with_lines() -> None:
    with pytest.raises(ManifestError) as caught:
        load_manifest(MANIFESTS / "invalid-many.yaml")

    assert [(issue.line, str(issue)) for issue in caught.value.issues] == [
        (2, 'version: must be "v1", got "v2"'),
        (7, "sources: unknown key 'image'; known keys: app, odyn, sleeve"),
        (9, "ingress[0]: unknown key 'listen' (did you mean 'listen_port'?)"),
        (9, "ingress[0].listen_port: required key is missing"),
        (10, "ingress[1].listen_port: 17000 collides with the reserved status port"),
        (11, 'ingress[2].listen_port: expected an integer, got "8080"'),
        (
            12,
            "ingress[3].listen_port: 9000 is api.listen_port: this would expose the full API "
            "(decrypt, sign) to the outside; expose aux_api instead",
        ),
        (12, "ingress[3].listen_port: 9000 collides with the reserved heartbeat port"),
        (
            16,
            'egress.allow[0]: "bad..domain" is not a valid domain pattern: it has an empty label '
            "(look for '..' or a leading or trailing dot)",
        ),
        (21, 'services.units.web.Requires[0]: unknown service "db"; defined: web'),
    ]
    assert caught.value.source == str(MANIFESTS / "invalid-many.yaml")


def test_manifest_error_is_a_format_error_with_path_message_pairs() -> None:
    with pytest.raises(FormatError) as caught:
        parse_manifest(manifest_with("api: {listen_port: x}\n"))

    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, ManifestError)
    assert caught.value.errors == [("api.listen_port", 'expected an integer, got "x"')]
    assert str(caught.value) == 'api.listen_port: expected an integer, got "x"'


def test_manifest_error_survives_pickling_for_worker_processes() -> None:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(manifest_with("api: {listen_port: x}\n"), source="inline.yaml")

    copy = pickle.loads(pickle.dumps(caught.value))
    assert (copy.issues, copy.source, str(copy)) == (
        caught.value.issues,
        "inline.yaml",
        str(caught.value),
    )


def test_format_path_forms() -> None:
    assert format_path(()) == ""
    assert format_path(("ingress", 1, "listen_port")) == "ingress[1].listen_port"
    assert format_path(("services", "units", "web.api", "ExecStart")) == (
        'services.units["web.api"].ExecStart'
    )
    assert format_path(("kms_proxy", "endpoints", "us-east-1")) == "kms_proxy.endpoints.us-east-1"


def test_duplicate_keys_are_errors_with_both_lines() -> None:
    with pytest.raises(ManifestError) as caught:
        load_manifest(MANIFESTS / "invalid-duplicate.yaml")

    (issue,) = caught.value.issues
    assert (issue.path, issue.message, issue.line) == (
        "name",
        "duplicate key (first defined on line 2)",
        6,
    )


def test_nested_duplicate_keys_are_found_too() -> None:
    pairs = error_pairs(manifest_with("ingress:\n  - listen_port: 80\n    listen_port: 81\n"))

    assert pairs == [("ingress[0].listen_port", "duplicate key (first defined on line 7)")]


def test_yaml_syntax_errors_report_the_line() -> None:
    with pytest.raises(ManifestError) as caught:
        load_manifest(MANIFESTS / "invalid-yaml.yaml")

    (issue,) = caught.value.issues
    assert issue.line == 3
    assert issue.path == ""
    assert issue.message.startswith("invalid YAML at line 3, column 7: ")
    assert "see line 2, column 7" in issue.message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "the manifest is empty; it needs at least version, name, target and sources.app"),
        ("# nothing\n", "the manifest is empty"),
        ("- a\n- b\n", "the manifest must be a mapping of keys (version, name, ...), got a list"),
        (
            "just text",
            'the manifest must be a mapping of keys (version, name, ...), got "just text"',
        ),
        ("a: !!binary aGVsbG8=", "unsupported YAML tag 'tag:yaml.org,2002:binary'"),
        ("a: !!set {x}", "unsupported YAML tag"),
        ("a: &a [*a]", "the document is too large or too deeply nested"),
        ("[" * 500 + "]" * 500, "the document is too large or too deeply nested"),
        ("a: 1\n---\nb: 2\n", "but found another document"),
        (
            "a: \x01",
            "invalid YAML at line 1: special characters are not allowed (character #x0001)",
        ),
        (b"version: \xff", "the manifest is not UTF-8 text (invalid byte at offset 9)"),
    ],
)
def test_documents_that_are_not_manifests(text: str | bytes, message: str) -> None:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(text)

    assert message in str(caught.value)


def test_alias_bomb_is_refused_quickly() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]

    assert errors_of("\n".join(lines)) == [
        "the document is too large or too deeply nested (more than 20000 values once aliases are "
        "expanded, or more than 32 levels); a manifest is a small file"
    ]


def test_oversized_text_is_refused() -> None:
    assert errors_of("#" * (1024 * 1024 + 1)) == [
        "the manifest is larger than 1048576 bytes; a manifest is a small file"
    ]


def test_utf8_bom_is_accepted() -> None:
    assert parse_manifest(("\ufeff" + MINIMAL).encode()).name == "hello"


def test_mapping_input_with_non_string_keys_and_foreign_values() -> None:
    doc: dict[Any, Any] = {
        "version": "v1",
        "name": "x",
        "target": "t",
        "sources": {"app": "a", 1: "b"},
        "defaults": {"cpu_count": b"2"},
    }

    assert errors_of(doc) == [
        "sources: key 1 is not a string; quote it",
        "defaults.cpu_count: unsupported value of type bytes",
    ]


def test_anchors_and_merge_keys_work() -> None:
    manifest = parse_manifest(
        manifest_with(
            """\
            services:
              units:
                base: &base {ExecStart: /bin/base, Restart: always, RestartSec: 2}
                web:
                  <<: *base
                  ExecStart: /bin/web
            """
        )
    )

    web = manifest.services.unit("web")
    assert (web.exec_start, web.restart, web.restart_sec) == ("/bin/web", "always", 2)


def test_missing_file_is_a_read_error_not_a_format_error(tmp_path: Path) -> None:
    with pytest.raises(
        ManifestReadError, match=r"cannot read manifest .*missing\.yaml: No such file"
    ):
        load_manifest(tmp_path / "missing.yaml")
    with pytest.raises(ManifestReadError, match="Is a directory"):
        load_manifest(tmp_path)


# --- the CLI -----------------------------------------------------------------------------------


def test_cli_check_valid_prints_a_summary_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["manifest", "check", str(MANIFESTS / "extensions.yaml")])

    out, err = capsys.readouterr()
    assert status == 0
    assert out == (
        'ok: app "hello" (v1): 2 ingress ports (8000, 8443), egress allow 3 / deny 1, api 9000, '
        "aux_api 9001, 3 services\n"
    )
    assert err == ""


@pytest.mark.parametrize(
    ("fixture", "summary"),
    [
        (
            "upstream-hn.yaml",
            'ok: app "example" (v1): 1 ingress port (8000), no egress (nothing allowed)',
        ),
        (
            "upstream-kms.yaml",
            'ok: app "intg-tests" (v1): no ingress, egress allow 2 / deny 0, kms_proxy 7123',
        ),
        (
            "upstream-full.yaml",
            'ok: app "shop" (v1): 2 ingress ports (8443, 8080), egress allow 4 / deny 1, api 9000, '
            "kms_proxy 7123, spire example.org",
        ),
    ],
)
def test_cli_summaries(fixture: str, summary: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["manifest", "check", str(MANIFESTS / fixture)]) == 0
    assert capsys.readouterr().out == summary + "\n"


def test_cli_check_invalid_prints_every_error_with_file_and_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = str(MANIFESTS / "invalid-many.yaml")
    status = main(["manifest", "check", path])

    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert status == 1
    assert err == ""
    assert len(lines) == 10
    assert lines[0] == f'{path}:2: version: must be "v1", got "v2"'
    assert (
        lines[4]
        == f"{path}:10: ingress[1].listen_port: 17000 collides with the reserved status port"
    )


def test_cli_check_json_valid(capsys: pytest.CaptureFixture[str]) -> None:
    path = str(MANIFESTS / "fork-aux-api.yaml")
    assert main(["manifest", "check", "--json", path]) == 0

    result = json.loads(capsys.readouterr().out)
    assert result["valid"] is True
    assert result["errors"] == []
    assert result["file"] == path
    assert result["summary"].startswith('ok: app "hn-fetcher" (v1)')
    assert result["manifest"]["aux_api"] == {"listen_port": 9001}
    assert parse_manifest(result["manifest"]) == load_manifest(path)


def test_cli_check_json_invalid(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["manifest", "check", "--json", str(MANIFESTS / "invalid-duplicate.yaml")]) == 1

    result = json.loads(capsys.readouterr().out)
    assert result["valid"] is False
    assert result["errors"] == [
        {"path": "name", "message": "duplicate key (first defined on line 2)", "line": 6}
    ]


def test_cli_missing_file_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.yaml"
    assert main(["manifest", "check", str(missing)]) == 1

    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"enclaveops: cannot read manifest {missing}: No such file or directory; "
        "check the path and its permissions\n"
    )


def test_cli_missing_file_in_json_mode_is_still_one_json_object(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["manifest", "check", "--json", str(tmp_path / "nope.yaml")]) == 1

    result = json.loads(capsys.readouterr().out)
    assert result["valid"] is False
    assert result["errors"][0]["path"] == ""
    assert "No such file or directory" in result["errors"][0]["message"]


def test_cli_reads_standard_input(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stdin = io.TextIOWrapper(io.BytesIO(manifest_with("api: {listen_port: x}\n").encode()))
    monkeypatch.setattr(sys, "stdin", stdin)

    assert main(["manifest", "check", "-"]) == 1
    assert capsys.readouterr().out == '<stdin>:6: api.listen_port: expected an integer, got "x"\n'


def test_cli_usage_error_exits_2() -> None:
    with pytest.raises(SystemExit) as caught:
        main(["manifest", "check"])

    assert caught.value.code == 2


def test_summary_line_singular_and_plural() -> None:
    manifest = parse_manifest(
        manifest_with("ingress: [{listen_port: 80}]\nservices: {units: {a: {ExecStart: /a}}}\n")
    )

    assert manifest_cmd.summary_line(manifest) == (
        'ok: app "hello" (v1): 1 ingress port (80), no egress, 1 service'
    )


def test_kms_proxy_needs_egress_to_imds_and_kms() -> None:
    errors = errors_of(
        manifest_with(
            """\
            egress: {allow: [example.com]}
            kms_proxy: {listen_port: 7000}
            """
        )
    )

    assert errors == [
        "egress.allow: blocks IMDS, which kms_proxy needs for the parent's credentials "
        "(169.254.169.254 is in no allowed network); add 169.254.169.254 to egress.allow",
        "egress.allow: blocks every KMS endpoint, which kms_proxy forwards to; add "
        "kms.*.amazonaws.com (or kms.<region>.amazonaws.com) to egress.allow",
    ]


def test_kms_proxy_endpoints_must_be_allowed_and_not_denied() -> None:
    errors = errors_of(
        manifest_with(
            """\
            egress:
              allow: [169.254.169.254, "**.example.com"]
              deny: [kms.blocked.example.com]
            kms_proxy:
              listen_port: 7000
              endpoints: {eu-west-1: "kms.blocked.example.com:4443", us-east-1: kms.example.com}
            """
        )
    )

    assert errors == [
        "kms_proxy.endpoints.eu-west-1: kms.blocked.example.com is blocked by egress "
        "(kms.blocked.example.com matches the deny rule 'kms.blocked.example.com'); add it to "
        "egress.allow",
    ]


def test_kms_proxy_with_imds_and_a_regional_endpoint_allowed_is_accepted() -> None:
    manifest = parse_manifest(
        manifest_with(
            "egress: {allow: [169.254.169.254/32, kms.eu-west-1.amazonaws.com]}\n"
            "kms_proxy: {listen_port: 7000}\n"
        )
    )

    assert manifest.kms_proxy is not None
