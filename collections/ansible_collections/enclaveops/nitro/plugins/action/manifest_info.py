# Copyright: EnclaveOps contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Action plugin enclaveops.nitro.manifest_info: runs on the controller, where the manifest is.

The enclave role takes enclaver.yaml from the controller (like the playbook) and copies it to the
target, so the deployment is worked out here, by the runtime on the controller, before anything
reaches the target (docs/collection-modules.md, manifest_info).
"""

from __future__ import annotations

import importlib
import os

from ansible.plugins.action import ActionBase
from ansible_collections.enclaveops.nitro.plugins.module_utils.common import (
    RUNTIME_REQUIREMENT,
    nitro_argument_spec,
)
from ansible_collections.enclaveops.nitro.plugins.modules.manifest_info import OPTIONS

# The common options too: module_defaults of group/enclaveops.nitro.nitro set them on every
# member of the group (this module does not use them).
ARGUMENT_SPEC = nitro_argument_spec(**OPTIONS)


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _requires_connection = False

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        _validation, params = self.validate_argument_spec(argument_spec=ARGUMENT_SPEC)
        result["changed"] = False
        path = params["path"]
        if not os.path.isabs(path):
            path = os.path.join(self._loader.get_basedir(), path)
        try:
            deployment = importlib.import_module("enclave_runtime.host.deployment")
            errors = importlib.import_module("enclave_runtime.errors")
        except ImportError as err:
            result.update(
                failed=True,
                msg=f"{RUNTIME_REQUIREMENT}, on the controller too: manifest_info reads the "
                f"manifest there (could not import enclave_runtime: {err})",
            )
            return result
        try:
            result["deployment"] = deployment.effective_deployment(path, params["published_ports"])
        except errors.EnclaveOpsError as err:
            result.update(failed=True, msg=f"manifest {path}: {err}")
        return result
