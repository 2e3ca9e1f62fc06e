"""Render samples with a chat template and build the loss mask.

Masks come from character spans, not from template-specific markers: the text up to each assistant
reply is rendered with `add_generation_prompt=True` (exactly what `generate` feeds the model), and
the reply is the text between that prefix and the rendering that includes the reply. Any template
that renders conversations prefix-consistently therefore masks correctly, with or without
generation markers. Labels are -100 where no loss is taken.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunelab.data.formats import Sample

IGNORE_INDEX = -100

# tunelab's template for models without one of their own. Each assistant turn ends with the EOS
# token, so a fine-tuned base model learns to stop where `generate` stops.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### User:\n' + message['content'] + '\n\n' }}"
    "{% else %}{{ '### Assistant:\n' + message['content'] + eos_token + '\n\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ message['content'] + '\n' }}{% endif %}"
    "{% endfor %}"
)
"""data.chat_template: none (_render_plain) as a template, for merged models and GGUF files, which carry their
prompt format as a template: other tools then prompt them as training did."""

# Tokens that end an assistant turn in common templates; the one that follows a reply is trained.
_END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "</s>", "<|endoftext|>")


class TemplateError(ValueError):
    """The template cannot express the sample (e.g. it renders prefixes inconsistently)."""


@dataclass
class TokenizedSample:
    """Token ids and labels of one sample (labels[t] = input_ids[t] where trained, else -100)."""

    input_ids: list[int]
    labels: list[int]
    where: str
    source: str = ""

    @property
    def trainable_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


@dataclass(frozen=True)
class ChatRenderer:
    """Renders messages to text the way both training and generation see them."""

    tokenizer: object
    mode: str = "auto"
    """auto | tokenizer | tunelab | none (see DataConfig.chat_template)."""

    @property
    def template(self) -> str | None:
        own = getattr(self.tokenizer, "chat_template", None)
        if self.mode == "none":
            return None
        if self.mode == "tunelab" or (self.mode == "auto" and not own):
            return FALLBACK_CHAT_TEMPLATE
        if not own:
            raise TemplateError("data.chat_template is 'tokenizer' but the tokenizer has no chat template")
        return own

    @property
    def portable_template(self) -> str:
        """The template that renders as this renderer does, for a model saved to be read by other tools."""
        return self.template if self.mode != "none" else PLAIN_CHAT_TEMPLATE

    def render(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = False) -> str:
        template = self.template
        if template is None:
            return _render_plain(messages, add_generation_prompt, self.tokenizer.eos_token or "")
        return self.tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def prompt(self, messages: list[dict[str, str]]) -> str:
        """The text `generate` feeds the model: every turn before the last assistant reply."""
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        return self.render(messages, add_generation_prompt=True)


def _render_plain(messages: list[dict[str, str]], add_generation_prompt: bool, eos: str) -> str:
    """No template: turns are concatenated; replies end with EOS. For completion-style base models."""
    parts = []
    for message in messages:
        if message["role"] == "assistant":
            parts.append(message["content"] + eos)
        else:
            parts.append(message["content"] + "\n")
    return "".join(parts)


def trained_spans(renderer: ChatRenderer, messages: list[dict[str, str]], train_on: str) -> tuple[str, list]:
    """The full text and the character spans that carry loss: each chosen assistant reply through its
    end-of-turn token. Raises TemplateError when the template renders prefixes inconsistently."""
    full = renderer.render(messages)
    if train_on == "all":
        return full, [(0, len(full))]
    replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if train_on == "last_assistant":
        replies = replies[-1:]
    spans = []
    for i in replies:
        prefix = renderer.render(messages[:i], add_generation_prompt=True)
        through = full if i == len(messages) - 1 else renderer.render(messages[: i + 1])
        if not (through.startswith(prefix) and full.startswith(through)):
            raise TemplateError(
                "the chat template does not render conversations prefix-consistently, so replies cannot be "
                "located; set data.chat_template: tunelab"
            )
        start, end = len(prefix), len(through)
        content_at = full.find(messages[i]["content"], start, end)
        if content_at >= 0:
            end = _end_of_turn(full, content_at + len(messages[i]["content"]), end, renderer)
        spans.append((start, end))
    return full, spans


def _end_of_turn(text: str, after: int, limit: int, renderer: ChatRenderer) -> int:
    """Where the reply's end-of-turn marker ends (whitespace after it is not trained)."""
    markers = {m for m in _END_OF_TURN_MARKERS if m}
    eos = getattr(renderer.tokenizer, "eos_token", None)
    if eos:
        markers.add(eos)
    best = limit
    for marker in markers:
        at = text.find(marker, after, limit)
        if at >= 0:
            best = min(best, at + len(marker))
    if best == limit:
        # No marker: train through the reply and any trailing template text up to the next turn.
        return limit
    return best


def tokenize_chat(
    sample: Sample, renderer: ChatRenderer, train_on: str = "all_assistant"
) -> TokenizedSample:
    """Token ids and labels for a chat sample, rendered once and tokenised once."""
    text, spans = trained_spans(renderer, sample.messages, train_on)
    encoding = renderer.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoding["input_ids"])
    pairs = zip(input_ids, encoding["offset_mapping"], strict=True)
    if len(spans) == 1:  # the common case, written out: this loop runs once per token of a whole dataset
        ((start, end),) = spans
        labels = [token if start <= begin < end else IGNORE_INDEX for token, (begin, _) in pairs]
    else:
        labels = [
            token if any(start <= begin < end for start, end in spans) else IGNORE_INDEX for token, (begin, _) in pairs
        ]
    return TokenizedSample(input_ids, labels, sample.where, sample.source)


def tokenize_text(sample: Sample, tokenizer, max_length: int) -> list[TokenizedSample]:
    """Raw text for continued pretraining: every token trained, EOS appended, long documents split into
    max_length chunks (nothing is thrown away)."""
    ids = list(tokenizer(sample.text, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    chunks = [ids[i : i + max_length] for i in range(0, len(ids), max_length)]
    return [
        TokenizedSample(chunk, list(chunk), f"{sample.where} (chunk {n + 1})" if len(chunks) > 1 else sample.where,
                        sample.source)
        for n, chunk in enumerate(chunks)
        if len(chunk) > 1
    ]


def checked_renderer(tokenizer, mode: str) -> ChatRenderer:
    """The renderer for data.chat_template `mode`, failing early (DataError naming the key) when that mode cannot
    work with this tokenizer, before any row is read."""
    from tunelab.errors import DataError

    renderer = ChatRenderer(tokenizer, mode)
    try:
        renderer.template  # noqa: B018 - building the template is the check
    except TemplateError as err:
        raise DataError(str(err), where="data.chat_template") from None
    return renderer
