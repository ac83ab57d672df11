# Copyright: EnclaveOps contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Attributes shared by the modules: the action group, and what an information module promises."""

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options: {}
attributes:
  action_group:
    description: >-
      Set the common options once for every module of the collection with
      C(module_defaults) and C(group/enclaveops.nitro.nitro).
    support: full
    membership:
      - enclaveops.nitro.nitro
"""

    INFO_MODULE = r"""
options: {}
attributes:
  check_mode:
    support: full
    description: Only reads, in check mode as in a normal run.
  diff_mode:
    support: none
    description: Changes nothing, so there is nothing to diff.
  idempotent:
    support: full
    description: Never changes anything.
"""
