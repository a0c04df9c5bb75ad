"""Coverage-guided fuzzing of the protocol parsers with atheris (libFuzzer), one harness
at a time, each in its own process.

    .venv/bin/pip install -e ".[dev,fuzz]"                  # atheris (Linux x86_64 wheels)
    .venv/bin/python benchmarks/fuzz/run.py --seconds 600   # every harness, 10 min each
    .venv/bin/python benchmarks/fuzz/run.py --seconds 60 --harness stream_readers
    .venv/bin/python benchmarks/fuzz/run.py --harness translator --replay crash-123

Corpora and crash files go to ``--workdir`` (default ``.fuzz/``, one folder per
harness; a rerun resumes from its corpus). Prints one line per harness: executions,
coverage, corpus size, and OK or the crash file. Exits 1 if any harness crashed.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
_RESP = (b'event: response.created\ndata: {"type":"response.created","response":{"id":"r",'
         b'"model":"gpt-5"}}\n\nevent: response.output_text.delta\ndata: {"type":"response.'
         b'output_text.delta","item_id":"m","output_index":0,"content_index":0,"delta":"hi"}'
         b'\n\nevent: response.output_item.done\ndata: {"type":"response.output_item.done",'
         b'"item":{"type":"function_call","call_id":"c","name":"sh","arguments":"{}"}}\n\n'
         b'event: response.completed\ndata: {"type":"response.completed","response":{"id":'
         b'"r","status":"completed","usage":{"input_tokens":5,"input_tokens_details":{'
         b'"cached_tokens":1},"output_tokens":2}}}\n\n')
_CHAT = (b'data: {"id":"c","model":"m","choices":[{"index":0,"delta":{"content":"hi","tool_'
         b'calls":[{"index":0,"id":"t","function":{"name":"f","arguments":"{"}}]},'
         b'"finish_reason":null}]}\n\ndata: {"choices":[{"index":0,"delta":{},"finish_reason"'
         b':"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\ndata: [DONE]\n\n')
_ANTH = (b'event: message_start\ndata: {"type":"message_start","message":{"id":"m","model":'
         b'"c","usage":{"input_tokens":3,"cache_read_input_tokens":1}}}\n\nevent: content_'
         b'block_start\ndata: {"type":"content_block_start","index":0,"content_block":{"type"'
         b':"tool_use","id":"t","name":"sh","input":{}}}\n\nevent: content_block_delta\ndata:'
         b' {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"x"}}'
         b'\n\nevent: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
         b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_'
         b'turn"},"usage":{"output_tokens":4}}\n\n')
_REQUESTS = [
    {"model": "gpt-5", "stream": True, "instructions": "x", "tools": [
        {"type": "function", "name": "sh"}, {"type": "custom", "name": "apply_patch"}],
     "input": [{"type": "message", "role": "user", "content": [
         {"type": "input_text", "text": "hi"}]},
         {"type": "function_call", "call_id": "c", "name": "sh", "arguments": "{}"},
         {"type": "function_call_output", "call_id": "c", "output": "ok"}]},
    {"model": "gpt-5", "messages": [{"role": "user", "content": "hi"}, {
        "role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f",
                                                                      "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c", "content": "ok"}]},
    {"model": "claude", "system": "s", "metadata": {"user_id": '{"session_id":"s"}'},
     "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, {
         "type": "tool_result", "tool_use_id": "t", "content": "ok"}]}]},
]
_BODIES = [b'{"object":"response","status":"completed","output":[{"type":"message","content":'
           b'[{"type":"output_text","text":"x"}]}],"usage":{"input_tokens":1}}',
           b'{"id":"c","choices":[{"index":0,"message":{"content":"x","tool_calls":[{"id":"t",'
           b'"function":{"name":"f","arguments":"{}"}}]},"finish_reason":"stop"}]}',
           b'{"type":"message","content":[{"type":"text","text":"x"},{"type":"tool_use","id":'
           b'"t","name":"n","input":{"a":"b"}}],"stop_reason":"end_turn"}']
_STREAMS = [b"\x07" + s for s in (_RESP, _CHAT, _ANTH)]
_REQ_BYTES = [json.dumps(r).encode() for r in _REQUESTS]
SEEDS: dict[str, list[bytes]] = {
    "request_parsers": _REQ_BYTES,
    "body_readers": _BODIES,
    "stream_readers": _STREAMS,
    "translator": [*_STREAMS, *(b"\x01" + r for r in _REQ_BYTES)],
    "content_capture": [b"\x00" + r + s[1:] for r, s in zip(_REQ_BYTES, _STREAMS, strict=True)],
    "guard_items": _REQ_BYTES,
    "output_guards": _STREAMS,
}


_TOKENS = [
    "type", "model", "input", "messages", "content", "text", "role", "call_id", "name",
    "arguments", "output", "tools", "tool_calls", "tool_call_id", "tool_use_id", "function",
    "index", "choices", "delta", "message", "usage", "id", "finish_reason", "error", "item",
    "item_id", "output_index", "content_block", "stop_reason", "status", "partial_json",
    "part", "system", "metadata", "user_id", "session_id", "turn_id", "input_tokens",
    "output_tokens", "prompt_tokens", "completion_tokens", "cache_read_input_tokens",
    "function_call", "custom_tool_call", "function_call_output", "tool_use", "tool_result",
    "text_delta", "input_json_delta", "response.completed", "response.output_text.delta",
    "response.output_item.done", "message_start", "message_delta", "content_block_delta"]
DICT = [f'"\\"{t}\\""' for t in _TOKENS] + [
    '":1"', '":[]"', '":{}"', '":null"', '":\\"\\""', '"[["', '"event: "', '"data: "',
    '"\\x0a\\x0a"', '"\\x0d\\x0a"', '"[DONE]"', '"-----BEGIN "', '"AKIA"']
"""libFuzzer dictionary: JSON keys and SSE framing, so mutations make real shapes."""


def child(name: str, seconds: int, workdir: Path) -> None:
    """Run one harness under atheris in this process (libFuzzer owns the loop)."""
    import atheris

    sys.path.insert(0, str(HERE))
    with atheris.instrument_imports(include=["agent_egress", "harnesses"]):
        from harnesses import HARNESSES
    target = HARNESSES[name]
    corpus = workdir / name / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(SEEDS[name]):
        (corpus / f"seed-{i}").write_bytes(seed)
    tokens = workdir / "tokens.dict"
    tokens.write_text("\n".join(DICT) + "\n")
    atheris.Setup([sys.argv[0], str(corpus), f"-max_total_time={seconds}", "-max_len=65536",
                   f"-dict={tokens}",
                   "-rss_limit_mb=2048", "-timeout=10", "-print_final_stats=1",
                   f"-artifact_prefix={workdir / name}/"], target)
    atheris.Fuzz()


def parse(log: str) -> dict[str, str]:
    """The figures worth a line: executions, coverage, corpus, crash file."""
    out = {"execs": "?", "cov": "?", "corpus": "?", "crash": ""}
    m = re.search(r"stat::number_of_executed_units: (\d+)", log)
    if m:
        out["execs"] = m.group(1)
    covs = re.findall(r"cov: (\d+) ft: \d+ corp: (\d+)", log)
    if covs:
        out["cov"], out["corpus"] = covs[-1]
    m = re.search(r"Test unit written to (\S+)", log)
    if m:
        out["crash"] = m.group(1)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=60, help="per harness (default 60)")
    ap.add_argument("--harness", action="append", choices=sorted(SEEDS),
                    help="repeatable; default: all")
    ap.add_argument("--workdir", type=Path, default=Path(".fuzz"))
    ap.add_argument("--replay", type=Path, help="run one input through --harness and exit")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.seconds, args.workdir.resolve())
        return 0
    if args.replay:
        sys.path.insert(0, str(HERE))
        from harnesses import HARNESSES
        for name in args.harness or sorted(SEEDS):
            HARNESSES[name](args.replay.read_bytes())
            print(f"{name}: no exception")
        return 0
    failed = 0
    print(f"{'harness':<16} {'seconds':>7} {'execs':>10} {'cov':>6} {'corpus':>6}  result")
    for name in args.harness or sorted(SEEDS):
        log_path = args.workdir.resolve() / name / "fuzz.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        with log_path.open("w") as log:
            try:
                proc = subprocess.run(
                    [sys.executable, __file__, "--child", name, "--seconds", str(args.seconds),
                     "--workdir", str(args.workdir.resolve())],
                    stdout=log, stderr=subprocess.STDOUT, timeout=args.seconds + 120)
                code = proc.returncode
            except subprocess.TimeoutExpired:
                code = -1
        took = time.monotonic() - started
        got = parse(log_path.read_text(errors="replace"))
        result = "OK" if code == 0 else f"CRASH {got['crash'] or log_path}"
        failed += code != 0
        print(f"{name:<16} {took:>7.0f} {got['execs']:>10} {got['cov']:>6} {got['corpus']:>6}"
              f"  {result}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
