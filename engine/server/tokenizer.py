"""The tokenizer on the API side: prompts in (text, chat messages), token strings for logprobs."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.server.openai_types import PromptError
from engine.weights import ModelLoadError


def load_tokenizer(folder: Path) -> Any:
    """The folder's transformers tokenizer, or None when it has none (token ids only then)."""
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{folder / 'tokenizer.json'}: cannot load tokenizer ({err})") from err


class TextTools:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    @property
    def has_tokenizer(self) -> bool:
        return self.tokenizer is not None

    @property
    def has_chat_template(self) -> bool:
        return self.tokenizer is not None and bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def chat_template(self) -> str | None:
        """The template's source (engine/server/tool_calls.py asks whether it knows tools)."""
        template = getattr(self.tokenizer, "chat_template", None)
        if isinstance(template, dict):  # named templates: the default one
            template = template.get("default")
        return template if isinstance(template, str) else None

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise PromptError("this model has no tokenizer: send the prompt as token ids")
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        if not self.has_chat_template:
            raise PromptError("this model has no chat template: use /v1/completions")
        try:
            ids = self.tokenizer.apply_chat_template(
                list(messages),
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                tokenize=True,
                return_dict=True,
            )["input_ids"]
        except Exception as err:  # jinja raises many types; all mean the messages do not fit the template
            raise PromptError(f"the messages do not fit the model's chat template: {err}") from err
        return list(ids)

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one TextTools per process, never freed
    def token_text(self, token_id: int) -> str:
        """A token on its own, as OpenAI logprobs show it."""
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id])
