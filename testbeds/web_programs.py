"""Small Python programs the testbeds run inside service namespaces (via `agent run`), shared by the netns
scenarios, the demo and the Mininet/containernet runners.

- WEB_SERVER: `python3 -c WEB_SERVER <machine>` answers every GET with `hello from <machine>`, so a client sees
  which instance a policy picked.
- WEB_CLIENT: `python3 -c WEB_CLIENT PLAN_JSON` waits until every `warm_urls` entry answers (servers may still be
  starting, routes may still be cold), then fetches each `fetches` entry `[label, url, count]` `count` times with a
  new connection each time and prints one JSON line: `{"results": [{label, url, answer, ms}, ...]}` or
  `{"error": ...}`. Names in URLs resolve through the agent's DNS on the bridge gateway.
"""

from __future__ import annotations

import json

HTTP_PORT = 8080

WEB_SERVER = f"""
import http.server, sys
answer = ("hello from " + sys.argv[1] + "\\n").encode()
class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", {HTTP_PORT}), Hello).serve_forever()
"""

WEB_CLIENT = """
import json, sys, time, urllib.request
plan = json.loads(sys.argv[1])
def get(url):
    start = time.monotonic()
    with urllib.request.urlopen(url, timeout=plan.get("fetch_timeout", 5)) as reply:
        return reply.read().decode().strip(), round((time.monotonic() - start) * 1000, 1)
began = time.monotonic()
deadline = began + plan["warmup"]
for warm_url in plan["warm_urls"]:
    while True:
        try:
            get(warm_url)
            break
        except Exception as err:
            if time.monotonic() > deadline:
                print(json.dumps({"error": warm_url + ": " + str(err)}))
                sys.exit(1)
            time.sleep(0.3)
warm_ms = round((time.monotonic() - began) * 1000, 1)
results = []
for label, url, count in plan["fetches"]:
    for _ in range(count):
        try:
            answer, ms = get(url)
        except Exception as err:
            answer, ms = "error: " + str(err), None
        results.append({"label": label, "url": url, "answer": answer, "ms": ms})
print(json.dumps({"results": results, "warm_ms": warm_ms}))
"""


def client_plan(warm_urls: list[str], fetches: list[tuple[str, str, int]], warmup: float) -> str:
    """The JSON argument of WEB_CLIENT."""
    return json.dumps({"warm_urls": warm_urls, "warmup": warmup, "fetches": [list(f) for f in fetches]})


def parse_client_output(text: str) -> dict:
    """WEB_CLIENT's JSON line (the last line of its output); raises ValueError when there is none."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError(f"no JSON line in the client output: {text.strip()[-400:]}")


# `python3 -c WEB_PROBE URL STOP_FILE`: a new connection to URL every PROBE_INTERVAL seconds until STOP_FILE exists;
# one JSON line per attempt: {"t": wall-clock seconds, "ok": bool, "answer": ...}. Used to see whether traffic keeps
# flowing (and how long it stops) while the tree heals.
PROBE_INTERVAL = 0.2
WEB_PROBE = f"""
import json, os, sys, time, urllib.request
target, stop_file = sys.argv[1], sys.argv[2]
while not os.path.exists(stop_file):
    began = time.time()
    try:
        with urllib.request.urlopen(target, timeout=1) as reply:
            entry = {{"t": began, "ok": True, "answer": reply.read().decode().strip()}}
    except Exception as err:
        entry = {{"t": began, "ok": False, "answer": str(err)}}
    print(json.dumps(entry), flush=True)
    time.sleep(max(0.0, {PROBE_INTERVAL} - (time.time() - began)))
"""


def probe_outages(lines: list[dict], since: float, until: float) -> dict:
    """From WEB_PROBE lines: attempts and failures in [since, until], the longest time without a successful
    connection in that window (seconds; from the last success before a failure to the next success), and the
    time from `since` until the first success that follows the last failure (0 when nothing failed)."""
    window = [e for e in lines if since <= e["t"] <= until]
    failures = [e for e in window if not e["ok"]]
    longest = 0.0
    last_ok = since
    outage_start = None
    for entry in window:
        if entry["ok"]:
            if outage_start is not None:
                longest = max(longest, entry["t"] - last_ok)
                outage_start = None
            last_ok = entry["t"]
        elif outage_start is None:
            outage_start = entry["t"]
    if outage_start is not None:  # still failing at the end of the window
        longest = max(longest, until - last_ok)
    recovered = 0.0
    if failures:
        later_ok = [e["t"] for e in window if e["ok"] and e["t"] > failures[-1]["t"]]
        recovered = (later_ok[0] - since) if later_ok else float("inf")
    return {"attempts": len(window), "failures": len(failures), "longest_outage_s": round(longest, 2), "recovered_after_s": round(recovered, 2)}


def read_probe_log(text: str) -> list[dict]:
    """The JSON lines of a WEB_PROBE log (other lines, e.g. from `agent run`, are skipped)."""
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
    return lines
