"""Builds the small lm-eval tasks' data from held-out Shakespeare: the last 10% of
tinyshakespeare.txt, the validation split the bundled model was never trained on
(training/data.py `split`). Run once; the JSONL files are committed so tests never read the
corpus or download anything:

    python tests/data/lm_eval/build.py ../shared/data/tinyshakespeare.txt
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent


def write(name: str, docs: Sequence[Mapping[str, object]]) -> None:
    with (HERE / name).open("w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")


def main(corpus: Path) -> None:
    text = corpus.read_text(encoding="utf-8")
    held = text[int(len(text) * 0.9):]
    rng = random.Random(19)
    lines = [ln for ln in held.split("\n") if len(ln) > 40 and ":" not in ln]
    picked = rng.sample(lines, 40)
    mc = []
    for i in range(8):
        line = picked[i]
        cut = line.index(" ", len(line) // 2)
        others = [p[p.index(" ", len(p) // 2):] for p in picked[8 + 3 * i:11 + 3 * i]]
        choices = [line[cut:], *others]
        order = rng.sample(range(4), 4)
        mc.append({"context": line[:cut], "choices": [choices[j] for j in order],
                   "label": order.index(0)})
    write("multiple_choice.jsonl", mc)
    starts = [held.index("\n\n", k) + 2 for k in (1000, 30000, 60000, 90000)]
    write("rolling.jsonl", [{"text": held[s:held.index("\n\n", s + 300)]} for s in starts])
    speakers = [held.index("\n\n", k) + 2 for k in (5000, 40000, 70000, 100000)]
    gen = []
    for s in speakers:
        end = held.index("\n", s)  # the speaker's name line, e.g. "ROMEO:"
        gen.append({"context": held[s:end + 1], "target": held[end + 1:held.index("\n", end + 1)]})
    write("generate_until.jsonl", gen)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
