"""Dataset validation: every problem of a JSONL file, by line, with a stable code; the file's
format; and its size and token statistics. Streamed in blocks, so memory stays bounded.

``scan`` reads, ``fast`` proves plain chat blocks valid quickly (on worker processes for a
large file: ``parallel``), ``rules`` names problems, ``formats`` decides the file's format,
``tokens`` counts tokens, ``report`` holds the outcome.
"""

from tuneforge_api.validation.formats import CHAT, PREFERENCE, PROMPT_COMPLETION, PROMPTS, RANKINGS
from tuneforge_api.validation.report import MAX_PROBLEMS, Problem, Report, SizeProfile
from tuneforge_api.validation.scan import MAX_DEPTH, MAX_LINE_BYTES, Limits, validate_jsonl

__all__ = [
    "CHAT",
    "MAX_DEPTH",
    "MAX_LINE_BYTES",
    "MAX_PROBLEMS",
    "PREFERENCE",
    "PROMPTS",
    "PROMPT_COMPLETION",
    "RANKINGS",
    "Limits",
    "Problem",
    "Report",
    "SizeProfile",
    "validate_jsonl",
]
