"""Errors a user can cause and fix. The CLI prints these as one line, never as a traceback."""


class DistillscopeError(Exception):
    """Base class for errors caused by input the user can correct."""


class ExposureError(DistillscopeError, ValueError):
    """An exposure level that does not parse, or a downgrade to a richer level."""


class PromptSourceError(DistillscopeError):
    """A prompt pool that cannot be found or read."""


class TeacherError(DistillscopeError):
    """A teacher spec that names nothing loadable, or a request the teacher cannot serve."""


class IncompatibleDataError(DistillscopeError):
    """Records made by another teacher, tokenizer or setting than the consumer expects."""


class HarvestError(DistillscopeError):
    """A harvest that cannot start or resume (unwritable output, settings that changed)."""
