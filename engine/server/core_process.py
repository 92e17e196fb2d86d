"""The engine core process: load the model, then step, with input applied between steps.

No web dependency and no asyncio: a plain loop over a pipe. While requests are in flight
it only polls the pipe (never blocks) between steps; when idle it blocks on it. Everything
a step produced goes back as ONE message. Aborts arrive as messages and are applied before
the next step, so a disconnected client's blocks are freed within one step.
"""

from __future__ import annotations

import gc
import logging
import signal
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from engine.config import EngineConfig
from engine.core import EngineCore, InvalidRequestError, RequestDelta
from engine.request import FinishReason
from engine.server import ipc
from engine.server.protocol import LoadSnapshot, TokenLogprob, to_wire
from engine.server.tokenizer import load_tokenizer
from engine.step_log import StepLog
from engine.warmup import warm_up

log = logging.getLogger("prefixgate.engine.core")

# With nothing to do, wake this often anyway: a dead parent shows up as EOF on the pipe.
_IDLE_POLL_S = 1.0
# The core stamps `alive` this often from a thread of its own: the API process reads the
# stamp to tell a stopped or wedged process from a long step (torch ops release the GIL).
ALIVE_INTERVAL_S = 0.5


def _stamp_alive(alive: Any) -> None:
    while True:
        alive.value = time.monotonic()
        time.sleep(ALIVE_INTERVAL_S)


@dataclass(frozen=True, slots=True)
class CoreProcessConfig:
    engine: EngineConfig
    model_folder: str
    log_level: str = "info"
    step_log: str | None = None  # engine/step_log.py


def run_core_process(
    config: CoreProcessConfig, inbox: Connection, outbox: Connection, alive: Any = None
) -> None:
    """Entry point of the spawned process. `alive`: a shared double (multiprocessing.Value)
    this process keeps stamping with time.monotonic() (system-wide on Linux)."""
    if alive is not None:
        threading.Thread(target=_stamp_alive, args=(alive,), name="core-alive", daemon=True).start()
    # Ctrl-C, or a supervisor's SIGTERM, reaches the whole process group. The API process
    # drains first and then sends Shutdown; the core stops then, or on EOF if its parent dies.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s [core] %(name)s: %(message)s"
    )
    started = time.perf_counter()
    try:
        core = _build_core(config)
        warm_up(core)
    except Exception as err:  # anything at all: the API process must learn why we are gone
        log.exception("engine core failed to start")
        outbox.send_bytes(ipc.encode(ipc.StartFailed(f"{type(err).__name__}: {err}")))
        return
    if config.step_log is not None:
        core.step_log = StepLog(config.step_log)  # after the warm-up: only served steps
    # The model, torch and the warm-up's survivors out of the cyclic collector's sight: a full
    # collection over them (~340k objects, 156 ms on a 2-core machine with a small model)
    # would stall the step loop, and every request in it, mid-stream (vLLM freezes too).
    gc.collect()
    gc.freeze()
    loop = CoreLoop(core, inbox, outbox)
    outbox.send_bytes(
        ipc.encode(
            ipc.Ready(
                model_id=core.model_id,
                max_model_len=core.max_model_len,
                num_blocks=core.num_blocks,
                block_size=core.block_size,
                vocab_size=core.model_config.vocab_size,
                description=core.describe(),
                load_seconds=time.perf_counter() - started,
            )
        )
    )
    log.info("ready: %s", core.describe())
    try:
        loop.run()
    except (EOFError, BrokenPipeError, ConnectionResetError):
        log.info("the API process went away; stopping")
    finally:
        if core.step_log is not None:
            core.step_log.close()


def _build_core(config: CoreProcessConfig) -> EngineCore:
    from engine.weights import load_model

    engine = config.engine
    device = engine.torch_device()
    loaded = load_model(
        Path(config.model_folder),
        dtype=engine.torch_dtype(device),
        device=device,
        random_weights=engine.load_format == "dummy",
    )
    return EngineCore(engine, loaded, load_tokenizer(Path(config.model_folder)))


