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
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}]


def test_a_model_is_required():
    with pytest.raises(ValueError, match="pass model="):
        Zephyr()
