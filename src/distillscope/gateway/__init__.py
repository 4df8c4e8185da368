"""The provider's side of the wire: an OpenAI-compatible gateway that controls exposure per key,
rate-limits, and records every exchange (see ``docs/gateway.md`` and ``docs/traffic-log.md``).

Names resolve on first use, so the traffic log, keys and limits load without torch.
"""

_EXPORTS = {
    "APIError": "distillscope.gateway.wire",
    "create_app": "distillscope.gateway.app",
    "Backend": "distillscope.gateway.backends",
    "ProxyBackend": "distillscope.gateway.backends",
    "TeacherBackend": "distillscope.gateway.backends",
    "ApiKey": "distillscope.gateway.keys",
    "KeyStore": "distillscope.gateway.keys",
    "write_block_list": "distillscope.gateway.keys",
    "GatewayConfig": "distillscope.gateway.server",
    "build_gateway": "distillscope.gateway.server",
    "run_gateway": "distillscope.gateway.server",
    "serve_in_thread": "distillscope.gateway.server",
    "BUILTIN_TIERS": "distillscope.gateway.tiers",
    "Tier": "distillscope.gateway.tiers",
    "load_tiers": "distillscope.gateway.tiers",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'distillscope.gateway' has no attribute {name!r}")
