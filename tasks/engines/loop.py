"""The engine loop: one thread drives vLLM and keeps its batch full across shard boundaries."""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from tasks.config import SamplingConfig, SpecError
from tasks.engines.base import EngineRestarted


@dataclass(frozen=True)
class EngineCounts:
    """What the process's engine has finished so far, how many requests it holds now, and whether it is being built."""

    answered: int = 0
    failed: int = 0  # requests vLLM rejected on their own, and those that never reached it (prompt too long)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    running: int = 0
    starting: bool = False  # loading or restarting: no Prefect calls meanwhile (see Progress in tasks/inference/tasks.py)


class RequestCounters:
    """Requests the process's engine finished, and their tokens, for progress and metrics.

    Plain integers added to by the loop thread alone, per finished request: no lock, so counting
    costs the loop nothing it would wait on. Readers take a copy every second or so and may be a
    request behind."""

    def __init__(self) -> None:
        self.answered = self.failed = self.prompt_tokens = self.generated_tokens = 0

    def read(self, running: int = 0, starting: bool = False) -> EngineCounts:
        return EngineCounts(self.answered, self.failed, self.prompt_tokens, self.generated_tokens, running, starting)


# The process's counters: every engine loop of the process (a restarted or replaced engine's too) adds to them.
request_counters = RequestCounters()


@dataclass
class PendingRequest:
    request_key: str
    token_ids: list[int]
    sampling: SamplingConfig


class Submission:
    """One generate call's requests in the engine loop; done once every request has its outcome."""

    def __init__(self, pending: list[PendingRequest], params: list, lora_request, shared_sampling: bool):
        self.pending, self.params, self.lora_request = pending, params, lora_request
        self.shared_sampling = shared_sampling  # every request has the run's sampling: a rejection is the run's fault
        self.outcomes: list = [None] * len(pending)  # RequestOutput, or the exception that rejected the request
        self.remaining = len(pending)
        self.engine_seconds = 0.0  # engine wall time spent while this was the oldest unfinished submission
        self.error: BaseException | None = None
        self.done = threading.Event()

    def settle(self, index: int, outcome) -> None:
        self.outcomes[index] = outcome
        self.remaining -= 1
        if self.remaining == 0:
            self.done.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.done.set()

    def wait(self) -> list:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.outcomes


def not_an_engine_death(error: BaseException) -> None:
    return None


