"""Constraints (regex, choice, JSON schema) compiled to a DFA over a model's vocabulary.

A character model's alphabet is small (65 characters for models/shakespeare), so a constraint
becomes a table `next_state[state, id]` (int32, -1 = not allowed) that the engine indexes once
per sampled character: no token-boundary artefacts, no per-token mask search.

    spec (regex | choice | json | json_object)
      -> regex          choices escaped and joined; JSON schemas through outlines-core's
                        build_regex_from_schema (the keywords it really enforces only)
      -> NFA            Python's own regex parser (re._parser, as hypothesis's from_regex uses
                        it: exactly Python's syntax and error messages), Thompson construction
                        over classes of vocabulary ids
      -> DFA            subset construction, bounded by MAX_DFA_STATES and a deadline checked
                        per state, so a hostile regex ((a|b)*a(a|b){30}, a{100000}) is refused
                        in bounded time
      -> pruned table   only states from which an accepting state is reachable; `dist[s]`, the
                        fewest characters from s to acceptance, lets the engine keep every
                        sampled text completable within the characters it has left

Compilation runs on a worker thread (`ConstraintCompiler.compile`): the HTTP worker's event loop
keeps answering while a hard constraint compiles, and compiled constraints are kept in an LRU
keyed by (vocabulary, banned characters, constraint).
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import json
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from app.engine.messages import Constraint

# Python's regex parser: private but stable since 3.11 (hypothesis's from_regex reads it too).
_sre: Any = importlib.import_module("re._parser")
_c: Any = importlib.import_module("re._constants")

# Bounds: a DFA of 4096 states over a 100-character vocabulary is a 1.6 MB table; the generic
# JSON-object grammar (nesting depth 3) needs ~700 states. The NFA bound catches huge repetition
# counts before any subset is built.
MAX_NFA_STATES = 20_000
MAX_DFA_STATES = 4_096
COMPILE_DEADLINE_S = 1.0
CACHE_BYTES = 64 << 20
# Between JSON tokens: at most one space. A character model left free to emit whitespace can
# babble spaces and newlines until it runs out of characters.
JSON_WHITESPACE = r"[ ]?"
# Keywords outlines-core turns into regex structure; anything else would be silently ignored
# by it (minimum, multipleOf, uniqueItems...), so it is refused by name instead.
JSON_KEYWORDS = frozenset({
    "type", "properties", "required", "items", "prefixItems", "minItems", "maxItems",
    "minLength", "maxLength", "pattern", "format", "enum", "const", "anyOf", "oneOf", "allOf",
    "$ref", "$defs", "definitions", "additionalProperties",
    # annotations: no effect on the text
    "title", "description", "$schema", "$id", "$comment", "examples", "default", "deprecated",
    "readOnly", "writeOnly",
})

Kind = Literal["regex", "choice", "json", "json_object"]
CharTest = Callable[[str], bool]


class ConstraintError(ValueError):
    """A constraint that cannot be used; the message says why, for a 422."""


@dataclass(frozen=True)
class ConstraintSpec:
    """What the caller asked for: `source` is the regex, the JSON list of choices, or the JSON
    schema (canonical JSON, so equal schemas share a cache entry)."""

    kind: Kind
    source: str

    @staticmethod
    def of(kind: Kind, value: Any) -> ConstraintSpec:
        if kind == "regex":
            return ConstraintSpec(kind, str(value))
        if kind == "json" and isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise ConstraintError(f"json is not a valid JSON schema document: {exc}") from None
        return ConstraintSpec(kind, json.dumps(value, sort_keys=True, ensure_ascii=False))


@dataclass(frozen=True)
class CompiledConstraint:
    """The engine's form (`constraint`, sent with the request) and what the service checks."""

    constraint: Constraint
    shortest: int  # characters of the shortest accepted text
    states: int


