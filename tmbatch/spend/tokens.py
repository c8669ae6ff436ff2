"""The pre-send token estimate: one rule for `--tpm`, budgets and `tmbatch estimate`.

Nothing can count a prompt's tokens exactly without the model's tokenizer, so this is a
deliberately simple rule (about 4 characters a token) that `tmbatch estimate --tokenize`
measures against the server. What matters more is that every part of tmbatch uses the same
one: a budget and the tokens-per-minute bucket must not disagree about what a line costs.
"""

from __future__ import annotations

from typing import Any

DEFAULT_MAX_OUTPUT_TOKENS = 256  # assumed when a body names no max_tokens
# The answer's share of what a line may generate, per route: the fields the server reads.
OUTPUT_CAP_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


def _text_len(value: Any) -> int:
    """Characters of prompt text in a string, a list of parts, or chat messages.

    Once per attempt (`prompt_tokens`), so the types JSON makes are told apart by exact type
    and an absent field costs no call; anything else (a subclass) is measured by `_any_len`,
    the same rule by isinstance."""
    kind = type(value)
    if kind is str:
        return len(value)
    if kind is list:
        total = 0
        for item in value:
            kind = type(item)
            if kind is dict:  # a message or a part: its text, plus its role and framing
                content = item.get("content")
                text = item.get("text")
                total += 4 + (len(content) if type(content) is str else
                              0 if content is None else _text_len(content))
                if text is not None:
                    total += _text_len(text)
            elif kind is str:
                total += len(item)
            elif kind is int or kind is bool:
                total += 4  # a token id
            elif not (kind is float or kind is list or item is None):
                total += _part_len(item)
        return total
    if kind is dict:
        return _text_len(value.get("content")) + _text_len(value.get("text"))
    if value is None or kind is int or kind is float or kind is bool:
        return 0
    return _any_len(value)


def _any_len(value: Any) -> int:
    """`_text_len` of a value JSON does not make, by isinstance."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_part_len(item) for item in value)
    if isinstance(value, dict):
        return _text_len(value.get("content")) + _text_len(value.get("text"))
    return 0


def _part_len(item: Any) -> int:
    """One item of a list of parts or messages, by isinstance."""
    if isinstance(item, str):
        return len(item)
    if isinstance(item, int):
        return 4  # a token id
    if isinstance(item, dict):
        return _text_len(item.get("content")) + _text_len(item.get("text")) + 4
    return 0


def text_tokens(chars: int) -> int:
    """Tokens for `chars` characters of text, by the one rule."""
    return chars // 4 + 1


def prompt_tokens(body: dict[str, Any]) -> int:
    """The prompt's estimated tokens: messages, prompt, input, instructions, token ids."""
    get = body.get
    chars = 0
    for value in (get("messages"), get("prompt"), get("input"), get("instructions"),
                  get("tokens")):
        if value is not None:
            chars += _text_len(value)
    return text_tokens(chars)


def output_cap(body: dict[str, Any]) -> int | None:
    """The line's own cap on generated tokens, or None when it sets none."""
    out = body.get("max_tokens") or body.get("max_completion_tokens") or body.get(
        "max_output_tokens"
    )
    if not isinstance(out, int) or isinstance(out, bool) or out < 0:
        return None
    return out


def choices(body: dict[str, Any]) -> int:
    """How many answers one request asks for (`n`): each may use the whole cap."""
    n = body.get("n")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else 1


def output_ceiling(body: dict[str, Any], generates: bool = True) -> int:
    """The most output tokens the line may be billed: its cap (or the default) times `n`.

    `generates=False` for /tokenize and /detokenize: they produce no output tokens.
    """
    if not generates:
        return 0
    return ceiling(output_cap(body), choices(body))


def ceiling(cap: int | None, n: int) -> int:
    """`output_ceiling` of a line whose `output_cap` and `choices` are known already."""
    return (DEFAULT_MAX_OUTPUT_TOKENS if cap is None else cap) * n


def estimate_tokens(body: dict[str, Any], generates: bool = True) -> int:
    """A pre-send estimate: ~4 characters a token for the prompt, plus the output ceiling."""
    return prompt_tokens(body) + output_ceiling(body, generates)


def answer_text_tokens(body: dict[str, Any]) -> int:
    """Output tokens of an answer that reports no `usage`, by the same rule: its text.

    Chat and completions keep text in `choices`, /v1/responses in `output` items.
    """
    chars = 0
    for choice in body.get("choices") or ():
        if isinstance(choice, dict):
            chars += _text_len(choice.get("message")) + _text_len(choice.get("text"))
    for item in body.get("output") or ():
        if isinstance(item, dict):
            chars += _text_len(item.get("content")) + _text_len(item.get("text"))
    return text_tokens(chars) if chars else 0
