"""Process layer shared by odyn and the init (docs/architecture.md).

:mod:`.launcher` starts, reaps and stops child processes; :mod:`.streams` captures and
broadcasts their output. Neither knows about odyn's services or the init's units.
"""

from __future__ import annotations
