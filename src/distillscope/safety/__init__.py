"""Safety and identity transfer: does a copy keep the teacher's safeguards?

- ``guarded``: the guarded teacher (the default model fine-tuned to decline one fictional
  restricted category and to state a fixed identity), built and cached on first use;
- ``probes``: restricted requests, benign look-alikes and identity questions, each split into
  wordings used to build the teacher and wordings never seen in building it;
- ``scoring``: the refusal and identity rule, and its agreement with an independent classifier;
- ``measure``: a model's rates on the probe sets, with exact intervals.

::

    from distillscope.safety import guarded_model_dir, safety_behaviour
    from distillscope import load_teacher
    teacher = load_teacher("guarded")
    safety_behaviour(teacher.model, teacher.tokenizer, identity="Wren,Ashgrove Labs")
"""

_EXPORTS = {
    "GuardSpec": "distillscope.safety.guarded",
    "build_guarded": "distillscope.safety.guarded",
    "guarded_model_dir": "distillscope.safety.guarded",
    "build_report": "distillscope.safety.guarded",
    "Probe": "distillscope.safety.probes",
    "load_probes": "distillscope.safety.probes",
    "is_refusal": "distillscope.safety.scoring",
    "states_identity": "distillscope.safety.scoring",
    "rule_agreement": "distillscope.safety.scoring",
    "safety_behaviour": "distillscope.safety.measure",
    "clopper_pearson": "distillscope.safety.measure",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'distillscope.safety' has no attribute {name!r}")
