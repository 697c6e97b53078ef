"""Chat messages -> prompt token ids.

With a chat template in the tokenizer, that template renders the conversation (with the
assistant's generation prompt). Without one, cadre falls back to a plain transcript, one
line per message (`role (name):` when the message has a name) and an open assistant turn:

    system: You are terse.
    user: Hello
    assistant:
"""

from __future__ import annotations

from .errors import APIError


def message_text(content, index: int) -> str:
    """OpenAI content: a string, or a list of parts of which only text parts are supported."""
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, f"only text content parts are supported, got type {part.get('type')!r}",
                           param=f"messages.{index}.content")
        texts.append(part["text"])
    return "".join(texts)


def fallback_transcript(messages: list[dict]) -> str:
    def speaker(m: dict) -> str:
        return f"{m['role']} ({m['name']})" if m.get("name") else m["role"]

    return "".join(f"{speaker(m)}: {m['content']}\n" for m in messages) + "assistant:"


def render_chat(tokenizer, messages) -> list[int]:
    if tokenizer is None:
        raise APIError(400, "this model's store has no tokenizer, so chat is unavailable", param="messages")
    plain = [{"role": m.role, "content": message_text(m.content, i), **({"name": m.name} if m.name else {})}
             for i, m in enumerate(messages)]
    if getattr(tokenizer, "chat_template", None):
        try:
            encoded = tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=True)
        except Exception as exc:  # templates raise on conversations they refuse (e.g. role order)
            raise APIError(400, f"the model's chat template rejected the messages: {exc}", param="messages") from None
        ids = list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
    else:
        ids = tokenizer(fallback_transcript(plain), add_special_tokens=True)["input_ids"]
    if not ids:
        raise APIError(400, "messages render to an empty prompt", param="messages")
    return ids
