"""`python -m client` / `charlstm`: generate from the command line, streaming to the terminal.

    charlstm "To be, or not" --temperature 0.5 --max-new-chars 300 --seed 7

The seed and its continuation go to stdout; a one-line summary (finish reason, length, the
seed to reproduce the text) or a one-line error goes to stderr. Exit status: 0 on success,
1 on an API or connection error, 2 on bad arguments, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Sequence
from typing import TextIO

from client._client import API_KEY_ENV, DEFAULT_URL, URL_ENV, Client
from client.errors import CharlstmError
from client.types import GenerationResult


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="charlstm", description="Continue a text with a charlstm server's model.",
        epilog=f"The API key, if the server wants one, is read from ${API_KEY_ENV}.")
    p.add_argument("seed_text", nargs="?", default="",
                   help="text to continue (empty starts a new passage)")
    p.add_argument("--model", help="model name (default: the server's default model)")
    p.add_argument("--temperature", type=float, help="0 is greedy; up to 5 (server default 1)")
    p.add_argument("--max-new-chars", type=int, help="characters to generate")
    p.add_argument("--top-k", type=int, help="sample among the k likeliest characters")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--seed", type=int, help="random seed, for a reproducible text")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--time-limit", type=float, dest="time_limit_s", help="seconds, at most")
    p.add_argument("--url", help=f"server URL (default: ${URL_ENV}, then {DEFAULT_URL})")
    p.add_argument("--no-stream", dest="stream", action="store_false",
                   help="wait for the whole text instead of streaming it")
    return p


def summary_line(result: GenerationResult) -> str:
    return (f"[{result.finish_reason}: {result.usage.generated_chars} chars, "
            f"seed {result.seed}, {result.timings.total_ms:.0f} ms]")


class Echo:
    """Writes the seed before the first generated text, so an error prints nothing to stdout."""

    def __init__(self, out: TextIO, seed_text: str) -> None:
        self.out = out
        self.pending = seed_text
        self.started = False

    def write(self, text: str) -> None:
        self.out.write(self.pending + text)
        self.out.flush()
        self.pending, self.started = "", True

    def end(self) -> None:
        if self.started:
            self.out.write("\n")
            self.out.flush()


def run(args: argparse.Namespace, echo: Echo) -> GenerationResult:
    params = {k: getattr(args, k) for k in (
        "model", "temperature", "max_new_chars", "top_k", "top_p", "seed", "stop",
        "time_limit_s")}
    with Client(args.url) as client:
        if not args.stream:
            result = client.generate(args.seed_text, **params)
            echo.write(result.text)
            return result
        with client.stream(args.seed_text, **params) as stream:
            for chunk in stream:
                echo.write(chunk)
        echo.write("")  # the seed, even when nothing was generated
        return stream.result


def write_anything(stream: TextIO) -> None:
    """Let a stream whose encoding cannot hold every character (PYTHONIOENCODING=ascii, a
    Latin-1 locale, a Windows console) write the others as escapes (`\\u4e2d`) instead of
    failing mid-text with UnicodeEncodeError: a model's text, and a refusal naming the
    characters it does not know, can hold any character."""
    if isinstance(stream, io.TextIOWrapper) and stream.errors == "strict":
        stream.reconfigure(errors="backslashreplace")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    write_anything(sys.stdout)
    write_anything(sys.stderr)
    echo = Echo(sys.stdout, args.seed_text)
    try:
        result = run(args, echo)
    except CharlstmError as exc:
        echo.end()
        print(f"charlstm: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        echo.end()
        return 130
    echo.end()
    print(summary_line(result), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
