"""StreamEval (StreamingLLM section 4.3, figure 9): retrieval from recent context in an endless stream.

LongEval-style records `line <name>: REGISTER_CONTENT is <NNNNN>` arrive as one stream. After every
`every` new lines a query asks for the value of the line `lag` lines back (lag 1 is the newest line),
so the answer always lies in recent context while the stream grows far past the cache. A query is
answered by greedy generation and is correct when the first number in the reply is the value.

Formats: `raw` feeds plain text and ends each query with the record's own prefix, so the model only has
to copy the number; `chat` sends each batch of lines plus the question as a user turn and lets the
assistant answer. The backends that feed a stream (an engine session, the recompute baseline, the HTTP
API) are in stream_backends.py; the command is in streameval_cli.py.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

FORMATS = ("raw", "chat")
ADJECTIVES = (
    "amber", "brisk", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly", "keen", "lofty",
    "mellow", "noble", "olive", "proud", "quiet", "rapid", "silver", "tidy", "urban", "vivid", "wild", "young",
)  # fmt: skip
NOUNS = (
    "anchor", "basket", "canyon", "dagger", "engine", "falcon", "garden", "harbor", "island", "jacket",
    "kettle", "lantern", "meadow", "needle", "orchard", "pepper", "quarry", "river", "saddle", "tunnel",
    "valley", "walnut", "yarrow", "zephyr",
)  # fmt: skip
PREAMBLE = (
    "Records follow, one per line. Each line names a register and ends with its REGISTER_CONTENT, a "
    "five-digit number in angle brackets. Remember them: questions about recent lines come in between.\n"
)


@dataclass(frozen=True)
class Record:
    name: str
    value: int

    @property
    def line(self) -> str:
        return f"line {self.name}: REGISTER_CONTENT is <{self.value}>\n"


@dataclass(frozen=True)
class Turn:
    """New lines of the stream, then a question about `target` (an index into the records)."""

    lines: tuple[Record, ...]
    target: int
    record: Record
    lines_seen: int
    """Lines in the stream once this turn's lines arrived."""


def make_records(n: int, seed: int = 0) -> list[Record]:
    """`n` records with distinct three-word names (no digits, so the first number of a reply is its answer)."""
    if n > len(ADJECTIVES) * len(NOUNS) ** 2:
        raise ValueError(f"at most {len(ADJECTIVES) * len(NOUNS) ** 2} lines, got {n}")
    rng = random.Random(seed)
    names: set[str] = set()
    records: list[Record] = []
    while len(records) < n:
        name = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}-{rng.choice(NOUNS)}"
        if name not in names:
            names.add(name)
            records.append(Record(name, rng.randint(10000, 99999)))
    return records


def make_turns(records: Sequence[Record], lag: int = 20, every: int = 10) -> list[Turn]:
    """A query after every `every` lines, from the first point where `lag` lines exist."""
    if lag < 1 or every < 1:
        raise ValueError(f"lag and every must be >= 1, got lag {lag}, every {every}")
    if len(records) < lag:
        raise ValueError(f"a stream of {len(records)} lines has no line {lag} lines back")
    turns: list[Turn] = []
    sent = 0
    for seen in range(every, len(records) + 1, every):
        if seen < lag:
            continue
        target = seen - lag
        turns.append(Turn(tuple(records[sent:seen]), target, records[target], seen))
        sent = seen
    return turns


def user_text(turn: Turn, fmt: str, first: bool) -> str:
    """What the client sends for one turn: raw text to append, or a chat user message."""
    lines = "".join(r.line for r in turn.lines)
    name = turn.record.name
    if fmt == "raw":
        head = PREAMBLE if first else "\n"  # "\n" closes the previous answer's line
        return f"{head}{lines}Question: what is the REGISTER_CONTENT in line {name}?\nAnswer: line {name}: REGISTER_CONTENT is <"
    if fmt == "chat":
        head = PREAMBLE if first else ""
        return f"{head}{lines}What is the REGISTER_CONTENT in line {name}? Answer with the number only."
    raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")


def answer_of(reply: str) -> int | None:
    """The first number in a reply, or None."""
    match = re.search(r"\d+", reply)
    return int(match.group()) if match else None


class StreamFull(Exception):
    """The backend cannot take the next turn (dense: the stream would pass the model's context)."""


class Backend(Protocol):
    tokens: int
    """Tokens the stream holds so far (evicted ones included)."""

    def ask(self, text: str) -> str:
        """Append one turn's user text to the stream and return the greedy reply."""
        ...


@dataclass(frozen=True)
class QueryResult:
    lines_seen: int
    tokens: int
    """Stream length once the reply was generated."""
    expected: int
    answer: int | None

    @property
    def correct(self) -> bool:
        return self.answer == self.expected


def run_stream(
    backend: Backend, turns: Sequence[Turn], fmt: str, tick: Callable[[int], object] | None = None
) -> list[QueryResult]:
    """Every turn through one backend, in order; stops early when the backend is full."""
    results = []
    for i, turn in enumerate(turns):
        try:
            reply = backend.ask(user_text(turn, fmt, first=i == 0))
        except StreamFull:
            break
        results.append(QueryResult(turn.lines_seen, backend.tokens, turn.record.value, answer_of(reply)))
        if tick:
            tick(1)
    return results


def accuracy(results: Sequence[QueryResult]) -> float:
    return sum(r.correct for r in results) / len(results) if results else float("nan")


def curve(results: Sequence[QueryResult], group: int) -> list[dict[str, float]]:
    """Accuracy of each run of `group` consecutive queries, at the stream length of its last query."""
    return [
        {"lines": part[-1].lines_seen, "tokens": part[-1].tokens, "accuracy": accuracy(part)}
        for part in (results[i : i + group] for i in range(0, len(results), group))
    ]


def summary(results: Sequence[QueryResult], group: int) -> dict[str, object]:
    return {
        "accuracy": accuracy(results),
        "queries": len(results),
        "lines": results[-1].lines_seen if results else 0,
        "tokens": results[-1].tokens if results else 0,
        "curve": curve(results, group),
    }
