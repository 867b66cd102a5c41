"""zephyr.integrations.langchain: Zephyr (LLM) and ChatZephyr (chat model) on the demo model."""
import pytest

pytest.importorskip("langchain_core")

from langchain_core.callbacks import BaseCallbackHandler  # noqa: E402
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage, ToolMessage  # noqa: E402

from zephyr.integrations.langchain import ChatZephyr, Zephyr, to_zephyr_messages  # noqa: E402

QUESTION = "What is the capital of France? Answer in one sentence."


class Tokens(BaseCallbackHandler):
    def __init__(self):
        self.tokens = []

    def on_llm_new_token(self, token, **kwargs):
        self.tokens.append(token)


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return Zephyr(model="demo", temperature=0, max_new_tokens=8, gpu_layers=0)


@pytest.fixture(scope="module")
def chat(llm):
    return ChatZephyr(client=llm.client, temperature=0, max_new_tokens=16, repetition_penalty=1.0)


def test_llm_invoke_stream_and_batch_agree(llm):
    text = llm.invoke("The capital of France is")
    assert "Paris" in text
    tokens = Tokens()
    chunks = list(llm.stream("The capital of France is", config={"callbacks": [tokens]}))
    assert "".join(chunks) == text and len(chunks) > 1 and tokens.tokens == chunks
    assert llm.batch(["The capital of France is", "One plus one is"]) == [text, llm.invoke("One plus one is")]


def test_llm_stop_strings_and_settings(llm):
    assert llm.invoke("The capital of France is", stop=["Paris"]).strip() == ""
    assert len(llm.client.tokenize(llm.invoke("The capital of France is", max_new_tokens=2))) <= 3
    assert llm._llm_type == "zephyr" and llm._identifying_params["model"] == "demo"


def test_chat_invoke_stream_and_batch_agree(chat):
    reply = chat.invoke([SystemMessage("You are a helpful assistant."), HumanMessage(QUESTION)])
    assert isinstance(reply, AIMessage) and "Paris" in reply.content
    tokens = Tokens()
    chunks = list(chat.stream([SystemMessage("You are a helpful assistant."), HumanMessage(QUESTION)],
                              config={"callbacks": [tokens]}))
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    assert "".join(c.content for c in chunks) == reply.content and tokens.tokens == [c.content for c in chunks]
    assert [m.content for m in chat.batch([QUESTION, QUESTION])] == [chat.invoke(QUESTION).content] * 2


def test_messages_convert_with_tool_calls_and_results():
    assert to_zephyr_messages([SystemMessage("s"), HumanMessage("h"), AIMessage("a")]) == [
        {"role": "system", "content": "s"}, {"role": "user", "content": "h"}, {"role": "assistant", "content": "a"}]
    call = {"name": "get_weather", "args": {"city": "Paris"}, "id": "call_1", "type": "tool_call"}
    assert to_zephyr_messages([AIMessage("", tool_calls=[call]), ToolMessage("sunny", tool_call_id="call_1")]) == [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}]


def test_a_model_is_required():
    with pytest.raises(ValueError, match="pass model="):
        Zephyr()


# -- tools and structured output -------------------------------------------------------------------
def get_weather(city: str, unit: str = "celsius") -> str:
    """The current weather in a city.

    Args:
        city: the city's name
        unit: celsius or fahrenheit
    """
    return "sunny"


@pytest.fixture(scope="module")
def roomy(chat):
    return ChatZephyr(client=chat.client, temperature=0, max_new_tokens=80)


def test_bind_tools_makes_valid_calls_and_takes_their_results(roomy):
    chat = roomy
    pytest.importorskip("llguidance")
    bound = chat.bind_tools([get_weather], tool_choice="get_weather")
    reply = bound.invoke("What's the weather in Paris?")
    [call] = reply.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"].get("city"), str) and call["id"]
    assert reply.response_metadata["finish_reason"] == "tool_calls"
    streamed = None
    for chunk in bound.stream("What's the weather in Paris?"):
        streamed = chunk if streamed is None else streamed + chunk
    assert [(c["name"], c["args"]) for c in streamed.tool_calls] == [(call["name"], call["args"])]
    answer = chat.bind_tools([get_weather]).invoke(
        [HumanMessage("What's the weather in Paris?"), reply, ToolMessage("sunny", tool_call_id=call["id"])])
    assert isinstance(answer.content, str) and answer.content


def test_with_structured_output_pydantic_and_dict(roomy):
    chat = roomy
    pytest.importorskip("llguidance")
    from pydantic import BaseModel, Field

    class Capital(BaseModel):
        """A country's capital."""
        country: str = Field(max_length=30)
        city: str = Field(max_length=30)

    for method in ("json_schema", "function_calling"):
        answer = chat.with_structured_output(Capital, method=method).invoke("What is the capital of France?")
        assert isinstance(answer, Capital), method
    schema = {"title": "capital", "description": "A country's capital", "type": "object",
              "properties": {"country": {"type": "string", "maxLength": 30},
                             "city": {"type": "string", "maxLength": 30}},
              "required": ["country", "city"]}
    answer = chat.with_structured_output(schema).invoke("What is the capital of France?")
    assert set(answer) == {"country", "city"}
    raw = chat.with_structured_output(schema, include_raw=True).invoke("What is the capital of France?")
    assert raw["parsed"] == answer and raw["parsing_error"] is None and isinstance(raw["raw"], AIMessage)
    with pytest.raises(ValueError, match="method must be"):
        chat.with_structured_output(schema, method="xml")


def test_every_field_has_an_effect_or_is_refused(llm, smollm2_path):
    with pytest.raises(ValueError, match="extra_forbidden|Extra inputs"):
        Zephyr(client=llm.client, top_n=3)
    with pytest.raises(ValueError, match="gpu_layers say how to load a model, but client= is already loaded"):
        ChatZephyr(client=llm.client, gpu_layers=2)
    with pytest.raises(TypeError, match="unknown generation setting"):
        llm.invoke("hello", typical_p=0.5)
    configured = Zephyr(model=str(smollm2_path), config={"max_new_tokens": 2, "temperature": 0, "context_length": 256})
    assert configured.client.context_length == 256 and configured.client.config.max_new_tokens == 2
    assert len(configured.client.tokenize(configured.invoke("The capital of France is"), add_bos_token=False)) <= 2
    with pytest.raises(TypeError, match="unknown setting"):
        Zephyr(model=str(smollm2_path), config={"lib": "avx2"})
