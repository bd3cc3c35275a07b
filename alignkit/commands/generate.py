"""`alignkit generate`: chat with a model or a trained adapter (one-shot prompts or an interactive loop)."""
from __future__ import annotations

from alignkit.commands.common import add_model_arguments, load_model_from_args
from alignkit.generation import chat_generate


def register(commands) -> None:
    parser = commands.add_parser("generate", help="chat with a model or a trained adapter")
    add_model_arguments(parser)
    parser.add_argument("--prompt", "-p", action="append", help="a prompt (repeatable); none: interactive chat")
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.set_defaults(handler=generate)


def generate(args) -> int:
    model, tokenizer = load_model_from_args(args)
    settings = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    if args.prompt:
        conversations = [[*([{"role": "system", "content": args.system}] if args.system else []),
                          {"role": "user", "content": prompt}] for prompt in args.prompt]
        for prompt, answer in zip(args.prompt, chat_generate(model, tokenizer, conversations, **settings)):
            print(f"> {prompt}\n{answer}\n")
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
        answer = chat_generate(model, tokenizer, [history], **settings)[0]
        history.append({"role": "assistant", "content": answer})
        print(f"model> {answer}")
