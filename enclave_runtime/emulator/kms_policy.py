"""Key policies for the emulated KMS: the subset of IAM policy evaluation KMS keys use.

Evaluation as AWS documents it (IAM User Guide, "Policy evaluation logic"): an explicit Deny
wins, else an Allow is needed, else the request is denied. A statement applies when its Action
matches ``kms:<Operation>`` (``*`` wildcards) and every condition holds. Supported operators:
StringEquals, StringEqualsIgnoreCase, StringNotEquals, StringNotEqualsIgnoreCase, StringLike,
Null, and the ``...IfExists`` forms; an unknown operator makes the policy invalid rather than
silently true. Principals and resources are not evaluated: the emulator has one account and
every caller is its role (docs/kms.md lists this difference).

Attestation keys (``kms:RecipientAttestation:ImageSha384``, ``kms:RecipientAttestation:PCR<n>``)
are present in the request context only when the request carried a Recipient whose attestation
document verified; a condition on an absent key does not hold (except Null and IfExists).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any

from enclave_runtime.errors import EnclaveOpsError

Context = Mapping[str, str]

_STRING_OPERATORS = {
    "StringEquals": (False, False),
    "StringNotEquals": (False, True),
    "StringEqualsIgnoreCase": (True, False),
    "StringNotEqualsIgnoreCase": (True, True),
}


class PolicyError(EnclaveOpsError):
    """A key policy the emulated KMS cannot evaluate (MalformedPolicyDocumentException)."""


def check_policy(policy: Any) -> None:
    """Raise PolicyError unless ``policy`` is a document :func:`is_allowed` can evaluate."""
    statements = _statements(policy)
    for index, statement in enumerate(statements):
        if statement.get("Effect") not in ("Allow", "Deny"):
            raise PolicyError(f"Statement[{index}].Effect must be Allow or Deny")
        if not _as_list(statement.get("Action")):
            raise PolicyError(f"Statement[{index}].Action is required")
        for operator in statement.get("Condition") or {}:
            _operator(operator, index)


def is_allowed(policy: Any, operation: str, context: Context) -> bool:
    """Whether ``kms:<operation>`` with the request ``context`` is allowed by ``policy``."""
    action = f"kms:{operation}"
    allowed = False
    for index, statement in enumerate(_statements(policy)):
        if not _applies(statement, index, action, context):
            continue
        if statement["Effect"] == "Deny":
            return False
        allowed = True
    return allowed


def _statements(policy: Any) -> list[dict[str, Any]]:
    if not isinstance(policy, dict):
        raise PolicyError("the key policy must be a JSON object")
    statements = policy.get("Statement")
    if isinstance(statements, dict):
        statements = [statements]
    if not isinstance(statements, list) or not all(isinstance(s, dict) for s in statements):
        raise PolicyError("the key policy's Statement must be a list of objects")
    return statements


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _applies(statement: dict[str, Any], index: int, action: str, context: Context) -> bool:
    patterns = _as_list(statement.get("Action"))
    if not any(fnmatch.fnmatchcase(action.lower(), p.lower()) for p in patterns):
        return False
    conditions = statement.get("Condition") or {}
    return all(
        _holds(operator, index, key, values, context)
        for operator, entries in conditions.items()
        for key, values in entries.items()
    )


def _operator(name: str, index: int) -> tuple[str, bool]:
    base, if_exists = (
        (name[: -len("IfExists")], True) if name.endswith("IfExists") else (name, False)
    )
    if base not in _STRING_OPERATORS and base not in ("StringLike", "Null"):
        raise PolicyError(
            f"Statement[{index}].Condition operator {name} is not supported by the emulated KMS"
        )
    return base, if_exists


def _holds(operator: str, index: int, key: str, values: Any, context: Context) -> bool:
    base, if_exists = _operator(operator, index)
    wanted = [str(v) for v in _as_list(values)]
    found = _lookup(context, key)
    if base == "Null":
        return (found is None) == (wanted[0].lower() == "true")
    if found is None:
        return if_exists
    if base == "StringLike":
        return any(fnmatch.fnmatchcase(found, pattern) for pattern in wanted)
    ignore_case, negated = _STRING_OPERATORS[base]
    matched = found.lower() in {v.lower() for v in wanted} if ignore_case else found in wanted
    return matched != negated


def _lookup(context: Context, key: str) -> str | None:
    """Condition keys are case-insensitive (IAM User Guide, "Condition element")."""
    lowered = key.lower()
    for name, value in context.items():
        if name.lower() == lowered:
            return value
    return None
