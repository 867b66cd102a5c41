"""The `zephyr` command: generate, chat, serve, info, backends.

MODEL is a .gguf path, a directory, a Hugging Face repo id (with --model-file), or a named model
(`demo`, `gemma3-270m`).
"""
import argparse
import os
import sys

from .backend import KV_CACHE_TYPES
from .errors import ZephyrError


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except (ZephyrError, ValueError, FileNotFoundError) as exc:
        print(f"zephyr: error: {exc}", file=sys.stderr)
        return 1


def _parser(parser_class=argparse.ArgumentParser):
    parser = parser_class(prog="zephyr", description="Run GGUF language models.")
    sub = parser.add_subparsers(dest="command")

    def model_command(name, help, run):
        p = sub.add_parser(name, help=help)
        p.add_argument("model", help="a .gguf file, a directory, a Hugging Face repo id, or a named model "
                                     "('demo', 'gemma3-270m')")
        p.add_argument("--model-file", help="which .gguf file of a directory or repo")
        p.set_defaults(run=run)
        return p

    def load_options(p):
        p.add_argument("--threads", type=int, default=-1)
        p.add_argument("--gpu-layers", type=int, default=0)
        p.add_argument("--context-length", type=int, default=-1)
        p.add_argument("--kv-cache-type", default="f16", choices=list(KV_CACHE_TYPES),
                       help="how the KV cache stores keys and values (default f16; q8_0 holds twice the context)")
        p.add_argument("--repack", action=argparse.BooleanOptionalAction, default=None,
                       help="interleave every CPU weight type that has a faster kernel so (--no-repack: none; "
                            "default: this CPU's choice; see docs/api.md)")
        p.add_argument("--backend", help="backend for the non-GPU layers (see `zephyr backends`)")
        p.add_argument("--chat-format", help="override the chat template (e.g. zephyr, chatml, llama-2)")

    def run_options(p):
        load_options(p)
        p.add_argument("--temperature", type=float)
        p.add_argument("--top-k", type=int)
        p.add_argument("--top-p", type=float)
        p.add_argument("--repetition-penalty", type=float)
        p.add_argument("--seed", type=int)
        p.add_argument("--max-new-tokens", type=int, default=256)

    g = model_command("generate", "complete a prompt, streaming the text", _generate)
    g.add_argument("-p", "--prompt", required=True)
    run_options(g)
    c = model_command("chat", "chat interactively (/reset clears the history, /exit quits)", _chat)
    c.add_argument("--system", help="a system message")
    run_options(c)
    s = model_command("serve", "serve an OpenAI-compatible HTTP API and a chat page (see docs/server.md)", _serve)
    s.add_argument("--host", default="127.0.0.1", help="listen address (default: 127.0.0.1, this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/* (default: $ZEPHYR_API_KEY)")
    s.add_argument("--model-alias", help="the model id /v1/models reports (default: the file name)")
    s.add_argument("--parallel", type=int, default=4, metavar="N",
                   help="requests generated at once, each in its own KV cache sequence of --context-length "
                        "(default 4; the cache takes N times the memory of one)")
    s.add_argument("--cache-ram", type=float, default=0.0, metavar="GB",
                   help="RAM for conversation prefixes the sequences lose, restored when they come back (default 0)")
    s.add_argument("--max-queue", type=int, default=64, help="requests that may run or wait at once; more get 503")
    s.add_argument("--cors-origin", action="append", default=[], help="allow web pages from ORIGIN (repeatable)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.add_argument("--ray-replicas", type=int, metavar="N",
                   help="serve N replicas of the model on Ray Serve, one endpoint (see docs/ray.md)")
    s.add_argument("--ray-address", help="with --ray-replicas: join the Ray cluster at ADDRESS ('auto': this "
                                         "machine's) rather than start a local instance (default: $RAY_ADDRESS)")
    load_options(s)
    model_command("info", "show metadata, tensor types and sizes", _info)
    b = sub.add_parser("backends", help="list installed backends and whether they can run here")
    b.set_defaults(run=_backends)
    return parser


def _model_path(args):
    from .sources import resolve_model_file
    return resolve_model_file(args.model, model_file=args.model_file)


def _load_options(args) -> dict:
    """The loading options as `from_pretrained` keyword arguments."""
    return dict(model_file=args.model_file, threads=args.threads, gpu_layers=args.gpu_layers,
                context_length=args.context_length, kv_cache_type=args.kv_cache_type, repack=args.repack,
                backend=args.backend, chat_format=args.chat_format)


