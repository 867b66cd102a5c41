"""`zephyr serve` on Ray Serve: replicas of the server across machines, one endpoint (`pip install 'zephyr[ray]'`).

Each replica is a Ray actor that loads its own copy of the model and serves the same FastAPI app
as `zephyr serve` (the OpenAI API with streaming, the chat page) through Ray Serve's ingress; Ray
Serve's proxies spread requests over the replicas, and Ray replaces a replica whose process dies.

    zephyr serve demo --ray-replicas 2 --threads 1                       # the command (docs/ray.md)
    serve run zephyr.integrations.ray_serve:build model=demo replicas=2 threads=1

    from ray import serve
    from zephyr.integrations.ray_serve import app
    serve.run(app("demo", replicas=2, threads=1))
"""
import asyncio
import logging
import os
import signal
import socket
import time

try:
    import ray
    from ray import serve
except ImportError as exc:
    raise ImportError(f"zephyr.integrations.ray_serve needs Ray Serve ({exc.name} is missing): "
                      f"pip install 'zephyr[ray]'") from exc

from ..errors import ZephyrError
from ..server.app import MAX_QUEUE
from ..server.spec import ServerSpec

# The name of the deployment, and of the application `zephyr serve --ray-replicas` runs.
NAME = "zephyr"
# How long /health waits for the Serve controller's view of the replicas.
STATUS_TIMEOUT_S = 5.0


def app(model, *, replicas=1, server_options=None, ray_actor_options=None, autoscaling_config=None,
        **load_options) -> "serve.Application":
    """The Ray Serve application of `replicas` copies of the server for `model`, for `serve.run`.

    model, load_options: what `AutoModelForCausalLM.from_pretrained` takes (`threads=`, `gpu_layers=`, ...).
    server_options: `zephyr.server.create_app` keyword arguments (`api_key=`, `model_name=`, `max_queue=`, ...).
    Each replica reserves `threads` CPUs (1 when unset, and then runs 1 thread) and a GPU when `gpu_layers`
    is not 0; `ray_actor_options` overrides that. `autoscaling_config` (Ray Serve's) replaces `replicas`.
    """
    spec = ServerSpec(str(model), load_options, server_options or {})
    return application(spec, replicas=replicas, ray_actor_options=ray_actor_options,
                       autoscaling_config=autoscaling_config)


def build(args: dict) -> "serve.Application":
    """The application builder for `serve run` and Serve config files (`import_path: ...ray_serve:build`).

    The keys are `zephyr serve`'s options without their dashes (`model`, `threads`, `gpu-layers`,
    `api-key`, ...; `_` may stand for `-`; a switch such as `repack` takes true or false), read as the
    command reads them, and `replicas`. The host, port and log level are Serve's own settings there.
    """
    from ..cli import serve_options, server_spec
    options = {str(key).replace("_", "-"): value for key, value in args.items()}
    replicas = int(options.pop("replicas", 1))
    serve_own = sorted(options.keys() & {"host", "port", "log-level", "ray-address", "ray-replicas"})
    if serve_own:
        raise ValueError(f"{', '.join(serve_own)}: set by `serve run` or the Serve config, not by the application's "
                         f"arguments (use `replicas` for the number of replicas)")
    if "model" not in options:
        raise ValueError("the application's arguments need `model` (a .gguf path, a Hugging Face repo id or 'demo')")
    argv = [str(options.pop("model"))]
    for key, value in options.items():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, bool):   # a switch (`repack: false` in a config file): --repack / --no-repack
                argv.append(f"--{key}" if item else f"--no-{key}")
            else:
                argv += [f"--{key}", str(item)]
    return application(server_spec(serve_options(argv)), replicas=replicas)


def application(spec: ServerSpec, *, replicas=1, ray_actor_options=None, autoscaling_config=None,
                logging_config=None) -> "serve.Application":
    """The Ray Serve application serving `spec` (see `app`)."""
    spec, resources = per_replica(spec, ray_actor_options)

    def build_replica_app():   # runs in each replica's process, once it starts
        return _replica_app(spec)

    scaling = {"autoscaling_config": autoscaling_config} if autoscaling_config else {"num_replicas": replicas}
    deployment = serve.deployment(
        serve.ingress(build_replica_app)(), name=NAME, ray_actor_options=resources,
        # a replica takes as many requests as its own queue holds; Ray's proxy keeps the rest
        max_ongoing_requests=spec.app_options.get("max_queue", MAX_QUEUE),
        logging_config=logging_config, **scaling)
    return deployment.bind()


def per_replica(spec: ServerSpec, ray_actor_options=None) -> tuple:
    """`spec` with its thread count settled, and the Ray resources one replica reserves: `threads` CPUs
    (1 when unset, and then 1 thread), a GPU when `gpu_layers` is not 0; `ray_actor_options` overrides them."""
    threads = spec.load_options.get("threads", -1)
    resources = {"num_cpus": threads if threads > 0 else 1}
    if spec.load_options.get("gpu_layers", 0):
        resources["num_gpus"] = 1
    resources.update(ray_actor_options or {})
    # Ray sets OMP_NUM_THREADS to the reserved CPUs only when the environment has none: say it outright.
    if threads <= 0:
        threads = max(1, int(resources["num_cpus"]))
    return ServerSpec(spec.model, {**spec.load_options, "threads": threads}, spec.app_options), resources


