"""An OpenAI-compatible HTTP server in front of any distillscope teacher."""

from distillscope.gateway.app import create_app
from distillscope.gateway.server import serve_in_thread

__all__ = ["create_app", "serve_in_thread"]
