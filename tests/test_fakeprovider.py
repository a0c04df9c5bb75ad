"""The fake provider itself: real sockets, httpx, and one run of the real Codex CLI."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakeprovider import FakeError, FakeProvider, FakeUsage, iter_sse

CODEX = Path(os.environ.get("CODEX_BIN") or Path(__file__).resolve().parents[1]
             / "tools/codex/node_modules/.bin/codex")

EXEC_COMMAND_TOOL = {
    "type": "function",
    "name": "exec_command",
    "parameters": {
        "type": "object",
        "properties": {"cmd": {"type": "string"}, "workdir": {"type": "string"}},
        "required": ["cmd"],
    },
}
SHELL_ARRAY_TOOL = {
    "type": "function",
    "name": "shell",
    "parameters": {
        "type": "object",
        "properties": {"command": {"type": "array", "items": {"type": "string"}}},
    },
}
SHELL_COMMAND_TOOL = {
    "type": "function",
    "name": "shell_command",
    "parameters": {"type": "object", "properties": {"command": {"type": "string"}}},
}
USER_MSG = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}


@pytest.fixture(scope="module")
def shared_fake() -> Iterator[FakeProvider]:
    with FakeProvider() as fp:
        yield fp


@pytest.fixture
def fake(shared_fake: FakeProvider) -> FakeProvider:
    shared_fake.reset()
    return shared_fake


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5, trust_env=False) as c:
        yield c


def responses_body(input_items: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "model": "gpt-5.5",
        "stream": True,
        "input": input_items,
        "tools": [EXEC_COMMAND_TOOL],
        **extra,
    }


def sse_events(raw: bytes) -> list[tuple[str | None, dict[str, Any]]]:
    return [(name, json.loads(data)) for name, data in iter_sse(raw)]


def post_stream(client: httpx.Client, url: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    r = client.post(url, json=body)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.content)
    for name, data in events:
        assert name == data["type"]
    return [data for _, data in events]


def final_item(events: list[dict[str, Any]]) -> dict[str, Any]:
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert len(done) == 1
    return done[0]


# ---------------------------------------------------------------- responses


def test_streamed_answer_events_and_usage(fake: FakeProvider, client: httpx.Client) -> None:
    fake.tool_calls = 0
    fake.delta_count = 5
    events = post_stream(client, f"{fake.base_url}/responses", responses_body([USER_MSG]))
    types = [e["type"] for e in events]
    assert types == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        *["response.output_text.delta"] * 5,
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert deltas == "FAKE-ANSWER-42"
    item = final_item(events)
    assert item["type"] == "message" and item["role"] == "assistant"
    assert item["content"][0]["text"] == "FAKE-ANSWER-42"
    resp = events[-1]["response"]
    assert resp["model"] == "gpt-5.5" and resp["status"] == "completed"
    assert resp["usage"] == {
        "input_tokens": 1200,
        "input_tokens_details": {"cached_tokens": 1000},
        "output_tokens": 50,
        "output_tokens_details": {"reasoning_tokens": 20},
        "total_tokens": 1250,
    }


def test_knobs_answer_usage_delta_count(fake: FakeProvider, client: httpx.Client) -> None:
    fake.tool_calls = 0
    fake.answer_text = "x" * 96
    fake.delta_count = 48
    fake.usage = FakeUsage(input_tokens=10, cached_tokens=3, output_tokens=7, reasoning_tokens=2)
    body = responses_body([USER_MSG], model="some-model")
    events = post_stream(client, f"{fake.base_url}/responses", body)
    assert len(events) == 53
    deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    assert deltas == ["xx"] * 48
    resp = events[-1]["response"]
    assert resp["model"] == "some-model"
    assert resp["usage"]["input_tokens_details"] == {"cached_tokens": 3}
    assert resp["usage"]["total_tokens"] == 17


def test_tool_loop(fake: FakeProvider, client: httpx.Client) -> None:
    url = f"{fake.base_url}/responses"
    first = post_stream(client, url, responses_body([USER_MSG]))
    call = final_item(first)
    assert call["type"] == "function_call" and call["name"] == "exec_command"
    assert json.loads(call["arguments"]) == {"cmd": "echo fake-tool-ran"}
    types = [e["type"] for e in first]
    assert "response.function_call_arguments.done" in types
    assert types[-1] == "response.completed"
    assert first[-1]["response"]["output"] == [call]

    # Codex appends the call and its output; the fake then answers.
    output = {"type": "function_call_output", "call_id": call["call_id"], "output": "fake-tool-ran"}
    second = post_stream(client, url, responses_body([USER_MSG, call, output]))
    assert final_item(second)["content"][0]["text"] == "FAKE-ANSWER-42"

    # A new user message starts a new turn: a tool call again.
    later = [USER_MSG, call, output, final_item(second), USER_MSG]
    assert final_item(post_stream(client, url, responses_body(later)))["type"] == "function_call"
    assert [r.kind for r in fake.requests] == ["tool_call", "answer", "tool_call"]


@pytest.mark.parametrize(
    ("tool", "args"),
    [
        (SHELL_ARRAY_TOOL, {"command": ["bash", "-lc", "echo fake-tool-ran"]}),
        (SHELL_COMMAND_TOOL, {"command": "echo fake-tool-ran"}),
    ],
)
def test_tool_shape_follows_tools_list(
    fake: FakeProvider, client: httpx.Client, tool: dict[str, Any], args: dict[str, Any]
) -> None:
    body = responses_body([USER_MSG], tools=[{"type": "custom", "name": "apply_patch"}, tool])
    call = final_item(post_stream(client, f"{fake.base_url}/responses", body))
    assert call["name"] == tool["name"]
    assert json.loads(call["arguments"]) == args


def test_turn_id_survives_compaction(fake: FakeProvider, client: httpx.Client) -> None:
    """Codex's compaction drops tool outputs; a Codex turn id keeps the script on track."""
    url = f"{fake.base_url}/responses"
    meta = {"client_metadata": {"turn_id": "turn-1"}, "prompt_cache_key": "sess-1"}
    call = final_item(post_stream(client, url, responses_body([USER_MSG], **meta)))
    output = {"type": "function_call_output", "call_id": call["call_id"], "output": "ok"}
    prompt = {
        "type": "message",
        "role": "user",
        "content": [
            {"type": "input_text", "text": "You are performing a CONTEXT CHECKPOINT COMPACTION."}
        ],
    }
    compaction = post_stream(client, url, responses_body([USER_MSG, call, output, prompt], **meta))
    assert final_item(compaction)["content"][0]["text"] == "FAKE-COMPACTION-SUMMARY"
    summary = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "s"}]}
    after = post_stream(client, url, responses_body([USER_MSG, summary], **meta))
    assert final_item(after)["content"][0]["text"] == "FAKE-ANSWER-42"
    trigger = post_stream(client, url, responses_body([USER_MSG, {"type": "compaction_trigger"}]))
    assert final_item(trigger)["type"] == "compaction"
    assert [r.kind for r in fake.requests] == ["tool_call", "compaction", "answer", "compaction"]