# --- spec -> regex ----------------------------------------------------------------------------
def to_regex(spec: ConstraintSpec) -> str:
    if spec.kind == "regex":
        return spec.source
    if spec.kind == "choice":
        choices = json.loads(spec.source)
        return "|".join(_escape(c) for c in choices)
    schema = {"type": "object"} if spec.kind == "json_object" else json.loads(spec.source)
    check_schema(schema)
    from outlines_core.json_schema import build_regex_from_schema  # type: ignore[import-untyped]

    try:
        return str(build_regex_from_schema(json.dumps(schema), JSON_WHITESPACE))
    except Exception as exc:  # its errors are ValueError, TypeError and Rust-side ones
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConstraintError(f"json schema not supported: {first}") from None


def _escape(text: str) -> str:
    # re.escape leaves "\n" literal, which Python's parser reads back as itself.
    return "".join("\\" + ch if ch in ".^$*+?{}[]\\|()" else ch for ch in text)


def check_schema(schema: Any, path: str = "$") -> None:
    """Refuse, by name and place, a JSON-schema keyword the compiled grammar would not enforce."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise ConstraintError(
            f"json schema at {path} must be an object, got {type(schema).__name__}")
    for key, value in schema.items():
        if key not in JSON_KEYWORDS:
            raise ConstraintError(f"json schema keyword {key!r} (at {path}) is not supported; "
                                  f"supported: {', '.join(sorted(JSON_KEYWORDS))}")
        if key == "additionalProperties" and value is not False:
            raise ConstraintError(f"json schema at {path}: additionalProperties is supported "
                                  "only as false (objects hold the listed properties)")
        if key in ("properties", "$defs", "definitions") and isinstance(value, dict):
            for name, sub in value.items():
                check_schema(sub, f"{path}.{key}.{name}")
        elif key in ("anyOf", "oneOf", "allOf", "prefixItems") and isinstance(value, list):
            for n, sub in enumerate(value):
                check_schema(sub, f"{path}.{key}[{n}]")
        elif key == "items":
            check_schema(value, f"{path}.items")


# --- regex -> NFA over vocabulary classes -----------------------------------------------------
class _Budget:
    """The compile's deadline and size bounds, checked inside the construction loops."""

    def __init__(self, deadline_s: float) -> None:
        self.deadline = time.monotonic() + deadline_s
        self.seconds = deadline_s

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise ConstraintError(f"constraint too complex: compiling it took more than "
                                  f"{self.seconds:g} s")


