"""Record llama.cpp's greedy continuations of a few prompts on Gemma 3 270M Q4_K_M (tests/test_gemma3.py
compares zephyr's): the file is the named model gemma3-270m, whose path is the argument. The chat case
is a conversation rendered by llama.cpp's own "gemma" chat template, answered to the end of the
reply's first line (this pretrained model then drifts into text where the top tokens nearly tie).

Produced with llama-cpp-python 0.3.36 built from source (AVX2, FMA, F16C; no AVX-512), 2 threads:
    python tests/data/make_gemma3_reference.py "$(python -c 'from zephyr.demo import named_model_path as p; print(p("gemma3-270m"))')"
"""
import ctypes
import json
import sys
from pathlib import Path

import llama_cpp

PROMPTS = ["The capital of France is Paris. The capital of Germany is", "def fibonacci(n):",
           "Once upon a time, in a small village,"]
CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
STEPS = 32
CHAT_STEPS = 13   # "What is the capital of France? Answer in one sentence.\n"

llm = llama_cpp.Llama(sys.argv[1], n_ctx=512, n_threads=2, verbose=False)


def chat_prompt(messages) -> str:
    chat = (llama_cpp.llama_chat_message * len(messages))(
        *[llama_cpp.llama_chat_message(m["role"].encode(), m["content"].encode()) for m in messages])
    buffer = ctypes.create_string_buffer(4096)
    n = llama_cpp.llama_chat_apply_template(b"gemma", chat, len(messages), True, buffer, len(buffer))
    return buffer.raw[:n].decode()


def greedy(tokens, steps, stop=None):
    out = []
    for token in llm.generate(tokens, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        if token == stop:
            break
        out.append(int(token))
        if len(out) == steps:
            break
    return out


cases = []
for prompt in PROMPTS:
    tokens = llm.tokenize(prompt.encode(), add_bos=True)
    cases.append({"prompt": prompt, "prompt_tokens": tokens, "greedy_tokens": greedy(tokens, STEPS)})
prompt = chat_prompt(CHAT)
tokens = llm.tokenize(prompt.encode(), add_bos=True, special=True)
end_of_turn = llm.tokenize(b"<end_of_turn>", add_bos=False, special=True)[0]
cases.append({"prompt": prompt, "messages": CHAT, "prompt_tokens": tokens,
              "greedy_tokens": greedy(tokens, CHAT_STEPS, end_of_turn)})
for case in cases:
    case["greedy_text"] = llm.detokenize(case["greedy_tokens"]).decode("utf-8", "replace")
    print(repr(case["prompt"] + case["greedy_text"]))
out = {"source": f"llama-cpp-python {llama_cpp.__version__}, greedy, repeat_penalty 1.0", "cases": cases}
Path(__file__).with_name("gemma3_270m_greedy_reference.json").write_text(json.dumps(out, indent=1) + "\n")
