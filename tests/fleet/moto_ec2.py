"""moto's server with one fix: instances keep the EnclaveOptions they were launched with.

moto 5.2 ignores RunInstances' EnclaveOptions and describes no EnclaveOptions, which is what
inventory/aws_ec2.yml groups on. This records EnclaveOptions.Enabled on the instances and
serves it from DescribeInstances (moto's serializer reads the ``enclave_options`` attribute).
Run as ``python -m tests.fleet.moto_ec2 -H 127.0.0.1 -p PORT`` (moto_server's arguments).
"""

from __future__ import annotations

from moto.core.responses import ActionResult
from moto.ec2.models.instances import Instance
from moto.ec2.responses.instances import InstanceResponse
from moto.server import main

_run_instances = InstanceResponse.run_instances


def _run_instances_keeping_enclave_options(self: InstanceResponse) -> ActionResult:
    result = _run_instances(self)
    enabled = str(self._get_param("EnclaveOptions.Enabled", "false")).lower() == "true"
    for instance in result.result.instances:
        instance.enclave_options = {"Enabled": enabled}
    return result


Instance.enclave_options = {"Enabled": False}
InstanceResponse.run_instances = _run_instances_keeping_enclave_options

if __name__ == "__main__":
    main()
