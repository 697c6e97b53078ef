#!/usr/bin/env bash
# The real-size server as a user starts it: python -m server on a full-depth store with a
# 24 GiB device budget, then /generate with a routing trace, an OpenAI chat request and the
# memory plan on /metrics and /v1/experts (docs/memory-plan.md). Needs a CUDA device.
#
#   bash scripts/smoke_full_depth.sh STORE [PORT]
set -uo pipefail
STORE=${1:?usage: smoke_full_depth.sh STORE [PORT]}
PORT=${2:-8765}
URL=http://127.0.0.1:$PORT
SERVER_ARGS=${SERVER_ARGS:---device cuda --gpu-memory 24GiB --host-memory 32GiB}  # CPU try: --device cpu
python3 -m server --store "$STORE" $SERVER_ARGS --port "$PORT" --log-level info >/tmp/smoke_server.log 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null' EXIT
python3 - "$URL" <<'PY'
import json, sys, time, urllib.request

url = sys.argv[1]

def call(path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return response.status, response.read().decode()

deadline = time.monotonic() + 400
while time.monotonic() < deadline:
    try:
        if call("/ready")[0] == 200:
            break
    except OSError:
        time.sleep(1)
else:
    sys.exit("server not ready in 400 s")
print(f"ready after {time.monotonic() - deadline + 400:.0f} s")
status, body = call("/generate", {"prompt": "The expert cache", "max_new_tokens": 8, "trace": True})
trace = json.loads(body)["trace"]
summary = trace["summary"]
print(f"/generate {status}: {len(trace['steps'])} traced steps, hits {summary['hits']}, misses {summary['misses']}, "
      f"loads {summary['loads']}; step 0 layer 0: {json.dumps(trace['steps'][0]['layers'][0])[:200]}")
model = json.loads(call("/v1/models")[1])["data"][0]["id"]
status, body = call("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "Hi"}],
                                              "max_tokens": 8})
chat = json.loads(body)
print(f"/v1/chat/completions {status}: finish_reason {chat['choices'][0]['finish_reason']}, usage {chat['usage']}")
status, body = call("/metrics")
plan = [line for line in body.splitlines() if line.startswith(("cadre_memory_", "cadre_expert_cache_slots",
                                                               "cadre_device_memory_peak", "cadre_host_tier_pinned"))]
print(f"/metrics {status}:\n  " + "\n  ".join(plan))
status, body = call("/v1/experts")
print(f"/v1/experts {status}: memory_plan {json.dumps(json.loads(body).get('memory_plan'))[:400]}")
PY
rc=$?
grep -m1 'memory_plan' /tmp/smoke_server.log | cut -c1-700
exit $rc
