#!/usr/bin/env python3
"""Sideyard's load benchmark: the same load, in alternation, straight to an upstream, through
the sidecar, and through nginx as a plain keep-alive reverse proxy. See bench/README.md.

Standard library only. Expects `target/release/sideyard`, `oha` and `nginx` (bench/run.sh
provides them).
"""

import argparse
import datetime
import http.client
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import plots

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "sideyard")
PROXY_CPU = "0"  # the proxy under test
LOAD_CPU = "1"  # the load generator and the upstream
UPSTREAM, NGINX, SIDECAR, ADMIN, MOCK = 18090, 18091, 18092, 18093, 18094
KEY = "sk-bench-0123456789"

JSON_ANSWER = (
    '{"id":"chatcmpl-bench","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,'
    '"message":{"role":"assistant","content":"Hello from the benchmark upstream, all good."},'
    '"finish_reason":"stop"}],"usage":{"prompt_tokens":14,"completion_tokens":9,"total_tokens":23}}'
)
SSE_ANSWER = "".join(
    "data: " + json.dumps(e, separators=(",", ":")) + "\n\n"
    for e in [
        {"id": "c", "object": "chat.completion.chunk", "model": "m", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {"id": "c", "object": "chat.completion.chunk", "model": "m", "choices": [{"index": 0, "delta": {"content": "Hello"}}]},
        {"id": "c", "object": "chat.completion.chunk", "model": "m", "choices": [{"index": 0, "delta": {"content": " there"}}]},
        {"id": "c", "object": "chat.completion.chunk", "model": "m", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {"id": "c", "object": "chat.completion.chunk", "model": "m", "choices": [], "usage": {"prompt_tokens": 14, "completion_tokens": 2, "total_tokens": 16}},
    ]
) + "data: [DONE]\n\n"
MESSAGES_JSON_ANSWER = (
    '{"id":"msg_bench","type":"message","role":"assistant","model":"m","content":[{"type":"text",'
    '"text":"Hello from the benchmark upstream, all good."}],"stop_reason":"end_turn","stop_sequence":null,'
    '"usage":{"input_tokens":14,"output_tokens":9}}'
)
MESSAGES_SSE_ANSWER = "".join(
    f"event: {e['type']}\ndata: " + json.dumps(e, separators=(",", ":")) + "\n\n"
    for e in [
        {"type": "message_start", "message": {"id": "msg_bench", "type": "message", "role": "assistant", "model": "m", "content": [],
                                              "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 14, "output_tokens": 1}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " there"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": {"output_tokens": 2}},
        {"type": "message_stop"},
    ]
)
RESPONSES_JSON_ANSWER = (
    '{"id":"resp_bench","object":"response","created_at":1,"status":"completed","error":null,"incomplete_details":null,'
    '"model":"m","output":[{"type":"message","id":"msg_bench","status":"completed","role":"assistant","content":'
    '[{"type":"output_text","text":"Hello from the benchmark upstream, all good.","annotations":[]}]}],'
    '"usage":{"input_tokens":14,"input_tokens_details":{"cached_tokens":0},"output_tokens":9,'
    '"output_tokens_details":{"reasoning_tokens":0},"total_tokens":23}}'
)
_RESPONSE = {"id": "resp_bench", "object": "response", "status": "in_progress", "model": "m", "output": [], "usage": None}
_MESSAGE = {"type": "message", "id": "msg_bench", "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": "Hello there", "annotations": []}]}
RESPONSES_SSE_ANSWER = "".join(
    f"event: {e['type']}\ndata: " + json.dumps(dict(e, sequence_number=n), separators=(",", ":")) + "\n\n"
    for n, e in enumerate([
        {"type": "response.created", "response": _RESPONSE},
        {"type": "response.output_item.added", "output_index": 0, "item": dict(_MESSAGE, status="in_progress", content=[])},
        {"type": "response.output_text.delta", "item_id": "msg_bench", "output_index": 0, "content_index": 0, "delta": "Hello"},
        {"type": "response.output_text.delta", "item_id": "msg_bench", "output_index": 0, "content_index": 0, "delta": " there"},
        {"type": "response.output_item.done", "output_index": 0, "item": _MESSAGE},
        {"type": "response.completed", "response": dict(_RESPONSE, status="completed", output=[_MESSAGE], usage={
            "input_tokens": 14, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 2, "total_tokens": 16})},
    ])
)
EMBEDDINGS_JSON_ANSWER = (
    '{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.0123,-0.0456,0.0789,0.0012,-0.0345,'
    '0.0678,-0.0901,0.0234]}],"model":"m","usage":{"prompt_tokens":4,"total_tokens":4}}'
)
JSON_BODY = '{"model":"chat","max_tokens":64,"messages":[{"role":"user","content":"Say hello."}]}'
STREAM_BODY = '{"model":"stream","stream":true,"max_tokens":64,"messages":[{"role":"user","content":"Say hello."}]}'
SLOW_BODY = '{"model":"slow","stream":true,"max_tokens":100,"messages":[{"role":"user","content":"Say hello."}]}'


def pinned(cpu, args):
    return ["taskset", "-c", cpu] + args


def sh(args):
    return subprocess.run(args, capture_output=True, text=True, check=False).stdout.strip()


class Proc:
    """A process started for the benchmark, with its CPU time and memory read from /proc."""

    def __init__(self, name, args, with_children=False):
        self.name = name
        self.popen = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.with_children = with_children

    def pids(self):
        """The process, and for nginx its workers."""
        if not self.with_children:
            return [self.popen.pid]
        return [self.popen.pid] + [int(p) for p in sh(["pgrep", "-P", str(self.popen.pid)]).split()]

    def cpu_seconds(self):
        ticks = 0
        for pid in self.pids():
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
        return ticks / os.sysconf("SC_CLK_TCK")

    def memory_kib(self, field):
        total = 0
        for pid in self.pids():
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        total += int(line.split()[1])
        return total

    def stop(self):
        self.popen.terminate()
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            self.popen.kill()


def wait_http(port, path, status=200, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", path)
            if conn.getresponse().status == status:
                return
        except OSError:
            pass
        time.sleep(0.005)
    raise RuntimeError(f"127.0.0.1:{port}{path} did not answer {status}")


def nginx_config(tmp, name, body):
    conf = os.path.join(tmp, f"{name}.conf")
    with open(conf, "w") as f:
        f.write(
            f"worker_processes 1;\ndaemon off;\npid {tmp}/{name}.pid;\nerror_log {tmp}/{name}.error.log;\n"
            f"events {{ worker_connections 8192; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {tmp}/{name}-body;\n"
            f"  proxy_temp_path {tmp}/{name}-proxy;\n{body}\n}}\n"
        )
    return conf





def start_upstream(tmp):
    """nginx answering every POST with canned bytes: the cheapest upstream, so that what is measured
    is the proxies."""
    sse = SSE_ANSWER.replace("'", "\\'")
    conf = nginx_config(
        tmp,
        "upstream",
        f"  server {{\n    listen 127.0.0.1:{UPSTREAM} backlog=4096;\n    keepalive_requests 1000000;\n"
        f"    location /json/ {{ default_type application/json; return 200 '{JSON_ANSWER}'; }}\n"
        f"    location /sse/ {{ default_type text/event-stream; return 200 '{sse}'; }}\n"
        f"    location /ajson/ {{ default_type application/json; return 200 '{MESSAGES_JSON_ANSWER}'; }}\n"
        f"    location /asse/ {{ default_type text/event-stream; return 200 '{MESSAGES_SSE_ANSWER}'; }}\n"
        f"    location /rjson/ {{ default_type application/json; return 200 '{RESPONSES_JSON_ANSWER}'; }}\n"
        f"    location /rsse/ {{ default_type text/event-stream; return 200 '{RESPONSES_SSE_ANSWER}'; }}\n"
        f"    location /ejson/ {{ default_type application/json; return 200 '{EMBEDDINGS_JSON_ANSWER}'; }}\n  }}",
    )
    return Proc("upstream", pinned(LOAD_CPU, ["nginx", "-c", conf]), with_children=True)


def start_nginx_proxy(tmp):
    conf = nginx_config(
        tmp,
        "proxy",
        f"  upstream up {{ server 127.0.0.1:{UPSTREAM}; keepalive 256; keepalive_requests 1000000; }}\n"
        f"  upstream mock {{ server 127.0.0.1:{MOCK}; keepalive 256; }}\n"
        f"  server {{\n    listen 127.0.0.1:{NGINX} backlog=4096;\n    keepalive_requests 1000000;\n"
        "    proxy_http_version 1.1;\n    proxy_set_header Connection \"\";\n    proxy_buffering off;\n"
        "    location /slow/ { proxy_pass http://mock/v1/; }\n"
        "    location / { proxy_pass http://up; }\n  }",
    )
    return Proc("nginx", pinned(PROXY_CPU, ["nginx", "-c", conf]), with_children=True)


def sidecar_config(tmp, routes=None):
    # Anthropic's base URLs are roots, without a version: /v1/messages is appended.
    api = lambda path: "anthropic" if path.startswith("a") else "openai"
    # Upstream paths starting with r speak the Responses API; with e, embeddings.
    native = lambda path: ", nativeResponses: true" if path.startswith("r") else ""
    targets = lambda path: "\n".join(
        f"    - {{name: {n}, api: {api(path)}, baseUrl: 'http://127.0.0.1:{UPSTREAM}/{path}/{'t' if api(path) == 'anthropic' else 'v'}{i}', pricing: {{prompt: '2.5', completion: '10'}}{native(path)}}}"
        for i, n in enumerate(["primary", "secondary", "tertiary"], 1)
    )
    docs = []
    for model, path in routes or [("chat", "json"), ("stream", "sse")]:
        serves = "  serves: embeddings\n" if path.startswith("e") else ""
        docs.append(
            f"apiVersion: sideyard.dev/v1alpha1\nkind: ProviderRoute\nmetadata: {{name: {model}}}\n"
            f"spec:\n  model: {model}\n{serves}  targets:\n{targets(path)}\n"
        )
    if routes is None:
        docs.append(
            "apiVersion: sideyard.dev/v1alpha1\nkind: ProviderRoute\nmetadata: {name: slow}\nspec:\n  model: slow\n"
            f"  targets:\n    - {{name: mock, baseUrl: 'http://127.0.0.1:{MOCK}/v1', pricing: {{completion: '10'}}}}\n"
        )
    docs.append(
        "apiVersion: sideyard.dev/v1alpha1\nkind: ApiKeyBudget\nmetadata: {name: bench}\n"
        "spec: {key: {secretRef: {name: bench-key, key: key}}, limit: '1000000000'}\n"
    )
    docs.append(f"apiVersion: v1\nkind: Secret\nmetadata: {{name: bench-key}}\nstringData: {{key: {KEY}}}\n")
    path = os.path.join(tmp, f"routes-{len(docs)}.yaml")
    with open(path, "w") as f:
        f.write("---\n".join(docs))
    return path


def start_sidecar(tmp, config, state):
    args = [BIN, "sidecar", "-f", config, "--listen", f"127.0.0.1:{SIDECAR}", "--admin-listen", f"127.0.0.1:{ADMIN}",
            "--state-dir", state, "--log", "warn"]
    proc = Proc("sidecar", pinned(PROXY_CPU, args))
    wait_http(ADMIN, "/readyz")
    return proc


def oha(url, body, rate=None, duration=10, connections=64, requests=None, key=True):
    args = ["oha", "--no-tui", "--output-format", "json", "-c", str(connections), "-m", "POST",
            "-H", "content-type: application/json", "-d", body]
    if key:
        args += ["-H", f"authorization: Bearer {KEY}"]
    if requests:
        args += ["-n", str(requests)]
    else:
        # -w: requests in flight at the deadline finish, rather than count as errors.
        args += ["-z", f"{duration}s", "-w"]
    if rate:
        args += ["-q", str(rate), "--latency-correction"]
    out = subprocess.run(pinned(LOAD_CPU, args + [url]), capture_output=True, text=True, check=True).stdout
    d = json.loads(out)
    codes = d.get("statusCodeDistribution") or {}
    return {
        "rps": d["summary"]["requestsPerSec"],
        "ok": codes.get("200", 0),
        "total": sum(codes.values()),
        "errors": sum((d.get("errorDistribution") or {}).values()),
        "latency": d["latencyPercentiles"],
        "first_byte": d.get("firstBytePercentiles") or {},
    }


def measure(system, procs, url, body, **kw):
    proc = procs.get(system)
    before = proc.cpu_seconds() if proc else 0.0
    r = oha(url, body, **kw)
    if proc:
        r["cpu_us_per_request"] = (proc.cpu_seconds() - before) * 1e6 / max(r["ok"], 1)
        r["cpu_util"] = (proc.cpu_seconds() - before) / kw.get("duration", 10)
    return r


# A rate is sustained when the system answers at least this share of what was offered, with no
# errors, and the (latency-corrected) p99 stays under SUSTAINED_P99: past its capacity requests
# queue, and corrected latencies grow by the second, far past it. A step that fails is measured
# once more, so that one hiccup of the VM does not send the search down.
SUSTAINED_SHARE = 0.98
SUSTAINED_P99 = 0.020
SEARCH_STEPS = 6


def sustained_rate(system, procs, ceiling, duration):
    """The highest open-loop rate `system` keeps up with, by bisection between 0 and 110% of what
    it served in closed loop (`ceiling`). Returns the rate and each step's (rate, served, p99)."""
    lo, hi = 0, int(ceiling * 1.1)
    rate = int(ceiling * 0.8)
    steps = []
    for _ in range(SEARCH_STEPS):
        for _attempt in range(2):
            print(f"  open loop {rate}/s", file=sys.stderr)
            r = measure(system, procs, URLS[system]["json"], JSON_BODY, rate=rate, duration=duration, connections=128)
            p99 = r["latency"].get("p99") or float("inf")
            kept_up = r["errors"] == 0 and r["ok"] >= SUSTAINED_SHARE * rate * duration and p99 <= SUSTAINED_P99
            steps.append({"rate": rate, "rps": r["rps"], "p99": p99, "kept_up": kept_up})
            if kept_up:
                break
        lo, hi = (rate, hi) if kept_up else (lo, rate)
        rate = (lo + hi) // 2
    return lo, steps


URLS = {
    "direct": {"json": f"http://127.0.0.1:{UPSTREAM}/json/v1/chat/completions", "sse": f"http://127.0.0.1:{UPSTREAM}/sse/v1/chat/completions"},
    "sidecar": {"json": f"http://127.0.0.1:{SIDECAR}/v1/chat/completions", "sse": f"http://127.0.0.1:{SIDECAR}/v1/chat/completions"},
    "nginx": {"json": f"http://127.0.0.1:{NGINX}/json/v1/chat/completions", "sse": f"http://127.0.0.1:{NGINX}/sse/v1/chat/completions"},
}
BODIES = {"json": JSON_BODY, "sse": STREAM_BODY}
SYSTEMS = ["direct", "sidecar", "nginx"]


# The two APIs across the two wire formats: (name, endpoint, model, upstream path, stream).
TRANSLATION_CASES = [
    ("chat passthrough", "/v1/chat/completions", "chat", "json", False),
    ("chat to anthropic", "/v1/chat/completions", "to-anthropic", "ajson", False),
    ("messages passthrough", "/v1/messages", "messages", "ajson", False),
    ("messages to openai", "/v1/messages", "messages-to-openai", "json", False),
    ("chat passthrough, stream", "/v1/chat/completions", "stream", "sse", True),
    ("chat to anthropic, stream", "/v1/chat/completions", "to-anthropic-stream", "asse", True),
    ("messages passthrough, stream", "/v1/messages", "messages-stream", "asse", True),
    ("messages to openai, stream", "/v1/messages", "messages-to-openai-stream", "sse", True),
    ("responses passthrough", "/v1/responses", "responses", "rjson", False),
    ("responses to chat", "/v1/responses", "responses-to-chat", "json", False),
    ("responses to anthropic", "/v1/responses", "responses-to-anthropic", "ajson", False),
    ("responses passthrough, stream", "/v1/responses", "responses-stream", "rsse", True),
    ("responses to chat, stream", "/v1/responses", "responses-to-chat-stream", "sse", True),
    ("responses to anthropic, stream", "/v1/responses", "responses-to-anthropic-stream", "asse", True),
    ("embeddings passthrough", "/v1/embeddings", "embeddings", "ejson", False),
]


def run_translation(args):
    """CPU per request through the sidecar for each API and target format, at each rate, in
    alternating rounds: a translated request against the passthrough one of the same API."""
    tmp = tempfile.mkdtemp(prefix="sideyard-bench-")
    upstream = start_upstream(tmp)
    config = sidecar_config(tmp, routes=[(model, path) for _, _, model, path, _ in TRANSLATION_CASES])
    sidecar = start_sidecar(tmp, config, os.path.join(tmp, "state"))
    wait_http(UPSTREAM, "/json/")
    procs = {"sidecar": sidecar}
    def body(model, stream):
        streaming = '"stream":true,' if stream else ""
        if model.startswith("responses"):
            return f'{{"model":"{model}",{streaming}"max_output_tokens":64,"input":"Say hello."}}'
        if model.startswith("embeddings"):
            return f'{{"model":"{model}","input":"Say hello."}}'
        return f'{{"model":"{model}",{streaming}"max_tokens":64,"messages":[{{"role":"user","content":"Say hello."}}]}}'
    results = {}
    try:
        for name, endpoint, model, _, stream in TRANSLATION_CASES:
            oha(f"http://127.0.0.1:{SIDECAR}{endpoint}", body(model, stream), requests=1000, connections=16)
        for rate in args.rates:
            runs = {name: [] for name, *_ in TRANSLATION_CASES}
            for round_ in range(args.rounds):
                cases = TRANSLATION_CASES[round_ % 2::1] if round_ % 2 == 0 else list(reversed(TRANSLATION_CASES))
                for name, endpoint, model, _, stream in cases:
                    print(f"{name} {rate}/s round {round_ + 1}", file=sys.stderr)
                    r = measure("sidecar", procs, f"http://127.0.0.1:{SIDECAR}{endpoint}", body(model, stream), rate=rate,
                                duration=args.duration)
                    if r["errors"] or r["ok"] < r["total"]:
                        raise SystemExit(f"{name}: {r['total'] - r['ok']} failed requests, {r['errors']} errors")
                    runs[name].append(r["cpu_us_per_request"])
            results[rate] = {name: med(values) for name, values in runs.items()}
    finally:
        sidecar.stop()
        upstream.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    lines = ["| Rate | Request | CPU per request | vs passthrough of the same API (embeddings: chat's) |", "| --- | --- | --- | --- |"]
    for rate, cpu in results.items():
        for name, endpoint, *_ in TRANSLATION_CASES:
            # Embeddings stand beside chat's passthrough.
            base_endpoint = "/v1/chat/completions" if endpoint == "/v1/embeddings" else endpoint
            base = next(n for n, e, m, p, st in TRANSLATION_CASES
                        if e == base_endpoint and "passthrough" in n and (", stream" in n) == (", stream" in name))
            lines.append(f"| {rate}/s | {name} | {cpu[name]:.1f} µs | {cpu[name] / cpu[base]:.2f}x |")
    return "\n".join(lines) + "\n"


def ms(seconds):
    return seconds * 1000


def run(args):
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    tmp = tempfile.mkdtemp(prefix="sideyard-bench-")
    results = {"rates": {}, "stream": {}, "saturation": {}, "memory": {}, "startup_ms": []}
    upstream = start_upstream(tmp)
    mock = Proc("mock", pinned(LOAD_CPU, [BIN, "mock-provider", "--listen", f"127.0.0.1:{MOCK}", "--chunks", "100",
                                          "--chunk-interval", "50ms", "--log", "warn"]))
    nginx = start_nginx_proxy(tmp)
    sidecar = start_sidecar(tmp, sidecar_config(tmp), os.path.join(tmp, "state"))
    wait_http(UPSTREAM, "/json/")
    wait_http(NGINX, "/json/")
    procs = {"sidecar": sidecar, "nginx": nginx}
    try:
        time.sleep(0.5)
        results["memory"]["idle_kib"] = {"sidecar": sidecar.memory_kib("VmRSS"), "nginx": nginx.memory_kib("VmRSS")}
        # Warm connection pools and code paths.
        for system in SYSTEMS:
            oha(URLS[system]["json"], JSON_BODY, requests=2000, connections=16)
            oha(URLS[system]["sse"], STREAM_BODY, requests=500, connections=16)

        for rate in args.rates:
            runs = {s: [] for s in SYSTEMS}
            for round_ in range(args.rounds):
                order = SYSTEMS[round_ % 3:] + SYSTEMS[:round_ % 3]
                for system in order:
                    print(f"json {rate}/s round {round_ + 1}: {system}", file=sys.stderr)
                    runs[system].append(measure(system, procs, URLS[system]["json"], JSON_BODY, rate=rate, duration=args.duration))
            results["rates"][rate] = runs

        for system in SYSTEMS:
            print(f"stream {args.stream_rate}/s: {system}", file=sys.stderr)
            runs = []
            for _ in range(args.rounds):
                runs.append(measure(system, procs, URLS[system]["sse"], STREAM_BODY, rate=args.stream_rate, duration=args.duration))
            results["stream"][system] = runs

        for system in SYSTEMS:
            print(f"saturation: {system}", file=sys.stderr)
            closed = measure(system, procs, URLS[system]["json"], JSON_BODY, duration=args.duration, connections=128)
            rate, steps = sustained_rate(system, procs, closed["rps"], min(args.duration, 4))
            results["saturation"][system] = {"closed": closed, "sustained": rate, "steps": steps}

        results["memory"]["after_load_kib"] = {"sidecar": sidecar.memory_kib("VmRSS"), "nginx": nginx.memory_kib("VmRSS")}
        # Open streams in fresh processes: what a thousand streams hold, not what the load before
        # left in the allocator.
        sidecar.stop()
        nginx.stop()
        nginx = start_nginx_proxy(tmp)
        sidecar = start_sidecar(tmp, sidecar_config(tmp), os.path.join(tmp, "state-streams"))
        wait_http(NGINX, "/json/")
        procs = {"sidecar": sidecar, "nginx": nginx}
        for system, url in [("sidecar", URLS["sidecar"]["sse"]), ("nginx", f"http://127.0.0.1:{NGINX}/slow/chat/completions")]:
            print(f"1000 open streams: {system}", file=sys.stderr)
            proc = procs[system]
            load = subprocess.Popen(pinned(LOAD_CPU, ["oha", "--no-tui", "--output-format", "quiet", "-c", "1000", "-n", "1000",
                                                      "-m", "POST", "-H", f"authorization: Bearer {KEY}", "-d", SLOW_BODY, url]))
            peak = 0
            while load.poll() is None:
                peak = max(peak, proc.memory_kib("VmRSS"))
                time.sleep(0.05)
            results["memory"].setdefault("open_streams_peak_kib", {})[system] = peak
    finally:
        for p in [sidecar, nginx, mock, upstream]:
            p.stop()

    # Start to ready with 100 routes (three targets each) and a budget.
    config = sidecar_config(tmp, routes=[(f"model-{i}", "json") for i in range(100)])
    for i in range(args.startups):
        started = time.monotonic()
        proc = start_sidecar(tmp, config, os.path.join(tmp, f"state-{i}"))
        results["startup_ms"].append(ms(time.monotonic() - started))
        results["memory"].setdefault("idle_100_routes_kib", proc.memory_kib("VmRSS"))
        proc.stop()
    shutil.rmtree(tmp, ignore_errors=True)
    return results


med = plots.med


def report(results, args):
    machine = {
        "cpu": sh(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"]).strip(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "sideyard": sh(["git", "-C", ROOT, "describe", "--always", "--dirty"]),
        "rustc": sh(["rustc", "--version"]),
        "nginx": subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip(),
        "oha": sh(["oha", "--version"]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    q = plots.quantile
    lines = []
    w = lines.append
    w("## Added latency, JSON (proxy minus direct, same rate, milliseconds)\n")
    w("| rate | proxy | p50 | p90 | p99 | p99.9 | CPU µs/request | errors |")
    w("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in plots.figures(results):
        w(f"| {r['rate']}/s | {r['proxy']} | " + " | ".join(f"{a:.3f}" for a in r["added_ms"])
          + f" | {r['cpu_us']:.0f} | {r['errors']} |")
    w("")
    w("![The added latency of each proxy at each rate, p50 and p99](img/benchmarks-latency.svg)")
    w("![The CPU time per request of each proxy at each rate](img/benchmarks-cpu.svg)")
    w("")
    w(f"Direct latency at each rate, for reference (p50 / p99, ms): " + "; ".join(
        f"{rate}/s: {ms(q(runs['direct'], 'p50')):.3f} / {ms(q(runs['direct'], 'p99')):.3f}" for rate, runs in results["rates"].items()))
    w("")
    w(f"## Streaming at {args.stream_rate}/s (added time to first byte and to the whole stream, ms)\n")
    w("| proxy | first byte p50 | first byte p99 | whole p50 | whole p99 | CPU µs/request |")
    w("| --- | --- | --- | --- | --- | --- |")
    direct = results["stream"]["direct"]
    for system in ["sidecar", "nginx"]:
        r = results["stream"][system]
        w(f"| {system} | {ms(q(r, 'p50', 'first_byte') - q(direct, 'p50', 'first_byte')):.3f} | "
          f"{ms(q(r, 'p99', 'first_byte') - q(direct, 'p99', 'first_byte')):.3f} | "
          f"{ms(q(r, 'p50') - q(direct, 'p50')):.3f} | {ms(q(r, 'p99') - q(direct, 'p99')):.3f} | "
          f"{med([x['cpu_us_per_request'] for x in r]):.0f} |")
    w("")
    w("## Maximum rate on one core\n")
    w(f"Sustained: the highest open-loop rate served at {SUSTAINED_SHARE:.0%} or more, without errors and "
      f"with a p99 under {SUSTAINED_P99 * 1000:.0f} ms ({SEARCH_STEPS} bisection steps; the load generator shares its core "
      "with the upstream, so the direct row is the ceiling of what this machine can offer). Closed loop: "
      "as fast as 128 connections go, one request at a time each.\n")
    w("| target | sustained requests/s | closed loop requests/s | proxy CPU use (closed loop) | errors (closed loop) |")
    w("| --- | --- | --- | --- | --- |")
    for system, r in results["saturation"].items():
        c = r["closed"]
        util = f"{c['cpu_util'] * 100:.0f}%" if "cpu_util" in c else "-"
        w(f"| {system} | {r['sustained']} | {c['rps']:.0f} | {util} | {c['total'] - c['ok'] + c['errors']} |")
    w("")
    m = results["memory"]
    mib = lambda k: f"{k / 1024:.1f} MiB"
    w("## Memory (RSS) and start-up\n")
    w("| | sidecar | nginx (master + worker) |")
    w("| --- | --- | --- |")
    w(f"| idle, after start | {mib(m['idle_kib']['sidecar'])} | {mib(m['idle_kib']['nginx'])} |")
    w(f"| idle, after the load above | {mib(m['after_load_kib']['sidecar'])} | {mib(m['after_load_kib']['nginx'])} |")
    w(f"| peak with 1,000 open streams | {mib(m['open_streams_peak_kib']['sidecar'])} | {mib(m['open_streams_peak_kib']['nginx'])} |")
    w(f"| idle with 100 routes (300 targets) | {mib(m['idle_100_routes_kib'])} | |")
    w("")
    w(f"Start to `/readyz` 200 with 100 routes (300 targets) and a budget: median {med(results['startup_ms']):.1f} ms "
      f"over {len(results['startup_ms'])} starts (min {min(results['startup_ms']):.1f}, max {max(results['startup_ms']):.1f}).")
    w("")
    w("## Machine\n")
    for k, v in machine.items():
        w(f"- {k}: {v}")
    w(f"- command: `bench/run.sh {' '.join(a for a in sys.argv[1:] if not a.startswith('--report') and a != args.report)}`".rstrip())
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rates", type=int, nargs="+", default=[200, 1000, 3000])
    parser.add_argument("--stream-rate", type=int, default=1000)
    parser.add_argument("--duration", type=int, default=10, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per rate")
    parser.add_argument("--startups", type=int, default=7)
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--report", help="replace the results section of this Markdown file")
    parser.add_argument("--translation", action="store_true",
                        help="only measure CPU per request of translated against passthrough requests, both APIs")
    args = parser.parse_args()
    if args.translation:
        print(run_translation(args))
        return
    results = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    text = report(results, args)
    if args.report:
        plots.write(results, os.path.join(os.path.dirname(args.report), "img"))
        with open(args.report) as f:
            doc = f.read()
        start, end = "<!-- results:start -->\n", "<!-- results:end -->"
        head, rest = doc.split(start, 1)
        _, tail = rest.split(end, 1)
        with open(args.report, "w") as f:
            f.write(head + start + text + end + tail)
    print(text)


if __name__ == "__main__":
    main()
