"""The hello example's second init service: writes a heartbeat file every 2 seconds.

The app reports the file at GET /heartbeat, so an operator sees that init started the service
(and, after `initctl stop heartbeat`, that it stopped: the count no longer rises).
"""

from __future__ import annotations

import json
import os
import sys
import time

HEARTBEAT_FILE = os.environ.get("HELLO_HEARTBEAT_FILE", "/tmp/hello-heartbeat")
INTERVAL = float(os.environ.get("HELLO_HEARTBEAT_INTERVAL", "2"))


def beat(count: int) -> None:
    """Write atomically, so the app never reads half a file."""
    partial = HEARTBEAT_FILE + ".partial"
    with open(partial, "w", encoding="utf-8") as out:
        json.dump({"beats": count, "time": int(time.time()), "pid": os.getpid()}, out)
    os.replace(partial, HEARTBEAT_FILE)


def main() -> int:
    count = 0
    while True:
        count += 1
        beat(count)
        time.sleep(INTERVAL)


if __name__ == "__main__":
    sys.exit(main())
