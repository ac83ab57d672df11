"""The security tests use the unit tests' emulated-fabric fixtures."""

from tests.unit.conftest import enclave_fabric_root, fabric_root

__all__ = ["enclave_fabric_root", "fabric_root"]
