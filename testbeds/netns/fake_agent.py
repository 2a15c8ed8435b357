#!/usr/bin/env python3
"""A stand-in for the agent CLI, only for testing the testbed library's orchestration (not the agent).

`start` listens on its TCP multiaddr and prints a join command; `join` fetches the first node's id over the
underlay (so joining really crosses the emulated network, NAT included) and records it as parent; `status --json`
prints the recorded state; `resolve` prints a fixed test address; `run -- CMD` runs CMD.
"""

import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid


def main(argv):
    data_dir = None
    if "--data-dir" in argv:
        i = argv.index("--data-dir")
        data_dir = argv[i + 1]
        del argv[i : i + 2]
    command, args = argv[0], argv[1:]
    state_path = os.path.join(data_dir, "state.json")
    if command == "start":
        listen = next(a for a in args if a.startswith("/ip4/") and "/tcp/" in a)
        ip, port = re.match(r"/ip4/([^/]+)/tcp/(\d+)", listen).groups()
        node_id = f"root-{uuid.uuid4().hex[:6]}"
        write(state_path, {"node": {"id": node_id, "role": "Root", "parent": None, "ancestors": []}})
        server = socket.create_server((ip, int(port)))
        print(f"To add machines run:  agent join /ip4/{ip}/tcp/{port} --network-key-file /fake/key --data-dir /x", flush=True)
        while True:
            conn, _ = server.accept()
            conn.sendall(node_id.encode())
            conn.close()
    if command == "join":
        ip, port = re.match(r"/ip4/([^/]+)/tcp/(\d+)", args[0]).groups()
        if "--network-key-file" not in args:
            sys.exit("join without a network key")
        with socket.create_connection((ip, int(port)), timeout=5) as conn:
            root = conn.recv(100).decode()
        write(state_path, {"node": {"id": f"leaf-{uuid.uuid4().hex[:6]}", "role": "Leaf", "parent": root, "ancestors": [root]}})
        print("joined", root, flush=True)
        while True:
            time.sleep(60)
    if command == "status":
        with open(state_path) as f:
            print(f.read())
        return 0
    if command == "resolve":
        print(f"{args[0]} -> 10.30.0.7")
        return 0
    if command == "run":
        return subprocess.run(args[args.index("--") + 1 :]).returncode
    sys.exit(f"fake agent: unknown command {command}")


def write(path, state):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(state, f)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
