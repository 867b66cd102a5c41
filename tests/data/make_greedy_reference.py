"""Record llama.cpp's greedy continuation of a prompt on the demo model (tests/test_llm.py compares).

Produced with llama-cpp-python 0.3.36 built from source with AVX-512 kernels (AMX off), 2 threads:
    python tests/data/make_greedy_reference.py
"""
import json
from pathlib import Path

import llama_cpp

from zephyr.demo import demo_model_path

PROMPT = "The capital of France is Paris. The capital of Germany is"
STEPS = 32

llm = llama_cpp.Llama(str(demo_model_path()), n_ctx=512, n_threads=2, verbose=False)
prompt_tokens = llm.tokenize(PROMPT.encode(), add_bos=False)
greedy = []
for token in llm.generate(prompt_tokens, temp=0.0, top_k=1, repeat_penalty=1.0):
    greedy.append(int(token))
    if len(greedy) == STEPS:
        break
out = {"source": f"llama-cpp-python {llama_cpp.__version__}, greedy, repeat_penalty 1.0",
       "prompt": PROMPT, "prompt_tokens": prompt_tokens, "greedy_tokens": greedy,
       "greedy_text": llm.detokenize(greedy).decode("utf-8", "replace")}
Path(__file__).with_name("smollm2_greedy_reference.json").write_text(json.dumps(out, indent=1) + "\n")
print(out["greedy_text"])
