"""The provider's side of the wire: an OpenAI-compatible gateway that controls exposure per key,
rate-limits, and records every exchange (see ``docs/gateway.md`` and ``docs/traffic-log.md``)."""

from distillscope.gateway.app import APIError, create_app
from distillscope.gateway.backends import Backend, ProxyBackend, TeacherBackend
from distillscope.gateway.keys import ApiKey, KeyStore, write_block_list
from distillscope.gateway.server import GatewayConfig, build_gateway, run_gateway, serve_in_thread
from distillscope.gateway.tiers import BUILTIN_TIERS, WATERMARKS, Tier, load_tiers

__all__ = [
    "APIError",
    "ApiKey",
    "BUILTIN_TIERS",
    "Backend",
    "GatewayConfig",
    "KeyStore",
    "ProxyBackend",
    "TeacherBackend",
    "Tier",
    "WATERMARKS",
    "build_gateway",
    "create_app",
    "load_tiers",
    "run_gateway",
    "serve_in_thread",
    "write_block_list",
]