def _load(args):
    from .llm import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(args.model, **_load_options(args))


def server_spec(args):
    """What `zephyr serve`'s options ask each server process to load and serve: the one place they
    become model and app options, for this process and for every Ray Serve replica alike."""
    from .server import ServerSpec
    if args.parallel < 1 or args.cache_ram < 0:
        raise ValueError(f"--parallel must be at least 1 and --cache-ram not negative, got {args.parallel} and "
                         f"{args.cache_ram:g}")
    return ServerSpec(args.model, dict(_load_options(args), sequences=args.parallel), dict(
        model_name=args.model_alias, api_key=args.api_key or os.environ.get("ZEPHYR_API_KEY"),
        max_queue=args.max_queue, cache_ram_bytes=int(args.cache_ram * 2**30), cors_origins=tuple(args.cors_origin)))


def serve_options(argv: list) -> argparse.Namespace:
    """`zephyr serve ARGV...`'s options, parsed as the command parses them; a bad one is a ValueError."""
    class Refusing(argparse.ArgumentParser):
        def error(self, message):
            raise ValueError(f"zephyr serve: {message}")
    return _parser(Refusing).parse_args(["serve", *argv])


def _sampling(args):
    names = ("temperature", "top_k", "top_p", "repetition_penalty", "seed", "max_new_tokens")
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def _generate(args):
    with _load(args) as llm:
        print(args.prompt, end="", flush=True)
        for chunk in llm(args.prompt, stream=True, **_sampling(args)):
            print(chunk, end="", flush=True)
        print()


def _chat(args):
    with _load(args) as llm:
        history = [{"role": "system", "content": args.system}] if args.system else []
        start = list(history)
        print(f"Chatting with {llm.model_path} ({llm.placement.describe()}). /reset clears, /exit quits.")
        while True:
            try:
                line = input("> ")
            except EOFError:
                print()
                return
            if line.strip() == "/exit":
                return
            if line.strip() == "/reset":
                history = list(start)
                print("(history cleared)")
                continue
            if not line.strip():
                continue
            history.append({"role": "user", "content": line})
            reply = ""
            try:
                for chunk in llm.chat(history, stream=True, **_sampling(args)):
                    reply += chunk
                    print(chunk, end="", flush=True)
            except KeyboardInterrupt:
                print(" [interrupted]", end="")
            print()
            history.append({"role": "assistant", "content": reply})


def _serve(args):
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise ZephyrError(f"`zephyr serve` needs the server extra ({exc.name} is missing): "
                          f"pip install 'zephyr[server]'") from None
    spec = server_spec(args)
    if args.ray_replicas is not None:
        return _serve_on_ray(args, spec)
    if args.ray_address:
        raise ValueError("--ray-address needs --ray-replicas N")
    from .server import serve
    with spec.load() as llm:
        print(f"zephyr: serving {llm.model_path} ({llm.placement.describe()}) at http://{args.host}:{args.port}/ "
              f"(chat page at /, OpenAI API at /v1; one generation at a time, the others wait)", flush=True)
        serve(llm, host=args.host, port=args.port, log_level=args.log_level, **spec.app_options)


def _serve_on_ray(args, spec):
    if args.ray_replicas < 1:
        raise ValueError(f"--ray-replicas must be at least 1, not {args.ray_replicas}")
    try:
        from .integrations import ray_serve
    except ImportError as exc:
        raise ZephyrError(str(exc)) from None
    ray_serve.run(spec, replicas=args.ray_replicas, address=args.ray_address, host=args.host, port=args.port,
                  log_level=args.log_level, on_ready=lambda message: print(message, flush=True))


def _info(args):
    from . import gguf
    from .config import ModelConfig
    with gguf.read(_model_path(args)) as f:
        print(f.summary())
        try:
            config = ModelConfig.from_gguf(f)
            print(f"\nfamily: {config.architecture} ({config.family.title})\n{config}")
        except ZephyrError as exc:
            print(f"\nnot runnable by zephyr: {exc}")
        print("\ntensors:")
        for t in f.tensors:
            print(f"  {t.name:<32} {t.type.name:<6} {'x'.join(map(str, t.shape)):<14} {t.nbytes:>12,} bytes")


def _backends(args):
    from .plugins import backend_classes, describe_backends
    classes = backend_classes()
    for name, score, usable, reason in describe_backends():
        state = "available" if usable else f"unavailable: {reason}"
        device = classes[name].device if name in classes else "?"
        print(f"{name:<12} device={device:<4} score={score:<4} {state}")


if __name__ == "__main__":
    sys.exit(main())