class _Nfa:
    """Thompson NFA: states with epsilon moves and moves on sets of vocabulary ids (bitmasks)."""

    def __init__(self, chars: Sequence[str], allowed: int, budget: _Budget) -> None:
        self.chars = chars
        self.allowed = allowed  # bitmask of ids a constraint may use (not banned)
        self.budget = budget
        self.eps: list[list[int]] = []
        self.moves: list[list[tuple[int, int]]] = []  # (id bitmask, target)
        self.literals: set[str] = set()  # characters the regex names positively
        self.ids = {ch: i for i, ch in enumerate(chars)}
        self.masks: dict[tuple[Any, str, int], int] = {}  # repeated copies reuse their sets

    def state(self) -> int:
        if len(self.eps) >= MAX_NFA_STATES:
            raise ConstraintError(f"constraint too large: more than {MAX_NFA_STATES} automaton "
                                  "states (a long repetition count or a huge alternation)")
        if len(self.eps) % 1024 == 0:
            self.budget.tick()
        self.eps.append([])
        self.moves.append([])
        return len(self.eps) - 1

    def mask(self, test: CharTest) -> int:
        m = 0
        for i, ch in enumerate(self.chars):
            if test(ch):
                m |= 1 << i
        return m & self.allowed

    # Fragments are (start, end) pairs; `build` walks re._parser's (opcode, argument) lists.
    def build(self, items: Iterable[tuple[Any, Any]], flags: int) -> tuple[int, int]:
        start = end = self.state()
        for op, av in items:
            s, e = self.node(op, av, flags)
            self.eps[end].append(s)
            end = e
        return start, end

    def node(self, op: Any, av: Any, flags: int) -> tuple[int, int]:
        if op in (_c.LITERAL, _c.NOT_LITERAL, _c.ANY, _c.IN):
            s, e = self.state(), self.state()
            self.moves[s].append((self.char_mask(op, av, flags), e))
            return s, e
        if op is _c.BRANCH:
            s, e = self.state(), self.state()
            for alt in av[1]:
                a, b = self.build(alt, flags)
                self.eps[s].append(a)
                self.eps[b].append(e)
            return s, e
        if op is _c.SUBPATTERN:
            _group, add, _remove, sub = av
            self.check_flags(add)
            return self.build(sub, flags | add)
        if op in (_c.MAX_REPEAT, _c.MIN_REPEAT, _c.POSSESSIVE_REPEAT):
            return self.repeat(av, flags)
        if op is _c.AT and av in (_c.AT_BEGINNING, _c.AT_BEGINNING_STRING, _c.AT_END,
                                  _c.AT_END_STRING):
            # A constraint matches the whole text: anchors at its ends say nothing more.
            s = self.state()
            return s, s
        raise ConstraintError(f"regex feature not supported in a constraint: {_feature(op, av)}")

    def repeat(self, av: Any, flags: int) -> tuple[int, int]:
        lo, hi, sub = av
        start = end = self.state()
        for _ in range(lo):
            s, e = self.build(sub, flags)
            self.eps[end].append(s)
            end = e
        if hi == _c.MAXREPEAT:
            s, e = self.build(sub, flags)
            loop = self.state()
            self.eps[end].append(loop)
            self.eps[loop] += [s]
            self.eps[e].append(loop)
            return start, loop
        final = self.state()
        for _ in range(hi - lo):
            self.eps[end].append(final)
            s, e = self.build(sub, flags)
            self.eps[end].append(s)
            end = e
        self.eps[end].append(final)
        return start, final

    def char_mask(self, op: Any, av: Any, flags: int) -> int:
        if op is _c.LITERAL:
            self.literals.add(chr(av))
            i = self.ids.get(chr(av))
            return (1 << i) & self.allowed if i is not None else 0
        key = (op, repr(av), flags & _c.SRE_FLAG_DOTALL)
        m = self.masks.get(key)
        if m is None:
            m = self.masks[key] = self.mask(self.char_test(op, av, flags))
        return m

    def char_test(self, op: Any, av: Any, flags: int) -> CharTest:
        if op is _c.NOT_LITERAL:
            return lambda ch: ord(ch) != av
        if op is _c.ANY:
            dotall = bool(flags & _c.SRE_FLAG_DOTALL)
            return lambda ch: dotall or ch != "\n"
        points: set[int] = set()
        ranges: list[tuple[int, int]] = []
        tests: list[CharTest] = []
        negate = False
        for item_op, item in av:
            if item_op is _c.NEGATE:
                negate = True
            elif item_op is _c.LITERAL:
                points.add(item)
            elif item_op is _c.RANGE:
                ranges.append(item)
            elif item_op is _c.CATEGORY:
                tests.append(_category(item))
            else:
                raise ConstraintError(f"regex feature not supported in a constraint: "
                                      f"{_feature(item_op, item)}")
        if not negate:
            self.literals.update(chr(c) for c in points)
            for lo, hi in ranges:
                if hi - lo < 128:
                    self.literals.update(chr(c) for c in range(lo, hi + 1))

        def member(ch: str) -> bool:
            cp = ord(ch)
            return (cp in points or any(lo <= cp <= hi for lo, hi in ranges)
                    or any(t(ch) for t in tests))

        return lambda ch: member(ch) != negate

    @staticmethod
    def check_flags(flags: int) -> None:
        bad = flags & (_c.SRE_FLAG_IGNORECASE | _c.SRE_FLAG_LOCALE | _c.SRE_FLAG_ASCII)
        if bad:
            names = [n for n, f in (("i", _c.SRE_FLAG_IGNORECASE), ("L", _c.SRE_FLAG_LOCALE),
                                    ("a", _c.SRE_FLAG_ASCII)) if bad & f]
            raise ConstraintError(f"regex flag(s) {', '.join(names)} not supported in a "
                                  "constraint; spell the characters out ([Aa])")


