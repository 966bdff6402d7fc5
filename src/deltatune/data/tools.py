"""Tool calling in chat records: the `tools` a conversation may call, assistant `tool_calls`, and
`tool` messages carrying the results, in the OpenAI shape, checked and normalised.

`tools` is a list of JSON-schema function definitions (`{"type": "function", "function": {"name",
"description", "parameters"}}`, or the inner object alone). A call is `{"type": "function",
"function": {"name", "arguments"}}` (or `{"name", "arguments"}`), with `arguments` a JSON string
(the OpenAI shape) or an object; both become an object, which is what chat templates render. A
call to a tool the record does not define, arguments that are not JSON, and a tool result with no
call before it are `FILE:LINE` errors. Templates render all of it (`apply_chat_template(tools=...)`);
assistant turns that call tools are trained like any other, tool results never are.
"""

from __future__ import annotations

import json

from deltatune.errors import UserError


def read_tools(value, loc: str) -> list[dict]:
    """The record's `tools`, each as {"type": "function", "function": {...}}."""
    if not isinstance(value, list) or not value:
        raise UserError(f"{loc}: field 'tools' must be a non-empty list of function definitions")
    tools = []
    for i, tool in enumerate(value):
        spec = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
            raise UserError(f"{loc}: field 'tools[{i}]' must be a function definition with a 'name' "
                            "({\"type\": \"function\", \"function\": {\"name\": ..., \"parameters\": {...}}})")
        if "parameters" in spec and not isinstance(spec["parameters"], dict):
            raise UserError(f"{loc}: field 'tools[{i}].parameters' must be a JSON schema object")
        tools.append({"type": "function", "function": spec})
    return tools


def read_tool_calls(value, loc: str, where: str, names: set[str]) -> list[dict]:
    """An assistant turn's `tool_calls`, arguments parsed into objects; `names`: the tools the record defines."""
    if not isinstance(value, list) or not value:
        raise UserError(f"{loc}: field '{where}' must be a non-empty list of calls")
    calls = []
    for j, call in enumerate(value):
        spot = f"{where}[{j}]"
        inner = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(inner, dict) or not isinstance(inner.get("name"), str):
            raise UserError(f"{loc}: field '{spot}' must be a call with a 'name' and 'arguments'")
        name = inner["name"]
        if name not in names:
            known = f"the record's tools are {', '.join(sorted(names))}" if names else "the record has no 'tools'"
            raise UserError(f"{loc}: field '{spot}' calls tool '{name}', which is not defined ({known}; add its "
                            "definition to 'tools')")
        arguments = inner.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as err:
                raise UserError(f"{loc}: field '{spot}.arguments' is not JSON ({err.msg} at column {err.colno}); "
                                "give the arguments as a JSON object or a JSON string") from None
        if not isinstance(arguments, dict):
            raise UserError(f"{loc}: field '{spot}.arguments' must be a JSON object, got {type(arguments).__name__}")
        normalised = {"type": "function", "function": {"name": name, "arguments": arguments}}
        if isinstance(call.get("id"), str):
            normalised["id"] = call["id"]
        calls.append(normalised)
    return calls


def check_tool_results(messages: list[dict], loc: str, field_name: str) -> None:
    """Every `tool` message answers a call: it follows an assistant turn with tool calls (or another result)."""
    for i, m in enumerate(messages):
        if m["role"] != "tool":
            continue
        before = next((p for p in reversed(messages[:i]) if p["role"] != "tool"), None)
        if before is None or before["role"] != "assistant" or not before.get("tool_calls"):
            raise UserError(f"{loc}: field '{field_name}[{i}]' is a tool result with no tool call before it (put it "
                            "after the assistant turn whose tool_calls it answers)")


def without_calls(messages: list[dict]) -> list[dict]:
    """The conversation with its tool calls taken out (to learn whether a template renders them at all)."""
    return [{k: v for k, v in m.items() if k != "tool_calls"} for m in messages]