class EngineLoop:
    """The one thread that drives vLLM: it adds each shard's requests as they come and steps the
    engine without pause, so the running batch stays full across shard boundaries instead of
    draining at the end of every generate call. Each shard waits only for its own requests.

    A shard is admitted while fewer than `admit_below` requests are unfinished (two full batches):
    the next shard queues behind the running one, and shards still finish roughly in order. vLLM
    itself holds at most `admit_below` requests at a time (the rest wait here), so an engine that
    dies loses at most that many. `restart(error)` returns a new engine when the error was the
    engine's death (or raises when it cannot, failing every waiting shard), and None when the error
    was not a death; the requests the dead engine held go to the new one, settled ones stay settled.
    """

    def __init__(self, llm, admit_below: int, restart: Callable[[BaseException], object] = not_an_engine_death):
        self.llm = llm
        self.admit_below = admit_below
        self.restart = restart
        self.inbox: queue.Queue[Submission | None] = queue.Queue()
        self.waiting: deque[tuple[Submission, int]] = deque()  # admitted requests not yet handed to vLLM
        self.owner: dict[str, tuple[Submission, int]] = {}  # vLLM request id -> (submission, index)
        self.unfinished: list[Submission] = []  # oldest first
        self.room = threading.Condition()
        self.queued = 0  # requests submitted and not finished
        self.stopped = False
        self.serial = itertools.count()
        self.sent = 0  # requests handed to vLLM, resent ones included
        self.resent = 0  # requests handed again to a new engine after the one holding them died
        self.settled = 0  # requests that have their outcome
        self.step_started: float | None = None  # monotonic time the running step began; None between steps
        self.thread = threading.Thread(target=self.run, name="vllm-engine-loop", daemon=True)
        self.thread.start()

    def submit(self, submission: Submission) -> Submission:
        with self.room:
            self.room.wait_for(lambda: self.stopped or self.queued < self.admit_below)
            if self.stopped:
                raise EngineRestarted("the engine was closed while this shard waited")
            self.queued += len(submission.pending)
            self.inbox.put(submission)  # under the lock: a stopping loop sees it in its last look at the inbox
        return submission

    def stop(self) -> None:
        self.inbox.put(None)
        self.thread.join(timeout=60)

    def run(self) -> None:
        try:
            self.drive()
        except BaseException as error:  # the engine died for good, or this loop broke: no shard may wait forever
            self.fail_unfinished(error, [])

    def drive(self) -> None:
        last_step = time.perf_counter()
        while True:
            arrived = self.take_arrivals(wait=not self.owner and not self.waiting)
            if None in arrived:
                self.fail_unfinished(EngineRestarted("the engine was closed while this shard waited"), arrived)
                return
            if not self.owner:
                last_step = time.perf_counter()  # idle until now: that time is nobody's
            for submission in arrived:
                self.unfinished.append(submission)
                self.waiting.extend((submission, index) for index in range(len(submission.pending)))
            self.hand_over()
            if not self.owner:
                continue
            try:
                self.step_started = time.monotonic()
                outputs = self.llm.llm_engine.step()
            except Exception as error:
                self.step_started = None  # a restart is no step: the watchdog must not time it
                if not self.replace_engine(error):
                    raise
                continue
            self.step_started = None
            now = time.perf_counter()
            if self.unfinished:
                self.unfinished[0].engine_seconds += now - last_step
            last_step = now
            for output in outputs:
                owner = self.owner.pop(output.request_id, None) if output.finished else None
                if owner is not None:
                    self.settle(*owner, output)

    def replace_engine(self, error: BaseException) -> bool:
        """If the engine died (or hung): a new one gets the requests the dead one held, first in line."""
        llm = self.restart(error)  # raises when it cannot: run() fails every waiting shard with that
        if llm is None:
            return False
        lost = list(self.owner.values())
        self.owner.clear()
        self.llm = llm
        self.waiting.extendleft(reversed(lost))
        self.resent += len(lost)
        return True

    def take_arrivals(self, wait: bool) -> list[Submission | None]:
        arrived = [self.inbox.get()] if wait else []
        while True:
            try:
                arrived.append(self.inbox.get_nowait())
            except queue.Empty:
                return arrived

    def hand_over(self) -> None:
        """Give vLLM waiting requests until it holds admit_below; a request vLLM rejects is settled with the error."""
        from vllm.exceptions import VLLMValidationError
        from vllm.sampling_params import RequestOutputKind

        while self.waiting and len(self.owner) < self.admit_below:
            submission, index = self.waiting.popleft()
            if submission.done.is_set():  # rejected as a whole while its other requests waited
                continue
            params = submission.params[index]
            params.output_kind = RequestOutputKind.FINAL_ONLY  # the finished output only, as LLM.generate asks
            request_id = f"request-{next(self.serial)}"
            try:
                self.llm.llm_engine.add_request(
                    request_id,
                    {"prompt_token_ids": submission.pending[index].token_ids},
                    params,
                    lora_request=submission.lora_request,
                )
            except VLLMValidationError as error:
                if submission.shared_sampling:  # every request has the run's sampling: the run's configuration is at fault
                    self.reject(submission, SpecError(f"sampling parameters rejected by vLLM: {error}"))
                else:
                    self.settle(submission, index, error)  # a row's own parameters are at fault: the others run
                continue
            except Exception as error:
                if self.replace_engine(error):  # it died: this request waits for the new engine
                    self.waiting.appendleft((submission, index))
                else:
                    self.reject(submission, error)
                continue
            self.sent += 1
            self.owner[request_id] = (submission, index)

    def settle(self, submission: Submission, index: int, outcome) -> None:
        submission.settle(index, outcome)
        self.settled += 1
        if isinstance(outcome, BaseException):
            request_counters.failed += 1
        else:
            request_counters.answered += 1
            request_counters.prompt_tokens += len(submission.pending[index].token_ids)
            request_counters.generated_tokens += sum(len(completion.token_ids) for completion in outcome.outputs)
        self.release(1)
        if submission.done.is_set():
            self.unfinished.remove(submission)

    def reject(self, submission: Submission, error: BaseException) -> None:
        """Fail the whole submission: its requests still in vLLM are aborted, those waiting are skipped."""
        mine = [request_id for request_id, (owner, _) in self.owner.items() if owner is submission]
        if mine:
            self.llm.llm_engine.abort_request(mine)
            for request_id in mine:
                del self.owner[request_id]
        submission.fail(error)
        if submission in self.unfinished:
            self.unfinished.remove(submission)
        self.release(submission.remaining)

    def fail_unfinished(self, error: BaseException, arrived: list[Submission | None]) -> None:
        """The loop ends: fail every submission it holds or that is still in the inbox."""
        with self.room:
            self.stopped = True
            arrived = [*arrived, *self.take_arrivals(wait=False)]
            for submission in [*self.unfinished, *(s for s in arrived if s is not None)]:
                submission.fail(error)
            self.owner.clear()
            self.waiting.clear()
            self.unfinished.clear()
            self.queued = 0
            self.room.notify_all()

    def release(self, requests: int) -> None:
        with self.room:
            self.queued -= requests
            # Called per finished request: waking every waiting shard each time costs a core's worth of wake-ups.
            if self.queued < self.admit_below:
                self.room.notify_all()
