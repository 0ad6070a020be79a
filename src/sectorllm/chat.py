"""run.c's chat mode: Llama 2 chat turns ([INST] ... [/INST]) in one context, each answer running until EOS."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from .engines import Engine
from .generate import TokenSampler, step_budget
from .tokenizer import EOS, Tokenizer

SYSTEM_GUIDE = "Enter system prompt (optional): "
USER_GUIDE = "User: "
ASSISTANT = "Assistant: "


def render_turn(user: str, system: str = "") -> str:
    """One user turn in the Llama 2 chat schema; the system prompt goes into the first turn only."""
    if system:
        return f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST]"
    return f"[INST] {user} [/INST]"


def chat(engine: Engine, tokenizer: Tokenizer, sampler: TokenSampler, steps: int,
         read_line: Callable[[], str | None], user_prompt: str | None = None,
         system_prompt: str | None = None) -> Iterator[bytes]:
    """Yield the bytes run.c's chat() prints, in order; read_line() gives the next line of input (None at its end).

    As run.c: the first turn takes user_prompt and system_prompt when given and asks for them otherwise (each ask
    is preceded by its guide text in the output); every turn is encoded with BOS; a token is sampled after every
    position, the forced prompt ones included, so the coins are run.c's; the answer prints until EOS, then the EOS
    goes into the context, the token sampled after it is printed, and the user has the next turn. `steps` counts
    every position of the conversation (0 or more than the context: the whole context). One difference: run.c
    reuses its last line when its input ends; here the conversation ends.
    """
    steps, _ = step_budget(steps, engine.config.seq_len)
    prompt_tokens: list[int] = []
    user_idx = 0
    user_turn = True
    system = ""
    token = next_token = 0
    pos = 0
    while pos < steps:
        if user_turn:
            if pos == 0:
                if system_prompt is None:
                    yield SYSTEM_GUIDE.encode()
                    line = read_line()
                    if line is None:
                        break
                    system = line
                else:
                    system = system_prompt
            if pos == 0 and user_prompt is not None:
                user = user_prompt
            else:
                yield USER_GUIDE.encode()
                line = read_line()
                if line is None:
                    break
                user = line
            prompt_tokens = tokenizer.encode(render_turn(user, system if pos == 0 else ""))
            user_idx = 0
            user_turn = False
            yield ASSISTANT.encode()
        if user_idx < len(prompt_tokens):
            token = prompt_tokens[user_idx]
            user_idx += 1
        else:
            token = next_token
        if token == EOS:
            user_turn = True
        next_token = sampler.sample(engine.forward(token, pos))
        pos += 1
        if user_idx >= len(prompt_tokens) and next_token != EOS:
            yield tokenizer.piece_bytes(token, next_token)
        if next_token == EOS:
            yield b"\n"
    yield b"\n"