class CoreLoop:
    def __init__(self, core: EngineCore, inbox: Connection, outbox: Connection) -> None:
        self.core = core
        self.inbox = inbox
        self.outbox = outbox
        self._stopping = False
        self._dirty = False  # state changed since the last message: a fresh load must go out

    def run(self) -> None:
        self._flush([], 0.0, force=True)  # the first load snapshot, before any request
        while not self._stopping:
            if not self.core.has_unfinished:
                self.inbox.poll(_IDLE_POLL_S)
            while not self._stopping and self.inbox.poll(0):
                self._handle(ipc.decode_to_core(self.inbox.recv_bytes()))
            if self._stopping:
                break
            deltas: list[ipc.Delta] = []
            seconds = 0.0
            if self.core.has_unfinished:
                started = time.perf_counter()
                deltas = self._step()
                seconds = time.perf_counter() - started
            self._flush(deltas, seconds)
        for request_id in self._request_ids():
            self.core.abort(request_id)

    # -- input -------------------------------------------------------------------------
    def _handle(self, message: ipc.ToCore) -> None:
        if isinstance(message, ipc.AddRequests):
            for new in message.requests:
                self._add(new)
        elif isinstance(message, ipc.AbortRequests):
            for request_id in message.request_ids:
                self.core.abort(request_id)
            self._dirty = True
        elif isinstance(message, ipc.SnapshotCache):
            # Events drained so far go out first: the snapshot then covers exactly what the
            # API side has seen up to its seq, and every later event comes after it.
            self._flush([], 0.0, force=True)
            tree = self.core.tree
            hashes = sorted(tree.cached_block_hashes()) if tree is not None else []
            self._send(ipc.CacheSnapshotReply(message.token, self.core.events.last_seq, hashes))
        elif isinstance(message, ipc.InspectState):
            self._flush([], 0.0, force=True)
            self._send(self._state(message.token))
        elif isinstance(message, ipc.Shutdown):
            self._stopping = True

    def _add(self, new: ipc.NewRequest) -> None:
        try:
            self.core.add_request(
                new.prompt_token_ids, new.params, new.request_id, new.cache_salt, detokenize=new.detokenize
            )
        except (InvalidRequestError, ValueError) as err:
            self._send(ipc.Rejected(new.request_id, str(err)))
        self._dirty = True

    def _state(self, token: int) -> ipc.StateReply:
        scheduler = self.core.scheduler
        try:
            self.core.check_integrity()
            problem = None
        except AssertionError as err:
            problem = f"{type(err).__name__}: {err}"
        tree = self.core.tree
        return ipc.StateReply(
            token=token,
            running=[r.request_id for r in scheduler.running],
            waiting=[r.request_id for r in scheduler.waiting],
            load=self._load(),
            cached_block_hashes=sorted(tree.cached_block_hashes()) if tree is not None else [],
            last_seq=self.core.events.last_seq,
            integrity_error=problem,
        )

    # -- the step ----------------------------------------------------------------------
    def _step(self) -> list[ipc.Delta]:
        try:
            return [_delta(d) for d in self.core.step()]
        except Exception:
            # A bug, not the user's doing; fail the requests in flight rather than the replica.
            # If even aborting them fails, the exception ends the process and the API side
            # reports the replica as down.
            log.exception("engine step failed; aborting every request in flight")
            failed = []
            for request_id in self._request_ids():
                self.core.abort(request_id)
                failed.append(ipc.Delta(request_id, [], "", None, FinishReason.ABORT.value, None, 0, 0, None))
            return failed

    def _request_ids(self) -> list[str]:
        scheduler = self.core.scheduler
        return [r.request_id for r in [*scheduler.running, *scheduler.waiting]]

    # -- output ------------------------------------------------------------------------
    def _flush(self, deltas: list[ipc.Delta], seconds: float, force: bool = False) -> None:
        events = [to_wire(seq, event) for seq, event in self.core.drain_kv_events()]
        if deltas or events or self._dirty or force or seconds:
            self._send(ipc.StepOutput(deltas, events, self._load(), seconds))
            self._dirty = False

    def _send(self, message: ipc.FromCore) -> None:
        self.outbox.send_bytes(ipc.encode(message))

    def _load(self) -> LoadSnapshot:
        core = self.core
        scheduler = core.scheduler
        evictable = core.tree.num_evictable_blocks if core.tree is not None else 0
        used = core.num_blocks - core.pool.num_free - evictable
        return LoadSnapshot(
            running=len(scheduler.running),
            waiting=len(scheduler.waiting),
            num_blocks=core.num_blocks,
            free_blocks=core.pool.num_free,
            cached_blocks=core.tree.num_cached_blocks if core.tree is not None else 0,
            used_blocks=used,
            kv_usage=used / core.num_blocks,
            num_preemptions=scheduler.num_preemptions,
            prompt_tokens_admitted=scheduler.prompt_tokens_admitted,
            cached_tokens_admitted=scheduler.cached_tokens_admitted,
            steps=core.stats.steps,
            kv_events_dropped=core.events.dropped,
        )


def _delta(delta: RequestDelta) -> ipc.Delta:
    request = delta.request
    logprobs = None
    if request.params.logprobs is not None and request.logprobs:
        last = request.logprobs[-1]
        logprobs = [TokenLogprob(last.token_id, last.logprob, list(last.top))]
    first = request.num_output_tokens == 1
    return ipc.Delta(
        request.request_id,
        list(delta.new_token_ids),
        delta.new_text,
        logprobs,
        None if request.finish_reason is None else request.finish_reason.value,
        request.stop_reason,
        request.num_prompt_tokens,
        max(request.num_cached_tokens, 0),
        request.times.queue_time if first else None,
        request.times.prefill_chunks if first else None,
    )