def _category(cat: Any) -> CharTest:
    # Python's str semantics: \d isdecimal, \s isspace, \w isalnum or "_".
    tests: dict[Any, CharTest] = {
        _c.CATEGORY_DIGIT: str.isdecimal, _c.CATEGORY_SPACE: str.isspace,
        _c.CATEGORY_WORD: lambda ch: ch.isalnum() or ch == "_",
    }
    negated = {_c.CATEGORY_NOT_DIGIT: _c.CATEGORY_DIGIT, _c.CATEGORY_NOT_SPACE: _c.CATEGORY_SPACE,
               _c.CATEGORY_NOT_WORD: _c.CATEGORY_WORD}
    if cat in tests:
        return tests[cat]
    if cat in negated:
        base = tests[negated[cat]]
        return lambda ch: not base(ch)
    raise ConstraintError(f"regex category not supported in a constraint: {cat}")


def _feature(op: Any, av: Any) -> str:
    names = {_c.GROUPREF: "backreferences", _c.GROUPREF_EXISTS: "conditional groups",
             _c.ASSERT: "lookahead/lookbehind", _c.ASSERT_NOT: "negative lookaround",
             _c.ATOMIC_GROUP: "atomic groups"}
    if op is _c.AT:
        return f"the anchor {str(av).lower()} (only ^ and $ at the ends)"
    return names.get(op, str(op).lower())


def parse(regex: str, nfa: _Nfa) -> tuple[int, int]:
    try:
        tree = _sre.parse(regex)
    except RecursionError:
        raise ConstraintError("invalid regex: it nests too deeply") from None
    except Exception as exc:  # re.error, OverflowError on huge counts
        raise ConstraintError(f"invalid regex: {exc}") from None
    nfa.check_flags(tree.state.flags)
    try:
        start, end = nfa.build(list(tree), tree.state.flags)
    except RecursionError:
        raise ConstraintError("constraint nests too deeply") from None
    return start, end


# --- NFA -> DFA -> pruned table ---------------------------------------------------------------
def _classes(nfa: _Nfa, vocab: int) -> tuple[list[int], list[int]]:
    """Ids that every move treats alike share a class: (class of each id, one id per class)."""
    masks = {m for moves in nfa.moves for m, _ in moves}
    signature: dict[tuple[bool, ...], int] = {}
    class_of = []
    order = sorted(masks)
    for i in range(vocab):
        key = tuple(bool(m >> i & 1) for m in order)
        class_of.append(signature.setdefault(key, len(signature)))
    first = [0] * len(signature)
    for i in reversed(range(vocab)):
        first[class_of[i]] = i
    return class_of, first


def determinize(nfa: _Nfa, start: int, accept: int, vocab: int
                ) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.bool_]]:
    """Subset construction over id classes: (table (S, V) int32, accepting (S,))."""
    class_of, rep = _classes(nfa, vocab)
    closures: dict[int, frozenset[int]] = {}

    def closure(s: int) -> frozenset[int]:
        got = closures.get(s)
        if got is None:
            seen, todo = {s}, [s]
            while todo:
                if len(seen) % 4096 == 0:
                    nfa.budget.tick()
                for t in nfa.eps[todo.pop()]:
                    if t not in seen:
                        seen.add(t)
                        todo.append(t)
            got = closures[s] = frozenset(seen)
        return got

    # per NFA state: (class ids it moves on, target)
    moves = [[([c for c, r in enumerate(rep) if m >> r & 1], t) for m, t in ms]
             for ms in nfa.moves]
    first = closure(start)
    index = {first: 0}
    sets = [first]
    rows: list[list[int]] = []
    todo = deque([first])
    while todo:
        nfa.budget.tick()
        current = todo.popleft()
        buckets: dict[int, set[int]] = {}
        for n, s in enumerate(current):
            if n % 256 == 255:
                nfa.budget.tick()
            for classes, t in moves[s]:
                for c in classes:
                    buckets.setdefault(c, set()).add(t)
        row = [-1] * len(rep)
        for c, targets in buckets.items():
            union: set[int] = set()
            for k, t in enumerate(targets):
                if k % 64 == 0:
                    nfa.budget.tick()
                union |= closure(t)
            key = frozenset(union)
            found = index.get(key)
            if found is None:
                if len(sets) >= MAX_DFA_STATES:
                    raise ConstraintError(f"constraint too large: more than {MAX_DFA_STATES} "
                                          "DFA states")
                found = index[key] = len(sets)
                sets.append(key)
                todo.append(key)
            row[c] = found
        rows.append(row)
    by_class = np.array(rows, np.int32).reshape(len(rows), len(rep))
    table = by_class[:, np.array(class_of, np.intp)] if vocab else by_class
    accepting = np.array([accept in s for s in sets], np.bool_)
    return np.ascontiguousarray(table, np.int32), accepting


