"""distillscope: copy a model through its API, measure it, serve it, detect copying, prove it.

The public API, one function or type per capability::

    from distillscope import load_teacher, load_prompts, select_prompts, harvest, RecordSet
    teacher = load_teacher("default")
    prompts = select_prompts(load_prompts("sharegpt"), 64, seed=0)
    sampling = SamplingConfig(exposure="top20", max_new_tokens=48)
    harvest(teacher, prompts, "runs/h1", sampling=sampling)
    records = RecordSet("runs/h1")
    for exchange in records.exchanges("top5"): ...
"""

__version__ = "0.1.0"

# Names resolve on first use, so `import distillscope.prompts` does not pay for torch.
_EXPORTS = {
    "DistillscopeError": "distillscope.errors",
    "Exchange": "distillscope.records",
    "ExchangeCache": "distillscope.harvest",
    "Full": "distillscope.exposure",
    "HarvestManifest": "distillscope.harvest",
    "Prompt": "distillscope.prompts",
    "Provenance": "distillscope.records",
    "RecordSet": "distillscope.records",
    "SamplingConfig": "distillscope.teachers",
    "Signal": "distillscope.exposure",
    "Teacher": "distillscope.teachers",
    "Text": "distillscope.exposure",
    "TopK": "distillscope.exposure",
    "categorize": "distillscope.prompts",
    "harvest": "distillscope.harvest",
    "load_prompts": "distillscope.prompts",
    "load_teacher": "distillscope.teachers",
    "parse_exposure": "distillscope.exposure",
    "select_prompts": "distillscope.prompts",
}
__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'distillscope' has no attribute {name!r}")
