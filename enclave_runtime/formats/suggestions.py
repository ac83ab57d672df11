"""Did-you-mean hints for error messages: the manifest's and the unit files' checks share them."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any, Callable


def did_you_mean(word: Any, candidates: Sequence[str], quote: Callable[[str], str] = repr) -> str:
    """`` (did you mean X?)`` for a close match (a typo or another case), else ``""``."""
    if not isinstance(word, str):
        return ""
    match = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    if not match:
        lowered = {candidate.lower(): candidate for candidate in candidates}
        match = [lowered[word.lower()]] if word.lower() in lowered else []
    return f" (did you mean {quote(match[0])}?)" if match else ""