def prune(table: npt.NDArray[np.int32], accepting: npt.NDArray[np.bool_]
          ) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.bool_], npt.NDArray[np.int32]]:
    """Keep the states reachable from state 0 that can still reach acceptance, renumbered from
    0; `dist` is each kept state's fewest characters to acceptance. Empty when none is kept."""
    n = table.shape[0]
    preds: list[list[int]] = [[] for _ in range(n)]
    for s, t in zip(*np.nonzero(table >= 0), strict=True):
        preds[int(table[s, t])].append(int(s))
    dist = np.full(n, -1, np.int64)
    todo = deque(np.flatnonzero(accepting).tolist())
    dist[accepting] = 0
    while todo:
        s = todo.popleft()
        for p in preds[s]:
            if dist[p] < 0:
                dist[p] = dist[s] + 1
                todo.append(p)
    live = dist >= 0
    if not live[0]:
        empty = np.zeros((0, table.shape[1]), np.int32)
        return empty, np.zeros(0, np.bool_), np.zeros(0, np.int32)
    cut = np.where((table >= 0) & live[np.maximum(table, 0)], table, -1)
    order, seen, todo = [0], {0}, deque([0])
    while todo:
        for t in cut[todo.popleft()].tolist():
            if t >= 0 and t not in seen:
                seen.add(t)
                order.append(t)
                todo.append(t)
    renumber = np.full(n + 1, -1, np.int32)  # index -1 (no move) stays -1
    renumber[np.array(order)] = np.arange(len(order), dtype=np.int32)
    kept = renumber[cut[np.array(order)]]
    return (np.ascontiguousarray(kept, np.int32), accepting[np.array(order)],
            dist[np.array(order)].astype(np.int32))


def compile_constraint(spec: ConstraintSpec, chars: Sequence[str],
                       banned: frozenset[str] = frozenset(),
                       deadline_s: float = COMPILE_DEADLINE_S) -> CompiledConstraint:
    """The DFA of `spec` over `chars` (a model's vocabulary, in id order) without `banned`."""
    budget = _Budget(deadline_s)
    vocab = len(chars)
    if spec.kind == "choice":
        _check_choices(json.loads(spec.source), chars)
    allowed = sum(1 << i for i, ch in enumerate(chars) if ch not in banned)
    nfa = _Nfa(chars, allowed, budget)
    try:
        regex = to_regex(spec)
    except RecursionError:
        raise ConstraintError("json schema nests too deeply") from None
    start, accept = parse(regex, nfa)
    table, accepting = determinize(nfa, start, accept, vocab)
    table, accepting, dist = prune(table, accepting)
    if not len(table):
        missing = _needed(regex, chars, banned, nfa.literals, budget)
        if missing:
            raise ConstraintError(
                "the constraint needs characters not in the model's vocabulary (or banned by "
                f"logit_bias): {_listed(missing)}")
        raise ConstraintError("the constraint accepts no text over the model's vocabulary")
    if not (table[0] >= 0).any():
        raise ConstraintError("the constraint accepts only the empty text; nothing to generate")
    return CompiledConstraint(
        Constraint(states=int(table.shape[0]), vocab=vocab, table=table.tobytes(),
                   accepting=accepting.astype(np.uint8).tobytes(), dist=dist.tobytes()),
        shortest=int(dist[0]) if not accepting[0] else _shortest_nonempty(table, dist),
        states=int(table.shape[0]))