def test_non_streaming_responses(fake: FakeProvider, client: httpx.Client) -> None:
    fake.tool_calls = 0
    r = client.post(f"{fake.base_url}/responses", json=responses_body([USER_MSG], stream=False))
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    obj = r.json()
    assert obj["object"] == "response" and obj["model"] == "gpt-5.5"
    assert obj["output"][0]["content"][0]["text"] == "FAKE-ANSWER-42"
    assert obj["usage"]["output_tokens_details"] == {"reasoning_tokens": 20}


def test_compact_endpoint(fake: FakeProvider, client: httpx.Client) -> None:
    body = {"model": "gpt-5.5", "input": [USER_MSG], "instructions": "x"}
    obj = client.post(f"{fake.base_url}/responses/compact", json=body).json()
    assert obj["object"] == "response.compaction"
    assert obj["output"][0] == USER_MSG
    assert obj["output"][-1]["type"] == "compaction"
    assert obj["usage"]["input_tokens"] == 1200
    assert fake.requests[0].kind == "compact"


# ---------------------------------------------------------------- chat


def chat_chunks(raw: bytes) -> list[Any]:
    data = [d for _, d in iter_sse(raw)]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_chat_streaming_with_usage(fake: FakeProvider, client: httpx.Client) -> None:
    body = {
        "model": "gpt-4o",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "hi"}],
    }
    r = client.post(f"{fake.base_url}/chat/completions", json=body)
    assert r.headers["content-type"].startswith("text/event-stream")
    chunks = chat_chunks(r.content)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "FAKE-ANSWER-42"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {
        "prompt_tokens": 1200,
        "prompt_tokens_details": {"cached_tokens": 1000},
        "completion_tokens": 50,
        "completion_tokens_details": {"reasoning_tokens": 20},
        "total_tokens": 1250,
    }
    assert all(c["usage"] is None for c in chunks[:-1])
    assert all(c["model"] == "gpt-4o" for c in chunks)

    del body["stream_options"]
    chunks = chat_chunks(client.post(f"{fake.base_url}/chat/completions", json=body).content)
    assert all("usage" not in c and c["choices"] for c in chunks)


