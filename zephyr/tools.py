"""OpenAI function calling: the tools a request offers, how the prompt shows them, the grammar a
forced call must follow, and finding the calls in the reply.

A call is written as the Hermes format writes it (Qwen2.5, Hermes 2/3 and SmolLM3 were trained on it):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A chat template that handles tools in this format renders the tools and the history itself. For any
other template the tools go into the system message (`tool_prompt`), and past calls and tool results
into the conversation as text in the same format, so every model can call tools.

tool_choice "required" and a named function constrain the reply to calls whose arguments match the
function's parameters schema; "auto" lets the model write text, and constrains a call once it starts
one (the grammar's lazy trigger is "<tool_call>"); "none" offers no tools.
"""
import json
import uuid
from dataclasses import dataclass
from typing import Mapping, Optional

from .grammar import Grammar
from .stopping import partial_match_length

OPEN, CLOSE = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict

    def as_openai(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}

    def call_schema(self) -> dict:
        """The JSON schema of a call of this function, name first."""
        return {"type": "object", "properties": {"name": {"const": self.name}, "arguments": self.parameters},
                "required": ["name", "arguments"], "additionalProperties": False}


@dataclass(frozen=True)
class ToolChoice:
    mode: str                      # "none", "auto" or "required"
    name: Optional[str] = None     # with "required": the one function to call


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str                 # JSON text, as OpenAI sends it

    def as_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def parse_tools(tools) -> tuple:
    """OpenAI `tools` ([{"type": "function", "function": {"name", "description", "parameters"}}]) as Tools."""
    if tools is None:
        return ()
    if not isinstance(tools, (list, tuple)):
        raise ValueError(f"tools must be a list of {{'type': 'function', 'function': {{...}}}}, "
                         f"got {type(tools).__name__}")
    parsed = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping) or tool.get("type") != "function" or \
                not isinstance(tool.get("function"), Mapping):
            raise ValueError(f"{where} must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}")
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not name or len(name) > 64 or \
                not all(c.isascii() and (c.isalnum() or c in "_-") for c in name):
            raise ValueError(f"{where}.function.name must be 1-64 letters, digits, '_' or '-', got {name!r}")
        if name in (t.name for t in parsed):
            raise ValueError(f"{where}.function.name {name!r} is used by an earlier tool too")
        description = function.get("description") or ""
        if not isinstance(description, str):
            raise ValueError(f"{where}.function.description must be a string")
        parameters = function.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        if not isinstance(parameters, Mapping):
            raise ValueError(f"{where}.function.parameters must be a JSON schema object")
        parsed.append(Tool(name, description, dict(parameters)))
    return tuple(parsed)


def parse_tool_choice(choice, tools) -> ToolChoice:
    """OpenAI `tool_choice`: "none", "auto", "required", or {"type": "function", "function": {"name"}};
    the default is "auto" with tools, "none" without."""
    if choice is None:
        return ToolChoice("auto" if tools else "none")
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise ValueError(f"tool_choice must be 'none', 'auto', 'required' or a function, got {choice!r}")
        if choice != "none" and not tools:
            raise ValueError(f"tool_choice {choice!r} needs tools")
        return ToolChoice(choice)
    name = choice.get("function", {}).get("name") if isinstance(choice, Mapping) and \
        isinstance(choice.get("function"), Mapping) else None
    if not isinstance(choice, Mapping) or choice.get("type") != "function" or not isinstance(name, str):
        raise ValueError("tool_choice must be 'none', 'auto', 'required' or "
                         "{'type': 'function', 'function': {'name': ...}}")
    if name not in (t.name for t in tools):
        offered = ", ".join(repr(t.name) for t in tools) or "none"
        raise ValueError(f"tool_choice names the function {name!r}, which is not among the tools (offered: {offered})")
    return ToolChoice("required", name)


def template_handles_tools(chat_format) -> bool:
    """Whether the chat format's template renders `tools` and writes calls in the <tool_call> format."""
    source = chat_format.source or ""
    return "tools" in source and OPEN in source


def tool_prompt(tools) -> str:
    """The built-in instructions that offer `tools` to a model whose template cannot."""
    listed = "\n".join(json.dumps(t.as_openai(), ensure_ascii=False) for t in tools)
    return ("You may call functions to answer. Here they are, each with a JSON schema of its arguments:\n"
            f"<tools>\n{listed}\n</tools>\n"
            f"To call one, answer with its name and arguments as a JSON object between {OPEN} and {CLOSE}, "
            f"for example:\n{OPEN}\n{{\"name\": \"function_name\", \"arguments\": {{\"argument\": \"value\"}}}}\n"
            f"{CLOSE}")


