"""Drives the sidecar with the official OpenAI Python SDK, as an application would.

Prints one line per check; tests/openai_sdk.rs asserts them.
"""

import os

import openai
from openai import OpenAI

client = OpenAI(base_url=os.environ["SIDEYARD_BASE_URL"], api_key="unused-by-the-sidecar", max_retries=0)
messages = [{"role": "user", "content": "Say hello"}]

reply = client.chat.completions.create(model="chat", messages=messages)
print(f"json: {reply.model} | {reply.choices[0].message.content} | {reply.usage.completion_tokens}")

raw = client.chat.completions.with_raw_response.create(model="chat", messages=messages)
print(f"headers: {raw.headers['x-sideyard-target']} {raw.headers['x-sideyard-attempts']}")

stream = client.chat.completions.create(model="chat", messages=messages, stream=True)
print("stream: " + "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices))

try:
    client.chat.completions.create(model="no-such-model", messages=messages)
except openai.NotFoundError as e:
    print(f"not found: {e.status_code} {e.code}")

try:
    for _ in client.chat.completions.create(model="breaks", messages=messages, stream=True):
        pass
    print("broken stream: no error raised")
except openai.APIError as e:
    print(f"broken stream: {e.message}")

print("models: " + ",".join(m.id for m in client.models.list()))

# A route whose OpenAI target fails and whose fallback speaks Anthropic's API.
raw = client.chat.completions.with_raw_response.create(model="to-claude", messages=messages)
reply = raw.parse()
print(f"fallback json: {raw.headers['x-sideyard-target']} {raw.headers['x-sideyard-fallback-reason']} | {reply.choices[0].message.content} | {reply.choices[0].finish_reason} | {reply.usage.completion_tokens}")
stream = client.chat.completions.create(model="to-claude", messages=messages, stream=True, stream_options={"include_usage": True})
chunks = list(stream)
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
print(f"fallback stream: {text} | {finish[0]} | {chunks[-1].usage.completion_tokens}")
reply = client.chat.completions.create(model="to-claude-tools", messages=messages, tools=[{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}])
calls = " ".join(f"{c.id}:{c.function.name}:{c.function.arguments}" for c in reply.choices[0].message.tool_calls)
print(f"fallback tools: {calls} | {reply.choices[0].finish_reason}")

embeddings = client.embeddings.create(model="embed", input=["hello", "world"])
print(f"embeddings: {len(embeddings.data)} x {len(embeddings.data[0].embedding)} | {embeddings.usage.prompt_tokens} | {embeddings.model}")

completion = client.completions.create(model="instruct", prompt="Say hi", max_tokens=3)
print(f"completions: {completion.choices[0].text} | {completion.usage.completion_tokens} | {completion.choices[0].finish_reason}")
stream = client.completions.create(model="instruct", prompt="Say hi", stream=True)
print("completions stream: " + "".join(c.choices[0].text for c in stream if c.choices))

# Passed through: no model, so to the pass-through default; then a form naming its model.
uploaded = client.files.create(file=("batch.jsonl", b'{"custom_id": "1"}\n'), purpose="batch")
print(f"files: {uploaded.id} {uploaded.purpose} {uploaded.status}")
transcription = client.audio.transcriptions.create(model="whisper-1", file=("hello.wav", b"RIFF\x00\x00\x00\x00WAVE"))
print("transcription: " + transcription.text.split(" bytes")[0].rsplit(" ", 1)[0])
