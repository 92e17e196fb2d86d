"""Structured output: grammar-constrained decoding with llguidance, applied as a batched token mask.

`compiler` turns a `Grammar` (JSON schema, any JSON object, or a Lark grammar) into matchers,
`outputs` keeps one matcher per sequence and fills each step's mask off the main thread,
`bitmask` unpacks the mask on the logits' device. llguidance is imported on first use only.
"""

from engine.structured.compiler import GrammarError, grammar_problem
from engine.structured.outputs import PendingMask, StructuredOutputs

__all__ = ["GrammarError", "PendingMask", "StructuredOutputs", "grammar_problem"]
