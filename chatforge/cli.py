"""The `chatforge` command: each subcommand is a library function whose signature and docstring become its flags.

Parameters without a default are positional, or required --flags when keyword-only (`list[str]` ones take several values; a list defaulting to `()` is
an optional positional list). The "Args:" section of the
docstring (`name: help`) gives each flag's help. Nothing is imported until a subcommand runs, so --help is fast.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
import typing

# name -> (module:function, one-line summary shown by `chatforge --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("chatforge.commands.data:prepare", "clean, de-duplicate and split conversations"),
    "augment": ("chatforge.commands.augment:augment_command", "more conversations: paraphrases, user noise, slot swaps"),
    "tokenizer": ("chatforge.commands.tokenizer:tokenizer_train", "train a byte-level BPE tokenizer (tokenizer train ...)"),
    "show-labels": ("chatforge.commands.tokenizer:show_labels", "show which tokens of a conversation are trained"),
    "train": ("chatforge.commands.train:train_command", "pretrain or fine-tune (full or LoRA) from a YAML config"),
    "quickstart": ("chatforge.commands.tools:quickstart", "train a small chat model on the built-in corpus"),
    "generate": ("chatforge.commands.chat:generate_command", "generate replies to a prompt"),
    "chat": ("chatforge.commands.chat:chat_command", "chat with a model in the terminal"),
    "import": ("chatforge.commands.weights:import_command", "convert a pretrained checkpoint (HF folder, GGUF) to a model folder"),
    "merge": ("chatforge.commands.weights:merge_command", "fold a LoRA adapter into a standalone model folder"),
    "export": ("chatforge.commands.weights:export_command", "write a model as a GGUF file for llama.cpp / Ollama"),
    "serve": ("chatforge.commands.serve:serve_command", "serve an OpenAI-compatible API and a chat page"),
    "guard": ("chatforge.commands.guard:guard_command", "safety guard: calibrate MODEL's perplexity filter | train-moderation"),
    "score": ("chatforge.commands.preference:score_command", "rate replies with a reward model (stage: reward)"),
    "eval": ("chatforge.eval.evaluate:eval_command", "evaluate a model on held-out conversations"),
    "tune": ("chatforge.commands.tools:tune_command", "search hyperparameters with Optuna"),
    "size": ("chatforge.commands.tools:size_command", "plan a model size: parameters, FLOPs, memory, time"),
    "ablate": ("chatforge.commands.tools:ablate_command", "compare attention variants at the same token budget"),
    "report": ("chatforge.commands.tools:report_command", "write report.md and report.html for a run"),
    "audit": ("chatforge.commands.audit:audit_command", "measure memorisation: canary exposure and extraction"),
    "encrypt": ("chatforge.commands.privacy:encrypt_command", "encrypt a file, model folder or dataset at rest"),
    "decrypt": ("chatforge.commands.privacy:decrypt_command", "decrypt what `chatforge encrypt` made"),
    "keygen": ("chatforge.commands.privacy:keygen_command", "write a new encryption key file (mode 0600)"),
}
# Subcommands with a sub-verb: `chatforge tokenizer train ...`.
VERBS = {"tokenizer": "train"}


def _doc_parts(fn) -> tuple[str, dict[str, str]]:
    doc = inspect.getdoc(fn) or ""
    summary = doc.split("\n\n")[0].replace("\n", " ")
    helps: dict[str, str] = {}
    if "Args:" in doc:
        current = None
        for line in doc.split("Args:", 1)[1].splitlines():
            stripped = line.strip()
            if not stripped:
                continue
            name, sep, text = stripped.partition(":")
            if sep and name.isidentifier():
                current = name
                helps[name] = text.strip()
            elif current:
                helps[current] += " " + stripped
    return summary, helps


def _base_type(tp):
    """(scalar type, is_list) for an annotation such as int, str | None, list[str]."""
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (list, tuple, typing.Sequence) or (origin is None and tp in (list, tuple)):
        return (args[0] if args else str), True
    if args and origin is not None:  # Optional / union
        return _base_type(args[0])
    return tp, False


def build_parser(fn, prog: str) -> argparse.ArgumentParser:
    summary, helps = _doc_parts(fn)
    parser = argparse.ArgumentParser(prog=prog, description=summary)
    hints = typing.get_type_hints(fn)
    for name, p in inspect.signature(fn).parameters.items():
        tp, is_list = _base_type(hints.get(name, str))
        help_text = helps.get(name, "")
        if p.default is inspect.Parameter.empty and p.kind is inspect.Parameter.KEYWORD_ONLY:
            parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=tp, nargs="+" if is_list else None,
                                required=True, help=help_text)
        elif p.default is inspect.Parameter.empty:
            parser.add_argument(name, type=tp, nargs="+" if is_list else None, help=help_text)
        elif tp is bool:
            parser.add_argument(f"--{name.replace('_', '-')}", dest=name, action=argparse.BooleanOptionalAction,
                                default=p.default, help=help_text)
        elif is_list and p.default == ():  # an optional positional list, e.g. train's key=value overrides
            parser.add_argument(name, nargs="*", default=[], help=help_text)
        else:
            default = p.default
            parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=tp, nargs="+" if is_list else None,
                                default=default, help=f"{help_text} (default: {default})")
    return parser


def _resolve(target: str):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def _top_help() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: chatforge COMMAND [options]   (chatforge COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_top_help())
        return 0
    if argv[0] in ("-V", "--version"):
        from chatforge import __version__

        print(__version__)
        return 0
    name = argv.pop(0)
    if name not in COMMANDS:
        print(f"chatforge: unknown command {name!r}\n\n{_top_help()}", file=sys.stderr)
        return 2
    prog = f"chatforge {name}"
    if name in VERBS:
        if not argv or argv[0] != VERBS[name]:
            print(f"usage: chatforge {name} {VERBS[name]} [options]", file=sys.stderr)
            return 2
        argv.pop(0)
        prog += f" {VERBS[name]}"
    from chatforge.errors import ChatforgeError

    try:
        fn = _resolve(COMMANDS[name][0])
        args = vars(build_parser(fn, prog).parse_args(argv))
        result = fn(**args)
    except ChatforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly, as Unix tools do
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
