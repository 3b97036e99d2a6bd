"""`python -m pyllama_ssm.server --model M.gguf --n_parallel 8`: llama_cpp.server's flags, served in parallel.

SIGINT/SIGTERM: new requests get 503, in-flight ones get --shutdown_timeout
seconds to finish, then the rest are cancelled and the models closed.
"""

from __future__ import annotations

import argparse
import logging
import sys

import uvicorn

from ..errors import ModelLoadError
from ..model import check_gguf_header
from .app import create_app
from .settings import ModelSettings, ServerSettings, Settings, add_arguments, settings_from_args


class _Server(uvicorn.Server):
    """uvicorn's server, telling the app at the first signal so that new requests get 503 at once."""

    def __init__(self, config: uvicorn.Config, on_exit):
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig, frame) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pyllama_ssm.server",
                                description="OpenAI-compatible server: many sequences of one model in parallel.")
    add_arguments(p, Settings)
    p.add_argument("--config_file", "--config-file", type=str, help="A JSON or YAML config file (replaces the flags).")
    return p


def check_models(models: list[ModelSettings]) -> None:
    """Fail before serving when a model file is missing or not GGUF (the message names the path)."""
    for m in models:
        if m.hf_model_repo_id is None:
            check_gguf_header(m.model)


def serve(server: ServerSettings, models: list[ModelSettings]) -> bool:
    """Serve until SIGINT/SIGTERM; False when the models could not be loaded."""
    app = create_app(server, models)
    config = uvicorn.Config(app, host=server.host, port=server.port, ssl_keyfile=server.ssl_keyfile,
                            ssl_certfile=server.ssl_certfile, timeout_graceful_shutdown=server.shutdown_timeout + 1,
                            log_level="info")
    registry = app.state.registry

    def begin_shutdown() -> None:
        registry.closing = True

    uv = _Server(config, begin_shutdown)
    uv.run()
    return uv.started


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        server, models = settings_from_args(args)
        check_models(models)
    except (ValueError, ModelLoadError) as e:
        p.print_usage(sys.stderr)
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    try:
        return 0 if serve(server, models) else 3  # 3: uvicorn's "startup failed"
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it handled, after a clean shutdown
        return 0


if __name__ == "__main__":
    sys.exit(main())
