"""`alignkit generate`: chat with a model or a trained adapter (one-shot prompts or an interactive loop).

Replies are streamed token by token (``--no-stream``: all prompts in one batch, printed at the end);
a reply that hit ``--max-new-tokens`` before the model ended its turn is marked as cut off.
"""
from __future__ import annotations

import sys

from alignkit.commands.common import add_model_arguments, load_model_from_args
from alignkit.generation import chat_generate_with_status, stream_chat


def cut_off_mark(max_new_tokens: int) -> str:
    return f" [cut off: --max-new-tokens {max_new_tokens} reached]"


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def register(commands) -> None:
    parser = commands.add_parser("generate", help="chat with a model or a trained adapter")
    add_model_arguments(parser)
    parser.add_argument("--prompt", "-p", action="append", help="a prompt (repeatable); none: interactive chat")
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--no-stream", action="store_true", help="generate every prompt in one batch; print at the end")
    parser.set_defaults(handler=generate)


def generate(args) -> int:
    model, tokenizer = load_model_from_args(args)
    settings = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    mark = cut_off_mark(args.max_new_tokens)
    if args.prompt:
        conversations = [[*([{"role": "system", "content": args.system}] if args.system else []),
                          {"role": "user", "content": prompt}] for prompt in args.prompt]
        if args.no_stream:
            for prompt, (answer, done) in zip(args.prompt, chat_generate_with_status(model, tokenizer, conversations,
                                                                                     **settings)):
                print(f"> {prompt}\n{answer}{'' if done else mark}\n")
            return 0
        for prompt, conversation in zip(args.prompt, conversations):
            _write(f"> {prompt}\n")
            _, done = stream_chat(model, tokenizer, conversation, _write, **settings)
            _write(("" if done else mark) + "\n\n")
        return 0
    history = [{"role": "system", "content": args.system}] if args.system else []
    print("alignkit chat: type a message, /reset to start over, Ctrl-D to quit")
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if not text:
            continue
        if text == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": text})
        _write("model> ")
        answer, done = stream_chat(model, tokenizer, history, _write, **settings)
        _write(("" if done else mark) + "\n")
        history.append({"role": "assistant", "content": answer})
