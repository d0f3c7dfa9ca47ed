"""Drives the sidecar's /v1/responses with the official OpenAI Python SDK, as an application would.

Prints one line per check; tests/openai_sdk.rs asserts them.
"""

import os

from openai import OpenAI

client = OpenAI(base_url=os.environ["SIDEYARD_BASE_URL"], api_key="unused-by-the-sidecar", max_retries=0)

for model in ["native", "chat-only", "claude"]:
    reply = client.responses.create(model=model, instructions="Be nice.", input="Say hello", store=False)
    print(f"{model} json: {reply.output_text} | {reply.status} | {reply.usage.output_tokens}")
    kinds = []
    text = ""
    for event in client.responses.create(model=model, input="Say hello", stream=True):
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            text += event.delta
    print(f"{model} stream: {text} | {kinds[0]} .. {kinds[-1]}")

with client.responses.stream(model="claude", input="Say hello") as stream:
    final = stream.get_final_response()
print(f"stream helper: {final.output_text} | {final.status}")

tools = [{"type": "function", "name": "weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
question = [{"role": "user", "content": "Weather in Paris and Rome?"}]
for model in ["native-tools", "chat-tools", "claude-tools"]:
    reply = client.responses.create(model=model, input=question, tools=tools)
    calls = [item for item in reply.output if item.type == "function_call"]
    print(f"{model} calls: " + " ".join(f"{c.call_id}:{c.name}:{c.arguments}" for c in calls))
    follow_up = question + [c.model_dump(exclude_none=True) for c in calls]
    follow_up += [{"type": "function_call_output", "call_id": c.call_id, "output": "sunny"} for c in calls]
    reply = client.responses.create(model=model, input=follow_up, tools=tools)
    print(f"{model} follow-up: {reply.status}")
