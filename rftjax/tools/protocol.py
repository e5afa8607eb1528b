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
* ``timeout``: the tool did not answer within ``timeout`` seconds;
* ``limit``: the row already made ``max_turns`` calls (the row is then aborted).
"""

from __future__ import annotations

import dataclasses
import queue
import threading
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


class _Worker:
    """Runs calls on daemon threads with a deadline; a call that overruns is abandoned with its
    thread (a Python thread cannot be killed), and a fresh thread takes the next calls."""

    def __init__(self) -> None:
        self._jobs: queue.Queue | None = None

    def _start(self) -> queue.Queue:
        jobs: queue.Queue = queue.Queue()

        def loop():
            while True:
                fn, arg, box, done = jobs.get()
                try:
                    box.append((True, fn(arg)))
                except Exception as e:  # noqa: BLE001 - any tool failure is an observation
                    box.append((False, e))
                done.set()

        threading.Thread(target=loop, daemon=True).start()
        return jobs

    def run(self, fn: Callable[[str], str], arg: str, timeout: float | None):
        """(status, value): (OK, result) | (TOOL_ERROR, exception) | (TIMEOUT, None)."""
        if timeout is None:
            try:
                return OK, fn(arg)
            except Exception as e:  # noqa: BLE001
                return TOOL_ERROR, e
        if self._jobs is None:
            self._jobs = self._start()
        box: list = []
        done = threading.Event()
        self._jobs.put((fn, arg, box, done))
        if not done.wait(timeout):
            self._jobs = None  # that thread is stuck with the call; later calls get a new one
            return TIMEOUT, None
        ok, value = box[0]
        return (OK, value) if ok else (TOOL_ERROR, value)


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
      timeout: seconds a call may take (None: run inline, no deadline).
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
        self._worker = _Worker()
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
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: self.max_obs - 2]
        return [self.result_start, *ids, self.result_end]

    def error(self, status: int) -> list[int]:
        return self.observation(f"error: {STATUS_NAMES[status]}")

    def _pad(self, ids: Sequence[int]) -> np.ndarray:
        out = np.full((self.max_obs,), self.tokenizer.pad_token_id, np.int32)
        out[: len(ids)] = ids
        return out

    # -- one call -----------------------------------------------------------------------

    def parse(self, ids: Sequence[int]) -> tuple[Callable[[str], str], str] | None:
        """(tool, arguments) of a call's token ids, or None if it cannot be read."""
        if any(t in self.tokenizer.all_special_ids for t in ids):
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

    def call(self, ids: Sequence[int] | None) -> tuple[int, list[int]]:
        """(status, observation ids) of one call; ids None: no ``<call>`` opened it."""
        parsed = None if ids is None else self.parse(ids)
        if parsed is None:
            return PARSE_ERROR, self.error(PARSE_ERROR)
        status, value = self._worker.run(parsed[0], parsed[1], self.timeout)
        if status == OK and not isinstance(value, str):
            status = TOOL_ERROR
        if status != OK:
            return status, self.error(status)
        return OK, self.observation(value)

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
        for r in np.flatnonzero(rows):
            start = int(call_start[r])
            ids = None if start < 0 else response[r, start + 1 : end].tolist()
            status[r], obs = self.call(ids)
            tokens[r] = self._pad(obs)
            length[r] = len(obs)
        return tokens, length, status
