#!/usr/bin/env python3
"""The Canopy demo: five machines in network namespaces form one overlay; a web service on one is reached from a
machine behind NAT through its ServiceIP. Run through `sudo testbeds/demo` (which builds the agent first).

    --hold   keep everything running at the end and print how to poke at it; Ctrl-C tears it all down.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "scenarios"))

from common import SERVICE, fetch_through_overlay, five_machines, start_web_service  # noqa: E402
from canopy_netns import Testbed, TestbedError, missing_privileges  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description="Canopy demo: five machines, one overlay, one service")
    parser.add_argument("--hold", action="store_true", help="keep the testbed up until Ctrl-C")
    parser.add_argument("--timeout", type=float, default=90)
    args = parser.parse_args()
    reason = missing_privileges()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    try:
        with Testbed() as tb:
            hosts = five_machines(tb)
            machines = list(hosts.values())
            print(f"[demo] {len(machines)} machines: " + ", ".join(f"{h.name} {h.ip}" for h in machines))
            tb.ping(hosts["m5"], hosts["m3"].ip)
            print("[demo] underlay works (m5 behind NAT reaches m3 across the router)")
            tb.start_overlay(machines)
            tb.wait_one_tree(machines, timeout=args.timeout)
            print("[demo] one tree:")
            print(tb.agent_cli(hosts["m1"], "tree").stdout)
            start_web_service(tb, hosts["m4"])
            reply = fetch_through_overlay(tb, hosts["m5"], timeout=args.timeout)
            print(f"[demo] m5 (behind NAT) reached {SERVICE} on m4: {reply}")
            if args.hold:
                agent = tb.find_agent_binary()
                print("[demo] holding; try for example:")
                for h in machines:
                    print(f"    ip netns exec {h.netns} {agent} status --data-dir {tb.data_dir(h)}")
                print("[demo] Ctrl-C to tear everything down")
                try:
                    while True:
                        input()
                except (KeyboardInterrupt, EOFError):
                    pass
        print("[demo] done; everything torn down")
        return 0
    except TestbedError as err:
        print(f"[demo] FAILED: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
