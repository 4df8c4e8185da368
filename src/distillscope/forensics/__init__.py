"""Prove and deter: watermarks keyed per account, planted canaries, and their exact tests.

``Watermark.for_account("kgw", master, account).processor()`` marks what a teacher samples;
``Watermark.detect`` and ``attribute`` test text for it with exact p-values;
``gateway_watermarks`` builds the schemes a gateway's tiers can name. ``CanarySet`` plants
per-account canaries in answers to trigger prompts and tests a suspect's answers for them.
``build_antidistillation(teacher, lam=...)`` is a processor that makes a local teacher's answers
worse training data (antidistillation sampling); ``DefendedTeacher`` caps, rounds and noises what a
teacher reveals, as a gateway tier does. See ``docs/forensics.md``.

Names resolve on first use; nothing here imports torch (the processors use it when called).
"""

_EXPORTS = {
    "Attribution": "distillscope.forensics.watermark",
    "Detection": "distillscope.forensics.watermark",
    "Watermark": "distillscope.forensics.watermark",
    "WatermarkError": "distillscope.forensics.watermark",
    "attribute": "distillscope.forensics.watermark",
    "derive_key": "distillscope.forensics.watermark",
    "gateway_watermarks": "distillscope.forensics.watermark",
    "gumbel_log10_p": "distillscope.forensics.watermark",
    "kgw_log10_p": "distillscope.forensics.watermark",
    "scored_ngrams": "distillscope.forensics.watermark",
    "CanaryAttribution": "distillscope.forensics.canaries",
    "CanarySet": "distillscope.forensics.canaries",
    "CanaryTest": "distillscope.forensics.canaries",
    "AntidistillationProcessor": "distillscope.forensics.defenses",
    "DefendedTeacher": "distillscope.forensics.defenses",
    "build_antidistillation": "distillscope.forensics.defenses",
    "downstream_gradient": "distillscope.forensics.defenses",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'distillscope.forensics' has no attribute {name!r}")