def test_chat_non_streaming(fake: FakeProvider, client: httpx.Client) -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    obj = client.post(f"{fake.base_url}/chat/completions", json=body).json()
    assert obj["object"] == "chat.completion" and obj["model"] == "gpt-4o"
    assert obj["choices"][0]["message"]["content"] == "FAKE-ANSWER-42"
    assert obj["usage"]["completion_tokens_details"] == {"reasoning_tokens": 20}
    assert obj["usage"]["prompt_tokens_details"] == {"cached_tokens": 1000}


# ---------------------------------------------------------------- failure knobs


def test_fail_next(fake: FakeProvider, client: httpx.Client) -> None:
    fake.fail_next = [401, FakeError(429, "slow down", headers={"retry-after": "2"}), 500]
    url = f"{fake.base_url}/responses"
    r1 = client.post(url, json=responses_body([USER_MSG]))
    assert r1.status_code == 401
    err = r1.json()["error"]
    assert set(err) == {"message", "type", "code", "param"}
    r2 = client.post(f"{fake.base_url}/chat/completions", json={"model": "m", "messages": []})
    assert r2.status_code == 429 and r2.headers["retry-after"] == "2"
    assert r2.json()["error"]["message"] == "slow down"
    assert client.post(url, json=responses_body([USER_MSG])).status_code == 500
    assert client.post(url, json=responses_body([USER_MSG])).status_code == 200
    assert fake.fail_next == []
    assert [r.status for r in fake.requests] == [401, 429, 500, 200]


def test_cut_stream_after_clean_eof(fake: FakeProvider, client: httpx.Client) -> None:
    fake.tool_calls = 0
    fake.cut_stream_after = 4
    events = post_stream(client, f"{fake.base_url}/responses", responses_body([USER_MSG]))
    assert len(events) == 4
    assert "response.completed" not in [e["type"] for e in events]


def test_cut_stream_after_abort(fake: FakeProvider, client: httpx.Client) -> None:
    fake.cut_stream_after = 2
    fake.cut_stream_abort = True
    with pytest.raises(httpx.RemoteProtocolError):
        client.post(f"{fake.base_url}/responses", json=responses_body([USER_MSG]))
    # The server is fine afterwards.
    fake.cut_stream_after = None
    assert client.post(f"{fake.base_url}/responses", json=responses_body([USER_MSG])).is_success


