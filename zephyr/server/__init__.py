"""zephyr's OpenAI-compatible HTTP server (`zephyr serve MODEL`; needs `pip install 'zephyr[server]'`).

    from zephyr.server import create_app, serve
    serve(llm, host="127.0.0.1", port=8000)
"""
from .app import create_app
from .spec import ServerSpec


def serve(llm, *, host="127.0.0.1", port=8000, log_level="info", **app_options):
    """Serve `llm` until interrupted. app_options go to `create_app` (model_name, api_key, max_queue, cors_origins)."""
    import uvicorn
    uvicorn.run(create_app(llm, **app_options), host=host, port=port, log_level=log_level,
                timeout_graceful_shutdown=5)


__all__ = ["ServerSpec", "create_app", "serve"]
