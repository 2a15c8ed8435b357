#!/usr/bin/env bash
# Data-plane benchmark: iperf3 single-stream TCP throughput and idle round-trip time between two "machines"
# (network namespaces joined by a veth underlay, MTU 1500), over
#   (1) the direct veth path, with the same MSS as the Canopy tunnel,
#   (2) the Canopy tunnel (agent dataplane on each machine; client and server in service namespaces, traffic to
#       the server's ServiceIP),
#   (3) boringtun (userspace WireGuard; installed with `cargo install boringtun-cli` when missing),
# and prints a table with ratios to (1). Needs root, iproute2, iperf3, ping, python3, openssl, taskset.
#
# Usage: testbeds/bench/dataplane.sh [-t SECONDS] [-a AGENT_BINARY] [-l MICROSECONDS] [-b MICROSECONDS] [-c CPU | -s]
# Without -a the script builds the release agent (cargo build --release -p canopy-agent).
# With -l the agents run with --cpu-latency-us MICROSECONDS, and the bound is held for the whole run, so every row
# (direct and boringtun too) is measured on a machine whose idle CPUs wake the same way.
# With -c every process of the run (ping, iperf3, both agents, boringtun) runs on that one CPU, every row alike: both
# "machines" share this host, so without it a tunnelled packet's wake-ups (agent A, agent B, the caller) hop between
# CPUs, and on a VM each cross-CPU wake-up is an inter-processor interrupt through the hypervisor.
# With -s each "machine" gets a CPU of its own, as two real machines would: machine A's processes (its agent or
# boringtun, the ping and iperf3 client) run on CPU 0, machine B's (its agent or boringtun, the iperf3 server) on CPU 1.
# With -b the agents run with --busy-poll-us MICROSECONDS (they keep reading that long after packet work before
# they sleep).
set -euo pipefail

DURATION=10
AGENT=""
CPU_LATENCY=""
BUSY_POLL=""
PIN_CPU=""
SPLIT=""
while getopts "t:a:l:b:c:s" opt; do
    case "$opt" in
        t) DURATION="$OPTARG" ;;
        a) AGENT="$OPTARG" ;;
        l) CPU_LATENCY="$OPTARG" ;;
        b) BUSY_POLL="$OPTARG" ;;
        c) PIN_CPU="$OPTARG" ;;
        s) SPLIT=1 ;;
        *) echo "usage: $0 [-t SECONDS] [-a AGENT_BINARY] [-l MICROSECONDS] [-b MICROSECONDS] [-c CPU | -s]" >&2
           exit 2 ;;
    esac
done
if [[ -n "$CPU_LATENCY" && ! "$CPU_LATENCY" =~ ^[0-9]+$ ]]; then
    echo "-l takes a whole number of microseconds, not $CPU_LATENCY" >&2; exit 2
fi
if [[ -n "$BUSY_POLL" && ! "$BUSY_POLL" =~ ^[0-9]+$ ]]; then
    echo "-b takes a whole number of microseconds, not $BUSY_POLL" >&2; exit 2
fi
if [[ -n "$SPLIT" && -n "$PIN_CPU" ]]; then
    echo "-c (everything on one CPU) and -s (one CPU per machine) exclude each other; pick one" >&2; exit 2
fi
if [[ -n "$SPLIT" && $(nproc) -lt 2 ]]; then
    echo "-s needs two CPUs, this machine has $(nproc)" >&2; exit 2
fi

if [[ -n "$PIN_CPU" ]] && ! taskset -p -c "$PIN_CPU" $$ >/dev/null 2>&1; then
    echo "-c takes a CPU number this machine has (0 to $(($(nproc) - 1))), not $PIN_CPU" >&2; exit 2
fi

if [[ $EUID -ne 0 ]]; then echo "needs root" >&2; exit 1; fi
for tool in ip iperf3 ping python3 openssl taskset; do
    command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 1; }
done

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
if [[ -z "$AGENT" ]]; then
    (cd "$ROOT" && cargo build --release -q -p canopy-agent)
    AGENT="${CARGO_TARGET_DIR:-$ROOT/target}/release/agent"
fi
if ! command -v boringtun-cli >/dev/null; then
    echo "installing boringtun-cli (cargo install boringtun-cli)..." >&2
    cargo install -q boringtun-cli
fi
BORINGTUN="$(command -v boringtun-cli || echo "$HOME/.cargo/bin/boringtun-cli")"

ID=$$
NS_A="cbenA$ID"; NS_B="cbenB$ID"
PREFIX_A="ba$((ID % 10000))"; PREFIX_B="bb$((ID % 10000))"
WG_A="wgA$((ID % 10000))"; WG_B="wgB$((ID % 10000))"
WORK="$(mktemp -d /tmp/canopy-bench.XXXXXX)"
PIDS=()