def test_event_delay_streams_spread_out(fake: FakeProvider, client: httpx.Client) -> None:
    fake.tool_calls = 0
    fake.delta_count = 4
    fake.event_delay = 0.05  # 9 events -> 8 gaps -> >= 0.4 s
    arrivals: list[float] = []
    t0 = time.monotonic()
    body = responses_body([USER_MSG])
    with client.stream("POST", f"{fake.base_url}/responses", json=body) as r:
        buf = b""
        for chunk in r.iter_bytes():
            buf += chunk
            while b"\n\n" in buf:
                _, buf = buf.split(b"\n\n", 1)
                arrivals.append(time.monotonic() - t0)
    assert len(arrivals) == 9
    assert arrivals[0] < 0.2, arrivals  # the first event is not held back
    assert arrivals[-1] - arrivals[0] >= 0.35, arrivals
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert min(gaps) >= 0.03, gaps


# ---------------------------------------------------------------- recording


def test_recording_and_404(fake: FakeProvider, client: httpx.Client) -> None:
    body = responses_body([USER_MSG])
    before = time.time()
    client.post(
        f"{fake.base_url}/responses",
        json=body,
        headers={"Authorization": "Bearer k", "X-Codex-Turn-Metadata": '{"turn_id":"t"}'},
    )
    r = client.get(f"{fake.base_url}/models?x=1")
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "invalid_request_error"
    reqs = fake.requests
    assert [(q.method, q.path, q.status) for q in reqs] == [
        ("POST", "/v1/responses", 200),
        ("GET", "/v1/models", 404),
    ]
    first = reqs[0]
    assert first.header("authorization") == "Bearer k"
    assert ("x-codex-turn-metadata", '{"turn_id":"t"}') in first.headers
    assert all(name == name.lower() for name, _ in first.headers)
    assert first.json == body and json.loads(first.body) == body
    assert before <= first.received_at <= reqs[1].received_at <= time.time()
    assert reqs[1].query == "x=1" and reqs[1].json is None
    assert fake.requests_to("/models") == [reqs[1]]
    fake.clear()
    assert fake.requests == []


def test_standalone_process() -> None:
    script = Path(__file__).with_name("fakeprovider.py")
    proc = subprocess.Popen(
        [sys.executable, str(script), "--port", "0", "--answer", "STANDALONE"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        with httpx.Client(timeout=5, trust_env=False) as c:
            obj = c.post(f"{url}/chat/completions", json=body).json()
        assert obj["choices"][0]["message"]["content"] == "STANDALONE"
    finally:
        proc.terminate()
        assert proc.wait(timeout=5) == 0


# ---------------------------------------------------------------- the real Codex CLI


def codex_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(CODEX_HOME=str(home), OPENAI_TEST_KEY="test-key-123", NO_PROXY="127.0.0.1")
    return env


def write_codex_config(home: Path, base_url: str) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f"""model = "gpt-5.5"
model_provider = "fake"
approval_policy = "never"
sandbox_mode = "workspace-write"

[model_providers.fake]
name = "fake"
base_url = "{base_url}"
env_key = "OPENAI_TEST_KEY"
wire_api = "responses"

[analytics]
enabled = false

[features]
plugins = false
"""
    )


@pytest.mark.codex
@pytest.mark.skipif(
    not (CODEX.exists() and shutil.which("node")), reason=f"Codex CLI not installed at {CODEX}"
)
def test_real_codex_runs_tool_and_prints_answer(fake: FakeProvider, tmp_path: Path) -> None:
    home, work = tmp_path / "codex-home", tmp_path / "work"
    work.mkdir()
    write_codex_config(home, fake.base_url)
    proc = subprocess.run(
        [str(CODEX), "exec", "--skip-git-repo-check", "run the tool"],
        cwd=work,
        env=codex_env(home),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "FAKE-ANSWER-42" in proc.stdout
    reqs = fake.requests
    assert [(r.path, r.kind) for r in reqs] == [
        ("/v1/responses", "tool_call"),
        ("/v1/responses", "answer"),
    ]
    assert all(r.header("authorization") == "Bearer test-key-123" for r in reqs)
    outputs = [i for i in reqs[1].json["input"] if i.get("type") == "function_call_output"]
    assert len(outputs) == 1 and "fake-tool-ran" in outputs[0]["output"]
