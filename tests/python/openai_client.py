"""Drives the sidecar with the official OpenAI Python SDK, as an application would.

Prints one line per check; tests/openai_sdk.rs asserts them.
"""

import os

import openai
from openai import OpenAI

client = OpenAI(base_url=os.environ["SWITCHYARD_BASE_URL"], api_key="unused-by-the-sidecar", max_retries=0)
messages = [{"role": "user", "content": "Say hello"}]

reply = client.chat.completions.create(model="chat", messages=messages)
print(f"json: {reply.model} | {reply.choices[0].message.content} | {reply.usage.completion_tokens}")

raw = client.chat.completions.with_raw_response.create(model="chat", messages=messages)
print(f"headers: {raw.headers['x-switchyard-target']} {raw.headers['x-switchyard-attempts']}")

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
