"""Run a scenario function inside a fresh testbed and turn the outcome into an exit code, a `figures {json}` line
with what it measured and a PASS/FAIL line."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "netns"))

from canopy_netns import Testbed, TestbedError, missing_privileges  # noqa: E402


def main(name: str, scenario: Callable[[Testbed, dict], None]) -> int:
    """`scenario(tb, figures)` builds its world in `tb` and records what it measures in `figures` (printed even when
    it fails part way)."""
    reason = missing_privileges()
    if reason:
        print(f"SKIP {name}: {reason}")
        return 0
    started = time.monotonic()
    figures: dict = {}
    try:
        with Testbed() as tb:
            scenario(tb, figures)
    except TestbedError as err:
        print(f"figures {json.dumps(figures)}")
        print(f"FAIL {name} after {time.monotonic() - started:.1f}s: {err}")
        return 1
    print(f"figures {json.dumps(figures)}")
    print(f"PASS {name} in {time.monotonic() - started:.1f}s")
    return 0


def step(text: str) -> None:
    print(f"  - {text}", flush=True)


if __name__ == "__main__":
    sys.exit("run a scenario file instead")