cleanup() {
    set +e
    for ((i=${#PIDS[@]}-1; i>=0; i--)); do kill -TERM "${PIDS[i]}" 2>/dev/null; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null
    done
    for ns in $(ip netns list | awk '{print $1}' | grep -E "^($PREFIX_A|$PREFIX_B)-"); do ip netns del "$ns"; done
    ip netns del "$NS_A" 2>/dev/null; ip netns del "$NS_B" 2>/dev/null
    rm -f "/var/run/wireguard/$WG_A.sock" "/var/run/wireguard/$WG_B.sock"
    rm -rf "$WORK"
}
trap cleanup EXIT

# on_machine A|B: the command prefix that puts a process of that machine on its CPU with -s (nothing otherwise).
on_machine() {
    if [[ -n "$SPLIT" ]]; then
        if [[ "$1" == A ]]; then echo "taskset -c 0"; else echo "taskset -c 1"; fi
    fi
}

AGENT_FLAGS=()
if [[ -n "$BUSY_POLL" ]]; then
    AGENT_FLAGS+=(--busy-poll-us "$BUSY_POLL")
fi
if [[ -n "$CPU_LATENCY" ]]; then
    AGENT_FLAGS+=(--cpu-latency-us "$CPU_LATENCY")
    # The same bound for the whole run (the kernel applies the lowest request held).
    python3 -c 'import os, struct, sys, time
fd = os.open("/dev/cpu_dma_latency", os.O_WRONLY); os.write(fd, struct.pack("i", int(sys.argv[1]))); time.sleep(1e9)' \
        "$CPU_LATENCY" &
    PIDS+=($!)
fi

ip netns add "$NS_A"; ip netns add "$NS_B"
ip link add "u$ID" netns "$NS_A" type veth peer name "v$ID" netns "$NS_B"
ip -n "$NS_A" addr add 172.31.251.1/24 dev "u$ID"; ip -n "$NS_A" link set "u$ID" up; ip -n "$NS_A" link set lo up
ip -n "$NS_B" addr add 172.31.251.2/24 dev "v$ID"; ip -n "$NS_B" link set "v$ID" up; ip -n "$NS_B" link set lo up

# throughput NETNS_OF_CLIENT NETNS_OF_SERVER ADDRESS_TO_CALL [IPERF ARGS...] -> bits per second
throughput() {
    local client_ns="$1" server_ns="$2" address="$3"; shift 3
    ip netns exec "$server_ns" $(on_machine B) iperf3 -s -1 >/dev/null 2>&1 &
    local server=$!
    sleep 0.5
    ip netns exec "$client_ns" $(on_machine A) iperf3 -c "$address" -t "$DURATION" -J "$@" > "$WORK/iperf.json"
    wait "$server" || true
    python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["end"]["sum_received"]["bits_per_second"])' "$WORK/iperf.json"
}

# rtt NETNS ADDRESS -> "MEAN,MEDIAN" idle round-trip time in microseconds (200 pings, 5 ms apart)
rtt() {
    ip netns exec "$1" $(on_machine A) ping -c 200 -i 0.005 "$2" | python3 -c '
import re, statistics, sys
times = [float(t) * 1000 for t in re.findall(r"time=([\d.]+) ms", sys.stdin.read())]
print(f"{statistics.mean(times)},{statistics.median(times)}")'
}

declare -A GBPS RTT MSS

# (1) Direct veth with the tunnel's MSS (underlay 1500 - 64 tunnel overhead - 40 IP/TCP headers).
MSS[direct]=1396
GBPS[direct]=$(throughput "$NS_A" "$NS_B" 172.31.251.2 -M "${MSS[direct]}")
RTT[direct]=$(rtt "$NS_A" 172.31.251.2)

# (2) Canopy tunnel.
cat > "$WORK/routes.json" <<JSON
{"nodes": [{"name": "a", "subnet": "10.16.0.0/26", "endpoint": "172.31.251.1:50103"},
           {"name": "b", "subnet": "10.16.0.64/26", "endpoint": "172.31.251.2:50103"}],
 "services": [
   {"name": "bench.default.client.default", "service_ip": "10.30.0.1",
    "instances": [{"number": 0, "instance_ip": "10.30.1.1", "namespace_ip": "10.16.0.2", "node": "a"}]},
   {"name": "bench.default.server.default", "service_ip": "10.30.0.2",
    "instances": [{"number": 0, "instance_ip": "10.30.2.1", "namespace_ip": "10.16.0.66", "node": "b"}]}]}
JSON
start_agent() { # NETNS NODE SUBNET ADDRESS PREFIX MACHINE
    ip netns exec "$1" true # fail early if the namespace is missing
    nsenter --net="/run/netns/$1" $(on_machine "$6") "$AGENT" --data-dir "$WORK/$2" dataplane --node "$2" --subnet "$3" \
        --routes "$WORK/routes.json" --listen "$4:50103" --prefix "$5" "${AGENT_FLAGS[@]}" > "$WORK/agent-$2.log" 2>&1 &
    PIDS+=($!)
}
start_agent "$NS_A" a 10.16.0.0/26 172.31.251.1 "$PREFIX_A" A
start_agent "$NS_B" b 10.16.0.64/26 172.31.251.2 "$PREFIX_B" B
for node in a b; do
    for _ in $(seq 100); do [[ -S "$WORK/$node/agent.sock" ]] && break; sleep 0.1; done
done
"$AGENT" --data-dir "$WORK/a" run --service bench.default.client.default -- sleep infinity > "$WORK/client.log" 2>&1 &
PIDS+=($!)
"$AGENT" --data-dir "$WORK/b" run --service bench.default.server.default -- sleep infinity > "$WORK/server.log" 2>&1 &
PIDS+=($!)
CLIENT_NS="$PREFIX_A-bench.default.client.default-0"; SERVER_NS="$PREFIX_B-bench.default.server.default-0"
for ns in "$CLIENT_NS" "$SERVER_NS"; do
    for _ in $(seq 100); do ip netns exec "$ns" ip -4 addr show canopy0 2>/dev/null | grep -q inet && break; sleep 0.1; done
done
# The client calls the server's ServiceIP.
ip netns exec "$CLIENT_NS" ping -q -c 1 -W 2 10.30.0.2 >/dev/null
MSS[canopy]=1396
GBPS[canopy]=$(throughput "$CLIENT_NS" "$SERVER_NS" 10.30.0.2)
RTT[canopy]=$(rtt "$CLIENT_NS" 10.30.0.2)
curl_status() { python3 - "$1" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
s.sendall(b"GET /v1/dataplane HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")
data = b""
while chunk := s.recv(65536): data += chunk
c = json.loads(data.split(b"\r\n\r\n", 1)[1])["counters"]
drops = " ".join(f"{k}={v}" for k, v in c.items() if v and k.startswith("drop")) or "no drops"
# Datagrams per send/receive call: > 1 when UDP GSO / recvmmsg + GRO batch them.
tx = c.get("tunnel_tx_packets", 0) / max(c.get("tunnel_tx_sends", 0), 1)
rx = c.get("tunnel_rx_packets", 0) / max(c.get("tunnel_rx_reads", 0), 1)
print(f"{drops} (datagrams per send {tx:.1f}, per receive {rx:.1f})" if "tunnel_tx_sends" in c else drops)
PY
}
DROPS_A=$(curl_status "$WORK/a/agent.sock"); DROPS_B=$(curl_status "$WORK/b/agent.sock")

# (2b) The same with encrypted tunnels: a tunnel_key in the route table, installed through the API.
put_routes() { python3 - "$1" "$2" <<'PY'
import json, socket, sys
table = json.load(open(sys.argv[2])); table["tunnel_key"] = "5a" * 32
body = json.dumps(table).encode()
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
s.sendall(b"PUT /v1/dataplane/routes HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\n"
          + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
answer = b""
while chunk := s.recv(65536): answer += chunk
assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
PY
}
put_routes "$WORK/a/agent.sock" "$WORK/routes.json"; put_routes "$WORK/b/agent.sock" "$WORK/routes.json"
ip netns exec "$CLIENT_NS" ping -q -c 3 -W 2 10.30.0.2 >/dev/null
MSS[sealed]=1396
GBPS[sealed]=$(throughput "$CLIENT_NS" "$SERVER_NS" 10.30.0.2)
RTT[sealed]=$(rtt "$CLIENT_NS" 10.30.0.2)
udp_errors() { ip netns exec "$1" awk '/^Udp:/ { if (!seen) { split($0, names); seen = 1 } else { for (i = 2; i <= NF; i++) if (names[i] ~ /Errors/) printf "%s=%s ", names[i], $i } }' /proc/net/snmp; }
UDP_A=$(udp_errors "$NS_A"); UDP_B=$(udp_errors "$NS_B")
SEALED_A=$(curl_status "$WORK/a/agent.sock"); SEALED_B=$(curl_status "$WORK/b/agent.sock")

# (3) boringtun between the same namespaces.
keypair() { # -> "private_hex public_hex"
    openssl genpkey -algorithm X25519 -out "$WORK/key.pem" 2>/dev/null
    local private public
    private=$(openssl pkey -in "$WORK/key.pem" -outform DER | tail -c 32 | od -An -tx1 | tr -d ' \n')
    public=$(openssl pkey -in "$WORK/key.pem" -pubout -outform DER | tail -c 32 | od -An -tx1 | tr -d ' \n')
    echo "$private $public"
}
read -r PRIV_A PUB_A <<< "$(keypair)"
read -r PRIV_B PUB_B <<< "$(keypair)"
uapi() { # IFACE CONFIG
    python3 - "/var/run/wireguard/$1.sock" "$2" <<'PY'
import socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
s.sendall(("set=1\n" + sys.argv[2] + "\n").encode())
answer = s.recv(4096).decode()
assert "errno=0" in answer, answer
PY
}
start_boringtun() { # NETNS IFACE MACHINE
    nsenter --net="/run/netns/$1" $(on_machine "$3") "$BORINGTUN" "$2" --foreground --disable-drop-privileges > "$WORK/$2.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 100); do [[ -S "/var/run/wireguard/$2.sock" ]] && break; sleep 0.1; done
}
start_boringtun "$NS_A" "$WG_A" A
start_boringtun "$NS_B" "$WG_B" B
uapi "$WG_A" "private_key=$PRIV_A
listen_port=51820
public_key=$PUB_B
endpoint=172.31.251.2:51820
allowed_ip=192.168.251.2/32
"
uapi "$WG_B" "private_key=$PRIV_B
listen_port=51820
public_key=$PUB_A
endpoint=172.31.251.1:51820
allowed_ip=192.168.251.1/32
"
# WireGuard over IPv4 adds 60 bytes: MTU 1440, MSS 1400.
for side in "$NS_A $WG_A 192.168.251.1" "$NS_B $WG_B 192.168.251.2"; do
    read -r ns wg addr <<< "$side"
    ip -n "$ns" addr add "$addr/24" dev "$wg"; ip -n "$ns" link set "$wg" mtu 1440 up
done
ip netns exec "$NS_A" ping -q -c 3 -W 2 192.168.251.2 >/dev/null
MSS[boringtun]=1400
GBPS[boringtun]=$(throughput "$NS_A" "$NS_B" 192.168.251.2)
RTT[boringtun]=$(rtt "$NS_A" 192.168.251.2)

python3 - "$DURATION" "$CPU_LATENCY" "${PIN_CPU:-${SPLIT:+split}}" "$BUSY_POLL" \
    "(1) direct veth" "${MSS[direct]}" "${GBPS[direct]}" "${RTT[direct]}" \
    "(2) canopy tunnel" "${MSS[canopy]}" "${GBPS[canopy]}" "${RTT[canopy]}" \
    "(2b) canopy sealed" "${MSS[sealed]}" "${GBPS[sealed]}" "${RTT[sealed]}" \
    "(3) boringtun" "${MSS[boringtun]}" "${GBPS[boringtun]}" "${RTT[boringtun]}" <<'PY'
import sys
rows = [(sys.argv[i], sys.argv[i + 1], float(sys.argv[i + 2]), [float(v) for v in sys.argv[i + 3].split(",")])
        for i in range(5, 21, 4)]
latency = f"CPU wake-up latency bound {sys.argv[2]} us held" if sys.argv[2] else "no CPU latency bound"
placement = {"": "processes on any CPU", "split": "machine A's processes on CPU 0, machine B's on CPU 1"}.get(
    sys.argv[3], f"every process on CPU {sys.argv[3]}")
polling = f"agents busy-poll {sys.argv[4]} us" if sys.argv[4] else "agents sleep at once"
print(f"iperf3 single TCP stream, {sys.argv[1]} s; idle RTT of 200 pings, mean / median; {latency}; {placement}; "
      f"{polling}")
print("| path               | MSS  | Gbit/s | x direct | RTT us mean / median | +RTT us mean / median |")
print("|--------------------|------|--------|----------|----------------------|-----------------------|")
_, _, d_bps, (d_mean, d_median) = rows[0]
for name, mss, bps, (mean, median) in rows:
    print(f"| {name:<18} | {mss} | {bps/1e9:6.2f} | {bps/d_bps:8.2f} | {mean:9.0f} / {median:6.0f}   "
          f"| {mean-d_mean:10.0f} / {median-d_median:6.0f}   |")
b_bps = rows[3][2]
print(f"canopy / boringtun throughput: plain {rows[1][2]/b_bps:.2f}x, sealed {rows[2][2]/b_bps:.2f}x")
PY
echo "canopy drops: a: $DROPS_A; b: $DROPS_B"
echo "after the sealed run too (counters add up): a: $SEALED_A; b: $SEALED_B"
echo "underlay UDP errors after the canopy run: a: $UDP_A; b: $UDP_B"
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) CPUs"
