"""Record llama.cpp's greedy continuations of a few prompts on Gemma 3 270M Q4_K_M (tests/test_gemma3.py
compares zephyr's): the file is the named model gemma3-270m, whose path is the argument.

Produced with llama-cpp-python 0.3.36 built from source (AVX2, FMA, F16C; no AVX-512), 2 threads:
    python tests/data/make_gemma3_reference.py ~/.cache/zephyr/.../gemma-3-270m-q4_k_m.gguf
"""
import json
import sys
from pathlib import Path

import llama_cpp

PROMPTS = ["The capital of France is Paris. The capital of Germany is", "def fibonacci(n):",
           "Once upon a time, in a small village,"]
STEPS = 32

llm = llama_cpp.Llama(sys.argv[1], n_ctx=512, n_threads=2, verbose=False)
cases = []
for prompt in PROMPTS:
    tokens = llm.tokenize(prompt.encode(), add_bos=True)
    greedy = []
    for token in llm.generate(tokens, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        greedy.append(int(token))
        if len(greedy) == STEPS:
            break
    cases.append({"prompt": prompt, "prompt_tokens": tokens, "greedy_tokens": greedy,
                  "greedy_text": llm.detokenize(greedy).decode("utf-8", "replace")})
    print(prompt + cases[-1]["greedy_text"])
out = {"source": f"llama-cpp-python {llama_cpp.__version__}, greedy, repeat_penalty 1.0", "cases": cases}
Path(__file__).with_name("gemma3_270m_greedy_reference.json").write_text(json.dumps(out, indent=1) + "\n")
