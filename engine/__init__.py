"""The engine: model, paged KV cache, scheduler, runner, sampler and the offline LLM API."""

from engine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str) -> object:
    # The LLM class pulls in transformers; import it only when asked for.
    if name == "LLM":
        from engine.llm import LLM

        return LLM
    raise AttributeError(name)