def conversation(messages, tools, native: bool) -> list:
    """`messages` as the chat template takes them. With `native` the template renders the tools and
    the calls itself (arguments as objects, as Hugging Face templates expect them); otherwise the
    tools go into the system message, and calls and tool results into the text."""
    out = []
    merged_results = False   # the last message gathers tool results, and the next result joins it
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content'")
        message = dict(message, content=message_text(message.get("content"), i))
        calls = [_history_call(call, i, j) for j, call in enumerate(message.pop("tool_calls", None) or ())]
        if native:
            if calls:
                message["tool_calls"] = [{"id": call.get("id"), "type": "function",
                                          "function": {"name": name, "arguments": arguments}}
                                         for call, name, arguments in calls]
            out.append(message)
        elif message.get("role") == "tool":
            response = f"<tool_response>\n{message['content'] or ''}\n</tool_response>"
            if merged_results:
                out[-1]["content"] += "\n" + response
            else:
                out.append({"role": "user", "content": response})
            merged_results = True
            continue
        else:
            if calls:
                written = "\n".join(f"{OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}"
                                    f"\n{CLOSE}" for _, name, arguments in calls)
                message["content"] = f"{message['content']}\n{written}" if message["content"] else written
            out.append(message)
        merged_results = False
    if tools and not native:
        if out and out[0].get("role") == "system":
            out[0] = dict(out[0], content=f"{out[0]['content'] or ''}\n\n{tool_prompt(tools)}".lstrip())
        else:
            out.insert(0, {"role": "system", "content": tool_prompt(tools)})
    return out


def message_text(content, index) -> Optional[str]:
    """A message's content as text: a string, None, or OpenAI's list of {"type": "text", "text"} parts."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, Mapping) and p.get("type") == "text" and
                                         isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ValueError(f"messages[{index}].content must be a string or a list of text parts")


def _history_call(call, i, j):
    """(the call, its function name, its arguments as an object) of an assistant message's tool call."""
    where = f"messages[{i}].tool_calls[{j}]"
    function = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise ValueError(f"{where} must be {{'id', 'type': 'function', 'function': {{'name', 'arguments'}}}}")
    arguments = function.get("arguments", "{}")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments or "{}")
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}.function.arguments is not valid JSON: {exc}") from None
    return call, function["name"], arguments


def call_grammar(tools, choice: ToolChoice, parallel=True) -> Optional[Grammar]:
    """The grammar of the reply: calls only ("required", or one named function), text that may turn
    into calls ("auto"), or None ("none")."""
    if choice.mode == "none":
        return None
    chosen = [t for t in tools if choice.name in (None, t.name)]
    for i, tool in enumerate(tools):
        if tool in chosen:   # each schema on its own first, so an error names its tool
            Grammar.from_json_schema(tool.parameters, f"tools[{i}].function.parameters")
    body = json.dumps({"anyOf": [t.call_schema() for t in chosen]}, ensure_ascii=False)
    more = f'("\\n{OPEN}\\n" body "\\n{CLOSE}")*' if parallel and choice.name is None else ""
    if choice.mode == "required":
        rules = f'start: "{OPEN}\\n" body "\\n{CLOSE}" {more}'
    else:
        rules = (f'start: TEXT | head "\\n" body "\\n{CLOSE}" {more}\n'
                 f'head[lazy]: TEXT "{OPEN}"\n'
                 'TEXT: /(.|\\n)*/')
    return Grammar.from_lark(f"{rules}\nbody: %json {body}", "the tool-call grammar")


class CallParser:
    """Splits streamed reply text into content and tool calls, holding back what may begin a call."""

    def __init__(self, tools):
        self.names = {t.name for t in tools}
        self._buffer = ""
        self._in_call = False
        self._after_call = False   # the whitespace between calls is not content

    def push(self, text: str):
        """(content to show now, calls completed now)."""
        self._buffer += text
        content, calls = "", []
        while True:
            if not self._in_call:
                start = self._buffer.find(OPEN)
                if start < 0:
                    keep = partial_match_length(self._buffer, [OPEN])
                    content += self._content(self._buffer[:len(self._buffer) - keep])
                    self._buffer = self._buffer[len(self._buffer) - keep:]
                    return content, calls
                content += self._content(self._buffer[:start])
                self._buffer, self._in_call = self._buffer[start + len(OPEN):], True
            else:
                end = self._buffer.find(CLOSE)
                if end < 0:
                    return content, calls
                body, self._buffer, self._in_call = self._buffer[:end], self._buffer[end + len(CLOSE):], False
                call = self._call(body)
                if call is None:
                    content += OPEN + body + CLOSE
                else:
                    calls.append(call)
                    self._after_call = True

    def flush(self) -> str:
        """The reply ended: the content still held back (an unfinished call stays text)."""
        rest = (OPEN if self._in_call else "") + self._buffer
        self._buffer, self._in_call = "", False
        return self._content(rest)

    def _content(self, text):
        if self._after_call:
            text = text.lstrip()
            self._after_call = not text
        return text

    def _call(self, body) -> Optional[ToolCall]:
        try:
            call = json.loads(body)
        except json.JSONDecodeError:
            return None
        if not isinstance(call, dict) or call.get("name") not in self.names:
            return None
        arguments = call.get("arguments", call.get("parameters", {}))
        if not isinstance(arguments, dict):
            return None
        return ToolCall(f"call_{uuid.uuid4().hex[:24]}", call["name"], json.dumps(arguments, ensure_ascii=False))
