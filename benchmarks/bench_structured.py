"""What constrained decoding costs: 128 greedy tokens on the demo model under a JSON schema against the
same without one, in tokens per second of decode (prefill excluded). Target: >= 0.85x.

    python benchmarks/bench_structured.py                 # ~1 min on 2 cores
    python benchmarks/bench_structured.py --tokens 64 --repeats 1

The demo model decodes fastest, so a mask's cost weighs most there. Both runs ban the end-of-
generation tokens (the same logit_bias, the same work) and the schema asks for more than --tokens
tokens, so each generates exactly --tokens tokens. Runs alternate; the median of --repeats is shown,
with the time spent choosing each token (sampling, and the grammar's mask), which a busy machine
disturbs far less than the forward passes.
"""
import argparse
import statistics
import time

from zephyr import AutoModelForCausalLM, Generation, Grammar

SCHEMA = {"type": "object", "properties": {"people": {
    "type": "array", "minItems": 40, "items": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 20}, "job": {"enum": ["teacher", "doctor", "farmer", "pilot"]}},
        "required": ["name", "age", "city", "job"]}}}, "required": ["people"]}
PROMPT = [{"role": "user", "content": "List forty people with their name, age, city and job, as JSON."}]


def decode(llm, prompt_tokens, settings, stops, tokens):
    """(tokens per second of decode, milliseconds per token spent choosing it), driving one Generation
    as LLM.steps does, timed from the first generated token to the last."""
    llm.reset()
    llm.eval(prompt_tokens)
    generation = Generation(llm.tokenizer, settings, prompt_tokens, stops)
    token = generation.step(llm.logits).token
    start, choosing = time.perf_counter(), 0.0
    while not generation.finished:
        llm.eval([token])
        logits = llm.logits
        before = time.perf_counter()
        token = generation.step(logits).token
        choosing += time.perf_counter() - before
    elapsed = time.perf_counter() - start
    if len(generation.tokens) != tokens:
        raise SystemExit(f"generated {len(generation.tokens)} tokens, not {tokens}: the comparison would be unfair")
    return (tokens - 1) / elapsed, choosing / (tokens - 1) * 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    llm = AutoModelForCausalLM.from_pretrained("demo", threads=args.threads, context_length=1024, progress=False)
    prompt_tokens, formatter = llm.chat_prompt(PROMPT)
    started = time.perf_counter()
    grammar = Grammar.from_json_schema(SCHEMA)
    compiled = time.perf_counter() - started
    started = time.perf_counter()
    grammar.matcher(llm.tokenizer)   # the first matcher builds llguidance's view of the vocabulary
    first_matcher = time.perf_counter() - started

    no_end = {token: -100 for token in llm.tokenizer.eog_ids}
    common = dict(temperature=0, max_new_tokens=args.tokens, logit_bias=no_end, repetition_penalty=1.0)
    plain, constrained = llm.settings(**common), llm.settings(**common, grammar=grammar)
    runs = {"unconstrained": [], "JSON schema": []}
    for _ in range(args.repeats):
        runs["unconstrained"].append(decode(llm, prompt_tokens, plain, formatter.stop, args.tokens))
        runs["JSON schema"].append(decode(llm, prompt_tokens, constrained, formatter.stop, args.tokens))

    text = "".join(s.text for s in llm.steps(prompt_tokens, constrained, formatter.stop))
    print(f"demo model, {args.tokens} greedy tokens, {args.threads} threads, median of {args.repeats}")
    print(f"schema compiled in {compiled * 1000:.1f} ms; first matcher (vocabulary trie) {first_matcher * 1000:.0f} ms")
    rates = {}
    for name, results in runs.items():
        rates[name] = statistics.median(rate for rate, _ in results)
        choosing = statistics.median(ms for _, ms in results)
        print(f"{name:>14}: {rates[name]:6.1f} tokens/s ({', '.join(f'{r:.1f}' for r, _ in results)}); "
              f"choosing a token: {choosing:.3f} ms")
    ratio = rates["JSON schema"] / rates["unconstrained"]
    print(f"ratio: {ratio:.2f}x (target >= 0.85x)")
    print(f"constrained output begins: {text[:80]!r}")


if __name__ == "__main__":
    main()