def _replica_app(spec: ServerSpec):
    """The server app of one replica. The model lives as long as the replica's process, which frees it."""
    context = serve.get_replica_context()
    app_name, deployment = context.app_name, context.deployment

    def replica_states() -> dict:
        status = serve.status().applications[app_name].deployments[deployment]
        return {"deployment": status.status, "replicas": dict(status.replica_states)}

    async def health_info() -> dict:
        try:
            return await asyncio.wait_for(asyncio.to_thread(replica_states), STATUS_TIMEOUT_S)
        except asyncio.TimeoutError:
            return {"deployment": None, "replicas": None,
                    "replicas_error": f"the Serve controller did not answer in {STATUS_TIMEOUT_S:g} s"}

    return spec.create_app(spec.load(), health_info=health_info)


# -- `zephyr serve --ray-replicas N` ---------------------------------------------------------------
def run(spec: ServerSpec, *, replicas: int, address=None, host="127.0.0.1", port=8000, log_level="info",
        on_ready=print):
    """Start or join Ray, deploy `replicas` replicas of `spec` behind http://host:port/, and serve until
    Ctrl-C, which shuts the deployment down (and the Ray instance, if this call started it).

    address: a Ray cluster's address (or "auto"); None: $RAY_ADDRESS, else a new local instance.
    on_ready(message) is called once every replica serves.
    """
    logging.getLogger("ray.serve").setLevel(log_level.upper())   # this process's Serve client too
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        _check_reachable(address)
        try:
            ray.init(address=address, logging_level=log_level.upper())
        except (ConnectionError, RuntimeError) as exc:   # no cluster for "auto", a token, another Ray version
            reason = f"{exc}: {exc.__cause__}" if exc.__cause__ else str(exc)
            raise ZephyrError(f"could not join the Ray cluster at {address}: {reason}") from None
    else:   # a new instance of our own, even when this machine runs another
        ray.init(address="local", include_dashboard=False, logging_level=log_level.upper())
    spec, resources = per_replica(spec)
    started_serve = False
    sigterm = signal.signal(signal.SIGTERM, _interrupt)   # a service manager's stop: shut down as Ctrl-C does
    try:
        if not address:
            _check_resources(resources, replicas)
        status = serve.status()
        if status.applications or status.proxies:
            raise ZephyrError("Ray Serve already runs on this cluster, and `zephyr serve` starts its own: stop it "
                              "(`serve shutdown`), or add zephyr to it as an application with "
                              "`serve run zephyr.integrations.ray_serve:build ...` (see docs/ray.md)")
        logging_config = {"log_level": log_level.upper()}
        serve.start(http_options={"host": host, "port": port}, logging_config=logging_config)
        started_serve = True
        try:
            serve.run(application(spec, replicas=replicas, logging_config=logging_config), name=NAME,
                      route_prefix="/")
        except RuntimeError as exc:   # Serve gave up on the replicas
            raise ZephyrError(f"the Ray Serve deployment failed: {_replica_error() or exc}") from None
        threads = spec.load_options["threads"]
        on_ready(f"zephyr: serving {spec.model} on {replicas} Ray Serve replica{'s' * (replicas != 1)} "
                 f"({threads} thread{'s' * (threads != 1)} each) at http://{host}:{port}/ "
                 f"(chat page at /, OpenAI API at /v1); Ctrl-C stops them")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        if started_serve:
            serve.shutdown()
        ray.shutdown()
        signal.signal(signal.SIGTERM, sigterm)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _replica_error():
    """The last line of the exception a replica failed to start with (the end of the traceback in the
    deployment's status message), or None."""
    application = serve.status().applications.get(NAME)
    message = application.deployments[NAME].message if application and NAME in application.deployments else ""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return lines[-1] if lines else None


def _check_reachable(address: str, timeout_s=5.0):
    """Fail fast on an address nothing answers at (ray.init would retry for minutes)."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ZephyrError(f"Ray address {address!r} is not HOST:PORT, ray://HOST:PORT or 'auto'")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ZephyrError(f"no Ray cluster answers at {address} ({exc.strerror or exc}): start one there with "
                          f"`ray start --head`, or give neither --ray-address nor RAY_ADDRESS for a local "
                          f"instance") from None


def _check_resources(resources: dict, replicas: int):
    """A local instance never grows: refuse replicas it cannot place, which Serve would wait for forever."""
    have = ray.cluster_resources()
    for kind, key in (("CPU", "num_cpus"), ("GPU", "num_gpus")):
        need = replicas * resources.get(key, 0)
        if have.get(kind, 0) < need:
            raise ZephyrError(f"{replicas} replicas need {need:g} {kind}s, and this machine's Ray instance has "
                              f"{have.get(kind, 0):g}: lower --ray-replicas or --threads"
                              + (" (or use --gpu-layers 0)" if kind == "GPU" else ""))
