"""Run the collection's modules in-process, the way ansible-test units does.

Under plain pytest (``.venv/bin/python -m pytest collections/.../tests/unit``) the collections
directory is put on sys.path so ``ansible_collections.enclaveops.nitro`` imports as it does under
ansible-test.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

COLLECTIONS_ROOT = Path(__file__).resolve().parents[5]
if str(COLLECTIONS_ROOT) not in sys.path:
    sys.path.insert(0, str(COLLECTIONS_ROOT))

from ansible.module_utils import basic  # noqa: E402
from ansible.module_utils.testing import patch_module_args  # noqa: E402


class ModuleExit(Exception):
    """exit_json or fail_json was called; ``result`` is what the module reported."""

    def __init__(self, result: dict, failed: bool) -> None:
        super().__init__(result)
        self.result = result
        self.failed = failed


def _exit_json(self, **result):
    raise ModuleExit(dict(result, changed=result.get("changed", False)), failed=False)


def _fail_json(self, msg, **result):
    raise ModuleExit(dict(result, msg=msg, failed=True), failed=True)


@pytest.fixture
def run_module(monkeypatch):
    """``run_module(main, args, check_mode=False, diff=False) -> result`` (``failed`` set)."""
    monkeypatch.setattr(basic.AnsibleModule, "exit_json", _exit_json)
    monkeypatch.setattr(basic.AnsibleModule, "fail_json", _fail_json)

    def run(main, args, check_mode=False, diff=False):
        module_args = dict(args, _ansible_check_mode=check_mode, _ansible_diff=diff)
        with patch_module_args(module_args), pytest.raises(ModuleExit) as exited:
            main()
        return dict(exited.value.result, failed=exited.value.failed)

    return run
