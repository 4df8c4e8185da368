"""Reproductions of distillation papers with distillscope's own losses."""

# Names resolve on first use: importing the package does not load torch.
_EXPORTS = {
    "HintonMnistConfig": "distillscope.papers.hinton_mnist",
    "format_table": "distillscope.papers.hinton_mnist",
    "run_hinton_mnist": "distillscope.papers.hinton_mnist",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'distillscope.papers' has no attribute {name!r}")
