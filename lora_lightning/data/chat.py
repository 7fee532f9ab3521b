"""Chat data: ``messages: [{role, content}, ...]`` rendered through a chat template, loss on assistant turns only.

Assistant tokens are found in one of two ways:

- the template marks them with ``{% generation %}`` ... ``{% endgeneration %}``: ``transformers`` returns the mask
  (``return_assistant_tokens_mask``), exact for any template;
- otherwise (most shipped templates, SmolLM2's included) by rendering prefixes: an assistant turn spans the characters
  between ``render(messages[:i], add_generation_prompt=True)`` and ``render(messages[:i + 1])``, and the tokens of the
  whole rendered conversation whose first character lies in such a span are trained on. This needs a template whose
  rendering of a prefix is a prefix of the rendering of the whole conversation; a template that rewrites earlier
  turns (e.g. drops past reasoning) is refused with an error that names the ``{% generation %}`` fix.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from transformers import PreTrainedTokenizerBase

from lora_lightning.data.collate import IGNORE_INDEX

ROLES = ("system", "user", "assistant", "tool")
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def check_conversation(row: dict[str, Any], field: str, where: str) -> list[dict[str, str]]:
    """The ``field`` of one data row as ``{role, content}`` messages; an error names ``where`` the row is."""
    if field not in row:
        raise ValueError(
            f"{where} has no '{field}' field; its keys are {list(row)}. Set messages_field to the field that holds "
            "the conversation."
        )
    messages = row[field]
    if not isinstance(messages, list) or not messages:
        raise ValueError(
            f"{where}: '{field}' must be a non-empty list of {{role, content}} messages, got {messages!r:.80}."
        )
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or not {"role", "content"} <= set(message):
            raise ValueError(f"{where}: message {number} needs 'role' and 'content', got {message!r:.80}.")
        if message["role"] not in ROLES:
            raise ValueError(f"{where}: message {number} has the unknown role {message['role']!r}; use one of {ROLES}.")
        if not isinstance(message["content"], str):
            kind = type(message["content"]).__name__
            raise ValueError(f"{where}: the content of message {number} must be text, got {kind}.")
    if not any(message["role"] == "assistant" for message in messages):
        raise ValueError(f"{where} has no assistant message, so nothing to train on. Remove the row or add a reply.")
    return messages  # extra keys (name, tool_call_id, ...) stay for templates that read them


def resolve_chat_template(tokenizer: PreTrainedTokenizerBase, chat_template: str | None, backbone: str) -> str:
    """The template to render with: ``chat_template`` (Jinja text or a path to a file of it), else the tokenizer's."""
    if chat_template is not None:
        if "{" not in chat_template and Path(chat_template).expanduser().is_file():
            return Path(chat_template).expanduser().read_text(encoding="utf-8")
        if "{" not in chat_template:
            raise FileNotFoundError(
                f"chat_template '{chat_template}' is neither a Jinja template nor an existing file."
            )
        return chat_template
    if not tokenizer.chat_template:
        raise ValueError(
            f"The tokenizer of '{backbone}' has no chat template, so format='chat' cannot render conversations. Set "
            "chat_template to a Jinja template (text, or a path to a .jinja file), e.g. the template of the instruct "
            "model this backbone was derived from, or use format='instruction' with prompt/response fields."
        )
    return tokenizer.chat_template


def has_generation_tags(template: str) -> bool:
    """Whether the template marks assistant output with ``{% generation %}`` blocks."""
    return _GENERATION_TAG.search(template) is not None


def _assistant_char_spans(render: Callable[..., str], messages: list[dict[str, str]], where: str) -> tuple[str, list]:
    """The rendered conversation and the ``(start, end)`` character spans of its assistant turns."""
    text = render(messages)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:index], add_generation_prompt=True), render(messages[: index + 1])
        if not (through.startswith(before) and text.startswith(through)):
            raise ValueError(
                f"{where}: the chat template's rendering up to message {index + 1} (an assistant turn) is not a prefix "
                "of the whole rendered conversation, so assistant tokens cannot be located by prefixes (a template "
                "that rewrites earlier turns, or one that adds text before a leading assistant turn). Give "
                "chat_template a template that wraps assistant output in {% generation %} ... {% endgeneration %}."
            )
        spans.append((len(before), len(through)))
    return text, spans


def chat_examples(
    tokenizer: PreTrainedTokenizerBase, conversations: list[tuple[str, list[dict[str, str]]]], template: str
) -> list[dict[str, list[int]]]:
    """``input_ids`` of each rendered conversation and ``labels`` equal to them on assistant tokens, -100 elsewhere.

    ``conversations`` holds ``(where, messages)`` pairs; ``where`` ("line 3 of 'chat.jsonl'") names a failing row.
    """
    if not tokenizer.is_fast:
        raise ValueError(
            "Locating assistant tokens needs a fast tokenizer (character offsets); "
            f"{type(tokenizer).__name__} is not one."
        )
    if has_generation_tags(template):
        examples = []
        for where, messages in conversations:
            with _named(where):
                encoded = tokenizer.apply_chat_template(
                    messages, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
                )
            ids = list(encoded["input_ids"])
            examples.append(_masked(ids, [bool(m) for m in encoded["assistant_masks"]]))
        return examples

    def render(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    rendered = []
    for where, messages in conversations:
        with _named(where):
            rendered.append(_assistant_char_spans(render, messages, where))
    encoded = tokenizer([text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
    examples = []
    for ids, offsets, (_, spans) in zip(encoded["input_ids"], encoded["offset_mapping"], rendered):
        examples.append(_masked(ids, [any(start <= first < end for start, end in spans) for first, _ in offsets]))
    return examples


def _masked(ids: list[int], trained: list[bool]) -> dict[str, list[int]]:
    return {"input_ids": ids, "labels": [t if keep else IGNORE_INDEX for t, keep in zip(ids, trained)]}


@contextmanager
def _named(where: str) -> Iterator[None]:
    """Re-raise a template's own error (``raise_exception``, a missing variable) with the row it came from."""
    try:
        yield
    except TemplateError as error:
        raise ValueError(f"{where}: the chat template refused this conversation: {error}") from error
