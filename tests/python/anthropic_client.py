"""Drives the sidecar's /v1/messages with the official Anthropic Python SDK, as an application
would, against routes whose targets speak Anthropic's API or OpenAI's.

Prints one line per check; tests/anthropic_sdk.rs asserts them.
"""

import os

import anthropic

client = anthropic.Anthropic(base_url=os.environ["SIDEYARD_BASE_URL"], api_key=os.environ["CALLER_KEY"], max_retries=0)
hello = [{"role": "user", "content": "Say hello"}]
weather = [{"role": "user", "content": "Weather in Paris and Rome?"}]
tools = [{"name": "weather", "description": "Current weather.", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]

for model in ["claude-text", "gpt-text"]:
    m = client.messages.create(model=model, max_tokens=64, messages=hello)
    print(f"json {model}: {m.content[0].text} | {m.stop_reason} | {m.usage.input_tokens > 0} {m.usage.output_tokens}")
    with client.messages.stream(model=model, max_tokens=64, messages=hello) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    print(f"stream {model}: {text} | {final.stop_reason} | {final.usage.output_tokens}")

for model in ["claude-tools", "gpt-tools"]:
    m = client.messages.create(model=model, max_tokens=64, messages=weather, tools=tools)
    uses = " ".join(f"{b.id}:{b.name}:{b.input['city']}" for b in m.content if b.type == "tool_use")
    print(f"tools {model}: {uses} | {m.stop_reason} | {m.usage.output_tokens}")
    with client.messages.stream(model=model + "-stream", max_tokens=64, messages=weather, tools=tools) as stream:
        final = stream.get_final_message()
    uses = " ".join(f"{b.id}:{b.name}:{b.input['city']}" for b in final.content if b.type == "tool_use")
    print(f"tools stream {model}: {uses} | {final.stop_reason} | {final.usage.output_tokens}")

try:
    client.messages.create(model="no-such-model", max_tokens=64, messages=hello)
except anthropic.NotFoundError as e:
    print(f"not found: {e.status_code} {e.body['error']['type']}")

count = client.messages.count_tokens(model="claude-text", messages=hello)
print(f"count: {count.input_tokens > 0}")
