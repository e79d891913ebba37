"""``ctxaware render``: the command line of `ctxaware.rendering.chat` (parse, run, print)."""

from __future__ import annotations

from ctxaware.core.errors import CtxawareError
from ctxaware.rendering.chat import describe, render


def main(argv: list[str]) -> int:
    """``ctxaware render``: print a conversation's tokens with their roles, with or without the template."""
    import dataclasses
    import json

    from ctxaware.core.config import ModelConfig, parse_config

    @dataclasses.dataclass
    class RenderConfig(ModelConfig):
        """Show how a conversation is rendered and which role every token gets."""

        messages: str = dataclasses.field(
            default='[{"role": "user", "content": "What is the capital of France?"}]',
            metadata={"help": "JSON list of {role, content} messages, or a path to a JSON file holding one"},
        )
        mode: str = dataclasses.field(
            default="chat", metadata={"help": "chat (the model's template) or plain"}
        )
        response_prefix: str | None = dataclasses.field(
            default=None, metadata={"help": "text that starts the answer"}
        )

    cfg = parse_config(RenderConfig, argv, prog="ctxaware render")
    from pathlib import Path

    raw = Path(cfg.messages).read_text() if Path(cfg.messages).is_file() else cfg.messages
    try:
        messages = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CtxawareError(
            f"--messages is not valid JSON ({e.msg}); give a JSON list of {{role, content}}"
        ) from None
    tok = cfg.load_tokenizer(cfg.model)
    r = render(messages, tok, cfg.mode, response_prefix=cfg.response_prefix)  # type: ignore[arg-type]
    print(describe(r, tok))
    return 0
