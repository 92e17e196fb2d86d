"""How one request wants its tokens chosen and when it stops."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

GrammarKind = Literal["json_schema", "json_object", "lark"]
GRAMMAR_KINDS: tuple[str, ...] = get_args(GrammarKind)

# Past this many top logprobs per token the response size, not the model, dominates.
MAX_TOP_LOGPROBS = 20
MAX_N = 128


@dataclass(frozen=True, slots=True)
class Grammar:
    """A constraint on the output, enforced token by token (engine/structured/).

    `json_schema`: `text` is the schema as JSON text; `json_object`: any JSON object, `text`
    empty; `lark`: `text` is an llguidance Lark grammar (it may embed `%json{...}`).
    """

    kind: GrammarKind
    text: str = ""

    def problem(self) -> str | None:
        if self.kind not in GRAMMAR_KINDS:
            return f"grammar kind must be one of {', '.join(GRAMMAR_KINDS)}, got {self.kind!r}"
        if self.kind == "json_object" and self.text:
            return "a json_object grammar takes no text"
        if self.kind != "json_object" and not self.text.strip():
            return f"a {self.kind} grammar needs its text"
        return None


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Sampling and stopping settings, validated once when a request is built.

    `temperature == 0` is greedy. `top_k <= 0` and `top_p == 1` disable those filters.
    `logprobs=None` returns no logprobs; `logprobs=k` returns the chosen token's logprob
    and the k most likely alternatives (k may be 0).
    """

    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    grammar: Grammar | None = None  # structured output; checked against the tokenizer on admission

    def __post_init__(self) -> None:
        problem = self.problem()
        if problem is not None:
            raise ValueError(problem)

    def problem(self) -> str | None:
        """The first invalid setting, described for a user, or None when all are valid."""
        if not 1 <= self.n <= MAX_N:
            return f"n must be between 1 and {MAX_N}, got {self.n}"
        if self.max_tokens < 1:
            return f"max_tokens must be at least 1, got {self.max_tokens}"
        if not 0.0 <= self.temperature <= 100.0:
            return f"temperature must be between 0 and 100, got {self.temperature}"
        if not 0.0 < self.top_p <= 1.0:
            return f"top_p must be in (0, 1], got {self.top_p}"
        if not 0.0 <= self.min_p <= 1.0:
            return f"min_p must be in [0, 1], got {self.min_p}"
        # Below 0.01 the division overflows the logits into inf/NaN (found by fuzzing the API).
        if not 0.01 <= self.repetition_penalty <= 100.0:
            return f"repetition_penalty must be in [0.01, 100], got {self.repetition_penalty}"
        if not -2.0 <= self.presence_penalty <= 2.0:
            return f"presence_penalty must be between -2 and 2, got {self.presence_penalty}"
        if not -2.0 <= self.frequency_penalty <= 2.0:
            return f"frequency_penalty must be between -2 and 2, got {self.frequency_penalty}"
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            return f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {self.logprobs}"
        if any(not s for s in self.stop):
            return "stop strings must not be empty"
        if any(t < 0 for t in self.stop_token_ids):
            return "stop_token_ids must be non-negative"
        if self.grammar is not None:
            return self.grammar.problem()
        return None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
