"""The tool protocol: calls between marker tokens, answered by a host environment in batches.

A policy calls a tool by emitting ``<call>`` ... ``</call>``. When a row emits ``</call>`` the
sampler (inside its compiled decode loop) hands every row that closed a call at that position
to `ToolEnv.serve` in one host round-trip; the environment decodes each call, runs the tool and
answers with observation tokens ``<result>`` text ``</result>``, which the sampler then feeds
to the model as context (attention 1) that is not the policy's action (loss mask 0).

Every failure becomes an error observation ``<result>error: KIND</result>`` and never a crash:

* ``parse``: the call cannot be read (no ``<call>`` before ``</call>``, unknown tool, tokens
  outside the tool's alphabet);
* ``tool``: the tool raised;
* ``timeout``: the tool did not answer within ``timeout`` seconds of the round-trip;
* ``limit``: the row already made ``max_turns`` calls (the row is then aborted).
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import jax
import numpy as np

OK, PARSE_ERROR, TOOL_ERROR, TIMEOUT, LIMIT = 0, 1, 2, 3, 4
STATUS_NAMES = ("ok", "parse", "tool", "timeout", "limit")


class ToolResult(NamedTuple):
    """Observations of one round-trip, for all B rows (rows not served are ignored)."""

    tokens: jax.Array  # int32 [B, R]: <result> ... </result>, right-padded
    length: jax.Array  # int32 [B]: observation tokens to feed
    status: jax.Array  # int32 [B]: OK or an error kind
    abort: jax.Array  # bool [B]: the environment ends the row here


@dataclasses.dataclass(frozen=True, eq=False)
class ToolSpec:
    """What the compiled sampler needs to know about an environment.

    Attributes:
      call_start, call_end: token ids of ``<call>`` and ``</call>``.
      max_obs: R, observation slots per round-trip (longer observations are cut, keeping the
        closing marker).
      max_turns: K, calls per row; a further call aborts the row.
      serve: host function (response [B, N], call_start [B], rows bool [B], end index) ->
        (tokens [B, R], length [B], status [B]) as numpy int32 arrays.
      error_tokens: int32 [len(STATUS_NAMES), R] observation of each status (row OK unused):
        what a fault that breaks a tool in-graph answers.
      error_length: int32 [len(STATUS_NAMES)].
    """

    call_start: int
    call_end: int
    max_obs: int
    max_turns: int
    serve: Callable
    error_tokens: np.ndarray
    error_length: np.ndarray


class _Pool:
    """Runs a round-trip's calls on daemon worker threads under one deadline.

    All calls of a round-trip are queued at once and the host waits until they are answered
    or `timeout` seconds have passed since the round-trip began; unanswered calls time out.
    Workers stuck in a call are abandoned with their queue (a Python thread cannot be
    killed) and later round-trips get fresh ones.
    """

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._jobs: queue.Queue | None = None

    def _start(self) -> queue.Queue:
        jobs: queue.Queue = queue.Queue()

        def loop():
            while True:
                k, fn, arg, out, cond = jobs.get()
                try:
                    result = (OK, fn(arg))
                except Exception as e:  # noqa: BLE001 - any tool failure is an observation
                    result = (TOOL_ERROR, e)
                with cond:
                    out[k] = result
                    cond.notify()

        for _ in range(self.size):
            threading.Thread(target=loop, daemon=True).start()
        return jobs

    def map(self, calls: Sequence[tuple[Callable, str]], timeout: float | None) -> list:
        """[(status, value)] per call: (OK, result) | (TOOL_ERROR, exception) | (TIMEOUT, None)."""
        if timeout is None:
            return [_inline(fn, arg) for fn, arg in calls]
        if not calls:
            return []
        if self._jobs is None:
            self._jobs = self._start()
        out: dict[int, tuple] = {}
        cond = threading.Condition()
        for k, (fn, arg) in enumerate(calls):
            self._jobs.put((k, fn, arg, out, cond))
        deadline = time.monotonic() + timeout
        with cond:
            while len(out) < len(calls) and (left := deadline - time.monotonic()) > 0:
                cond.wait(left)
            results = [out.get(k, (TIMEOUT, None)) for k in range(len(calls))]
        if len(out) < len(calls):
            self._jobs = None  # its workers may be stuck in a call
        return results


def _inline(fn, arg):
    try:
        return OK, fn(arg)
    except Exception as e:  # noqa: BLE001
        return TOOL_ERROR, e


class ToolEnv:
    """A set of named text tools behind the call protocol.

    A call's text is ``name: arguments``, or just the arguments when the environment has a
    single tool. Tools are functions ``str -> str``; their result is encoded with the task's
    tokenizer.

    Args:
      tools: name -> function.
      tokenizer: a tokenizer with ``<call> </call> <result> </result>`` as single tokens.
      max_obs: R, observation slots per round-trip.
      max_turns: K, calls per row.
      timeout: seconds a round-trip's calls may take (None: run inline, no deadline).
      alphabet: characters a call may contain (None: any).
    """

    def __init__(
        self,
        tools: Mapping[str, Callable[[str], str]],
        tokenizer,
        *,
        max_obs: int,
        max_turns: int = 1,
        timeout: float | None = 1.0,
        alphabet: str | None = None,
    ) -> None:
        if not tools:
            raise ValueError("a tool environment needs at least one tool")
        if max_obs < 3 or max_turns < 1:
            raise ValueError(f"need max_obs >= 3 and max_turns >= 1, got {max_obs}, {max_turns}")
        self.tools = dict(tools)
        self.tokenizer = tokenizer
        self.max_obs = max_obs
        self.max_turns = max_turns
        self.timeout = timeout
        self.alphabet = None if alphabet is None else set(alphabet)
        ids = tokenizer.convert_tokens_to_ids(["<call>", "</call>", "<result>", "</result>"])
        if tokenizer.unk_token_id in ids or None in ids:
            raise ValueError("the tokenizer lacks the tool markers <call> </call> <result> ...")
        self.call_start, self.call_end, self.result_start, self.result_end = ids
        self._special = frozenset(tokenizer.all_special_ids) | set(ids)
        self._pool = _Pool()
        self.round_trips = 0  # host round-trips served (for benchmarks)

    def spec(self) -> ToolSpec:
        errors = [self.observation("") if s == OK else self.error(s) for s in range(5)]
        return ToolSpec(
            call_start=self.call_start,
            call_end=self.call_end,
            max_obs=self.max_obs,
            max_turns=self.max_turns,
            serve=self.serve,
            error_tokens=np.stack([self._pad(e) for e in errors]),
            error_length=np.array([len(e) for e in errors], np.int32),
        )

    # -- observations -------------------------------------------------------------------

    def observation(self, text: str) -> list[int]:
        """``<result>`` text ``</result>`` as ids, the text cut to fit `max_obs`."""
        return self.observations([text])[0]

    def observations(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        encoded = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [[self.result_start, *ids[: self.max_obs - 2], self.result_end] for ids in encoded]

    def error(self, status: int) -> list[int]:
        return self.observation(self.error_text(status))

    def _pad(self, ids: Sequence[int]) -> np.ndarray:
        out = np.full((self.max_obs,), self.tokenizer.pad_token_id, np.int32)
        out[: len(ids)] = ids
        return out

    # -- one call -----------------------------------------------------------------------

    def parse(self, ids: Sequence[int]) -> tuple[Callable[[str], str], str] | None:
        """(tool, arguments) of a call's token ids, or None if it cannot be read."""
        if any(t in self._special for t in ids):
            return None
        text = self.tokenizer.decode(list(ids))
        if not text.strip():
            return None
        if self.alphabet is not None and not set(text) <= self.alphabet:
            return None
        if len(self.tools) == 1:
            return next(iter(self.tools.values())), text
        name, sep, args = text.partition(":")
        tool = self.tools.get(name.strip())
        return None if not sep or tool is None else (tool, args.strip())

    def run(self, calls: Sequence[Sequence[int] | None]) -> list[tuple[int, str]]:
        """(status, observation text) of each call's token ids (None: no ``<call>`` opened
        it), the tools of all parsed calls running together under one deadline."""
        parsed = [None if ids is None else self.parse(ids) for ids in calls]
        todo = [p for p in parsed if p is not None]
        answers = iter(self._pool.map(todo, self.timeout))
        out = []
        for p in parsed:
            status, value = (PARSE_ERROR, None) if p is None else next(answers)
            if status == OK and not isinstance(value, str):
                status = TOOL_ERROR
            out.append((status, value) if status == OK else (status, self.error_text(status)))
        return out

    @staticmethod
    def error_text(status: int) -> str:
        return f"error: {STATUS_NAMES[status]}"

    def call(self, ids: Sequence[int] | None) -> tuple[int, list[int]]:
        """(status, observation ids) of one call."""
        status, text = self.run([ids])[0]
        return status, self.observation(text)

    # -- a batched round-trip (called from compiled code) --------------------------------

    def serve(self, response, call_start, rows, end):
        """Answers every row in `rows` whose call closed at position `end` of `response`."""
        response, call_start, rows = map(np.asarray, (response, call_start, rows))
        end = int(end)
        b = response.shape[0]
        tokens = np.full((b, self.max_obs), self.tokenizer.pad_token_id, np.int32)
        length = np.zeros((b,), np.int32)
        status = np.zeros((b,), np.int32)
        self.round_trips += 1
        served = np.flatnonzero(rows)
        calls = []
        for r in served:
            start = int(call_start[r])
            calls.append(None if start < 0 else response[r, start + 1 : end].tolist())
        answers = self.run(calls)
        texts = [text for _, text in answers]
        for r, (code, _), obs in zip(served, answers, self.observations(texts), strict=True):
            status[r] = code
            tokens[r, : len(obs)] = obs
            length[r] = len(obs)
        return tokens, length, status