def _needed(regex: str, chars: Sequence[str], banned: frozenset[str], literals: set[str],
            budget: _Budget) -> list[str]:
    """The missing characters on the constraint's shortest text when the characters it names
    are all allowed (what a caller must add to the vocabulary, or stop banning)."""
    extra = sorted(ch for ch in literals if ch not in chars or ch in banned)
    if not extra:
        return []
    alphabet = [ch for ch in chars if ch not in banned] + extra
    nfa = _Nfa(alphabet, (1 << len(alphabet)) - 1, budget)
    start, accept = parse(regex, nfa)
    table, accepting, dist = prune(*determinize(nfa, start, accept, len(alphabet)))
    if not len(table):
        return extra
    used, state = set(), 0
    while not accepting[state]:
        moves = np.flatnonzero((table[state] >= 0) & (dist[np.maximum(table[state], 0)]
                                                      == dist[state] - 1))
        i = int(moves[0])
        used.add(alphabet[i])
        state = int(table[state, i])
    return [ch for ch in extra if ch in used]


def _shortest_nonempty(table: npt.NDArray[np.int32], dist: npt.NDArray[np.int32]) -> int:
    # The engine samples at least one character: from an accepting start, one move and then
    # that state's distance.
    nxt = table[0][table[0] >= 0]
    return 1 + int(dist[nxt].min())


def _check_choices(choices: list[str], chars: Sequence[str]) -> None:
    """A choice the model cannot spell is a mistake; one that logit_bias bans is left out."""
    known = set(chars)
    for text in choices:
        missing = sorted({ch for ch in text if ch not in known})
        if missing:
            raise ConstraintError(
                f"choice {text!r} has characters not in the model's vocabulary: "
                f"{_listed(missing)}")


def _listed(chars: list[str]) -> str:
    shown = ", ".join(repr(c) for c in chars[:20])
    return shown + (f" and {len(chars) - 20} more" if len(chars) > 20 else "")


# --- the service's entry point ------------------------------------------------------------------
class ConstraintCompiler:
    """Compiles on worker threads with a deadline, caching results by key (LRU by bytes)."""

    def __init__(self, threads: int = 2, cache_bytes: int = CACHE_BYTES,
                 deadline_s: float = COMPILE_DEADLINE_S) -> None:
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="constraints")
        self.cache: OrderedDict[bytes, CompiledConstraint] = OrderedDict()
        self.cache_bytes = cache_bytes
        self.deadline_s = deadline_s
        self.bytes = 0
        self._lock = threading.Lock()

    @staticmethod
    def key(spec: ConstraintSpec, chars: Sequence[str], banned: frozenset[str]) -> bytes:
        h = hashlib.sha256(json.dumps([list(chars), sorted(banned), spec.kind, spec.source],
                                      ensure_ascii=False).encode())
        return h.digest()

    async def compile(self, spec: ConstraintSpec, chars: Sequence[str],
                      banned: frozenset[str] = frozenset()) -> CompiledConstraint:
        key = self.key(spec, chars, banned)
        with self._lock:
            hit = self.cache.get(key)
            if hit is not None:
                self.cache.move_to_end(key)
                return hit
        loop = asyncio.get_running_loop()
        compiled = await loop.run_in_executor(self.pool, compile_constraint, spec, tuple(chars),
                                              banned, self.deadline_s)
        self._store(key, compiled)
        return compiled

    def _store(self, key: bytes, compiled: CompiledConstraint) -> None:
        size = len(compiled.constraint.table)
        if size > self.cache_bytes:
            return
        with self._lock:
            if key in self.cache:
                return
            self.cache[key] = compiled
            self.bytes += size
            while self.bytes > self.cache_bytes:
                _, old = self.cache.popitem(last=False)
                self.bytes -= len(old.constraint.table)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
