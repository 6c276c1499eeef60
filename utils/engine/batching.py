"""Continuous batching for the Thinker: one scheduler thread owns the model, requests join the running decode
batch at the next step and leave it the moment they finish (as vLLM and llama.cpp's server do).

The KV cache is allocated once for `max_batch` slots. The running rows always occupy slots 0..n-1 and share
one write column (`pos`): a decode step writes every row's new key at that column, as
`models.layers.CausalStack.decode_hidden` requires. A row's prompt sits just left of it: a joining request is
prefilled alone (the very computation `utils.engine.generation.generate` does for it, so its first token is the
batch-1 one), then its keys are copied into its slot at columns pos-T..pos-1. Each row has an anchor (its
first column); its positions count from there and its key mask hides everything left of it, so a row's
numbers equal those of decoding it alone (as in `utils.engine.generation.Decoder` with left padding; equal ids up to
the rounding order of the kernels). When a row leaves, the last running row moves into its slot; when a
joining prompt does not fit left of `pos` or the budgets would run past the cache's end, the running rows'
columns are shifted (both happen only when a request arrives or leaves, never per token). The cache holds
2 x ctx_len columns, so every request that fits the context can always be placed.

Sampling is per row (its own temperature, top-k/top-p, seed and generator), so a seeded sampled answer is
the same whatever else runs beside it; greedy rows go through the int8-screened exact argmax on CPU.
"""
from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from models.layers import KVCache
from models.thinker import ThinkerLM
from utils.base.defaults import EOS_ID
from utils.base.errors import EngineClosed, QueueFull
from utils.engine.generation import SamplingOptions, apply_repetition_penalty, check_budget, greedy_head, sample
from utils.engine.native.step import NativeSession, native_model


@dataclass
class RowPrompt:
    """One request ready for the engine: prompt embeddings (T, d), its text ids (for the repetition
    penalty), the sampling options (`max_new_tokens` is this row's budget) and notes for the caller."""
    embeds: torch.Tensor
    ids: list[int]
    opts: SamplingOptions
    notes: list[str] = field(default_factory=list)


class Row:
    """A submitted request: the caller's handle (`cancel()`) and the scheduler's per-row state."""

    def __init__(self, prepare: Callable[[], RowPrompt], on_start: Callable[[RowPrompt], None],
                 on_token: Callable[[int], None], on_finish: Callable[[str, BaseException | None], None]) -> None:
        self.prepare, self.on_start, self.on_token, self.on_finish = prepare, on_start, on_token, on_finish
        self.cancelled = False
        self.opts: SamplingOptions | None = None
        self.generator: torch.Generator | None = None
        self.generated = 0
        self.greedy = True

    def cancel(self) -> None:
        """Free the row at the scheduler's next step (a client went away, a stop string matched)."""
        self.cancelled = True


class BatchEngine:
    """The scheduler: `submit` a request (it waits in a bounded queue), receive its tokens through callbacks
    run on the scheduler thread; `call` runs other model work (encoders, speech, CTC) between steps."""

    def __init__(self, model: ThinkerLM, max_batch: int = 16, max_queue: int = 64,
                 decode_attention: str = "causal", fast_greedy: bool = True, decode_kernel: str = "auto") -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch {max_batch} must be >= 1 and max_queue {max_queue} >= 0")
        self.model, self.max_batch, self.max_queue = model, max_batch, max_queue
        self.reference = decode_attention == "reference"
        self.decode_attention = decode_attention
        p = model.tok_emb.weight
        dev = p.device
        self.device = dev
        S = 2 * model.rotary.max_len  # room for any prompt that fits the context, wherever the column is
        self.cache = model.new_cache(max_batch, S) if not self.reference else None
        self.columns = torch.arange(S, device=dev)
        self.key_mask = torch.zeros(max_batch, 1, 1, S, dtype=torch.bool, device=dev)
        self.anchors = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.tokens = torch.zeros(max_batch, dtype=torch.long, device=dev)
        dk = model.rotary.cos.shape[-1]
        self.cos = torch.zeros(max_batch, dk, dtype=model.rotary.cos.dtype, device=dev)
        self.rot_sin = torch.zeros_like(self.cos)
        self.attn_out = [torch.zeros(max_batch, 1, model.cfg.d_model, dtype=p.dtype, device=dev)
                         for _ in model.blocks] if self.reference else None
        self.seen = torch.zeros(max_batch, model.cfg.vocab_size, dtype=torch.bool, device=dev)
        self.screen = greedy_head(model) if fast_greedy else None
        self.views = {n: self.cache.first_rows(n) for n in range(1, max_batch + 1)} if self.cache else {}
        native, self.kernel = native_model(model, decode_kernel, self.reference, self.screen)
        self.native = NativeSession(native, self.cache.k, self.cache.v) if native is not None else None
        self.pos = 0
        self.rows: list[Row] = []  # running rows; rows[i] is in slot i
        self.admitting = 0  # rows taken from the queue whose prefill is under way
        self.waiting: collections.deque[Row] = collections.deque()
        self.jobs: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future]] = collections.deque()
        self.cond = threading.Condition()
        self.closing = False
        self.deadline: float | None = None
        self.steps = 0
        self.cancelled = 0  # rows freed before finishing (cancel() or shutdown)
        self.shifts = 0  # times the running rows' cache columns were moved to place a joining prompt
        self.thread = threading.Thread(target=self._run, name="omni-scheduler", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------ caller side (any thread)
    @property
    def queued(self) -> int:
        return len(self.waiting)

    @property
    def running(self) -> int:
        """Rows in the batch, counting those being prefilled."""
        return len(self.rows) + self.admitting

    def submit(self, prepare: Callable[[], RowPrompt], on_token: Callable[[int], None],
               on_finish: Callable[[str, BaseException | None], None],
               on_start: Callable[[RowPrompt], None] = lambda prompt: None) -> Row:
        """Queue a request. `prepare()` (run on the scheduler thread when a slot is free) builds its prompt;
        `on_start(prompt)` follows it; then `on_token(id)` per generated id (EOS excluded) and exactly one
        `on_finish(reason, error)`: reason 'stop' (EOS), 'length' (budget), 'cancelled', or 'error' with the
        exception prepare or the model raised. Raises QueueFull past `max_queue` waiting requests."""
        row = Row(prepare, on_start, on_token, on_finish)
        with self.cond:
            if self.closing:
                raise EngineClosed("the server is shutting down")
            free = max(0, self.max_batch - self.running)
            if len(self.waiting) - free >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting (max_queue {self.max_queue})")
            self.waiting.append(row)
            self.cond.notify()
        return row

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run `fn()` on the scheduler thread before its next step; its result or exception in the Future."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self.cond:
            if self.closing:
                raise EngineClosed("the server is shutting down")
            self.jobs.append((fn, fut))
            self.cond.notify()
        return fut

    def close(self, timeout: float = 10.0, wait: bool = True) -> None:
        """Admit nothing more; let running rows finish for up to `timeout` seconds, then cancel them (and
        any request still waiting). With `wait`, return once the scheduler thread has stopped."""
        with self.cond:
            if not self.closing:
                self.closing = True
                self.deadline = time.monotonic() + timeout
            self.cond.notify()
        if wait:
            self.thread.join()

    # ------------------------------------------------------------ scheduler thread
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self.cond:
                    while not (self.rows or self.waiting or self.jobs or self.closing):
                        self.cond.wait()
                    jobs = list(self.jobs)
                    self.jobs.clear()
                    if self.closing:
                        if time.monotonic() >= self.deadline:
                            for row in self.rows:
                                row.cancel()
                        while self.waiting:
                            self._finish(self.waiting.popleft(), "cancelled",
                                         EngineClosed("the server is shutting down"))
                        if not self.rows and not jobs:
                            for fn, fut in self.jobs:
                                fut.set_exception(EngineClosed("the server is shutting down"))
                            return
                    for row in [r for r in self.waiting if r.cancelled]:  # the client left while waiting
                        self.waiting.remove(row)
                        self._finish(row, "cancelled")
                    admit = []
                    while self.waiting and len(self.rows) + len(admit) < self.max_batch:
                        admit.append(self.waiting.popleft())
                    self.admitting = len(admit)
                for fn, fut in jobs:
                    if fut.set_running_or_notify_cancel():
                        try:
                            fut.set_result(fn())
                        except BaseException as exc:  # handed to the caller, who reports it
                            fut.set_exception(exc)
                self._drop_cancelled()
                for row in admit:
                    self._admit(row)
                    self.admitting -= 1
                if self.rows:
                    try:
                        self._step()
                    except Exception as exc:  # a failing model step fails the rows in it, not the scheduler
                        for slot in range(len(self.rows) - 1, -1, -1):
                            row = self.rows[slot]
                            self._release(slot)
                            self._finish(row, "error", exc)

    def _finish(self, row: Row, reason: str, error: BaseException | None = None) -> None:
        self.cancelled += reason == "cancelled"
        try:
            row.on_finish(reason, error)
        except Exception:  # a caller's callback must not take the scheduler down
            pass

    def _emit(self, row: Row, tid: int) -> bool:
        """Deliver one picked id; True when the row is finished by it."""
        if tid == EOS_ID and not row.opts.ignore_eos:
            self._finish(row, "stop")
            return True
        row.generated += 1
        try:
            row.on_token(tid)
        except Exception:  # the caller is gone (e.g. its event loop closed): free the row
            row.cancel()
        if row.generated >= row.opts.max_new_tokens:
            self._finish(row, "length")
            return True
        return False

    def _drop_cancelled(self) -> None:
        for slot in range(len(self.rows) - 1, -1, -1):
            if self.rows[slot].cancelled:
                row = self.rows[slot]
                self._release(slot)
                self._finish(row, "cancelled")

    def _release(self, slot: int) -> None:
        """Free `slot`, moving the last running row into it so the running rows stay in slots 0..n-1."""
        last = len(self.rows) - 1
        if slot != last:
            if self.cache is not None:
                lo = int(self.anchors[last])
                self.cache.k[:, slot, :, lo:self.pos] = self.cache.k[:, last, :, lo:self.pos]
                self.cache.v[:, slot, :, lo:self.pos] = self.cache.v[:, last, :, lo:self.pos]
            for buf in (self.key_mask, self.anchors, self.tokens, self.seen, *(self.attn_out or [])):
                buf[slot] = buf[last]
            self.rows[slot] = self.rows[last]
        self.rows.pop()
        if not self.rows:
            self.pos = 0

    def _admit(self, row: Row) -> None:
        if row.cancelled:
            self._finish(row, "cancelled")
            return
        try:
            prompt = row.prepare()
            T = prompt.embeds.shape[0]
            check_budget(self.model, T, prompt.opts.max_new_tokens, prompt.opts)
            if prompt.opts.decode_attention != self.decode_attention:
                raise ValueError(f"this engine decodes with decode_attention {self.decode_attention!r}")
            row.on_start(prompt)
            row.opts = prompt.opts
            row.greedy = prompt.opts.temperature <= 0 and prompt.opts.repetition_penalty == 1.0
            row.generator = (torch.Generator(device=self.device).manual_seed(prompt.opts.seed)
                             if prompt.opts.seed is not None else None)
            slot = len(self.rows)
            self.seen[slot] = False
            if prompt.opts.repetition_penalty != 1.0:
                ids = [i for i in prompt.ids if 0 <= i < self.seen.shape[1]]
                if ids:
                    self.seen[slot, torch.tensor(ids, device=self.device)] = True
            # the prefill generate() does for this prompt alone (batch 1, no padding, causal attention)
            small = self.model.new_cache(1, T)
            embeds = prompt.embeds.to(self.device)
            if self.native is not None:
                logits = NativeSession(self.native.native, small.k, small.v, T).prefill(embeds, 0, 0, greedy=False)
            else:
                logits = self.model.head(self.model.hidden(embeds[None], 0, small, last_only=True))
            first = self._pick_one(row, slot, logits)
            if self._emit(row, first):
                return
            if not self._place(row, slot, T, small):
                raise RuntimeError("no room in the KV cache")  # cannot happen: the cache holds 2 x ctx_len
            self.tokens[slot] = first
        except BaseException as exc:  # bad input or a failing model: this request fails, the others go on
            self._finish(row, "error", exc)

    def _place(self, row: Row, slot: int, T: int, small: KVCache) -> bool:
        """Copy a prefilled prompt into `slot` (columns pos-T..pos-1), shifting the running rows if needed."""
        if self.reference:
            anchors = torch.zeros(1, dtype=torch.long, device=self.device)
            for buf, out in zip(self.attn_out, self.model.reference_attention(small, anchors)):
                buf[slot] = out[0]
            self.rows.append(row)
            return True
        S = self.cache.max_len
        n = len(self.rows)
        # writes each row still needs, counted from column pos (the joining row: its max_new - 1 steps)
        need = max([r.opts.max_new_tokens - r.generated for r in self.rows] + [row.opts.max_new_tokens - 1])
        if n == 0:
            self.pos = T
        elif self.pos < T or self.pos + need > S:
            span = max(self.pos - int(a) for a in self.anchors[:n].tolist())
            target = max(T, span)
            if target + need > S:
                return False
            delta = target - self.pos
            lo = self.pos - span
            for buf in (self.cache.k, self.cache.v):
                buf[:, :n, :, lo + delta:self.pos + delta] = buf[:, :n, :, lo:self.pos].clone()
            self.anchors[:n] += delta
            self.key_mask[:n, 0, 0] = self.columns[None] >= self.anchors[:n, None]
            self.pos = target
            self.shifts += 1
        anchor = self.pos - T
        self.cache.k[:, slot, :, anchor:self.pos] = small.k[:, 0]
        self.cache.v[:, slot, :, anchor:self.pos] = small.v[:, 0]
        self.anchors[slot] = anchor
        self.key_mask[slot, 0, 0] = self.columns >= anchor
        self.rows.append(row)
        return True

    def _pick_one(self, row: Row, slot: int, logits: torch.Tensor) -> int:
        """The next id of one row from its logits (1, V), as utils.engine.generation.Picker picks for batch 1."""
        opts = row.opts
        if opts.repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, self.seen[slot:slot + 1], opts.repetition_penalty)
        return int(sample(logits, opts, row.generator)[0])

    def _step(self) -> None:
        """One decode step for every running row: feed its last id, pick its next one, emit, free the done."""
        n = len(self.rows)
        tokens = self.tokens[:n]
        if any(r.opts.repetition_penalty != 1.0 for r in self.rows):
            self.seen[torch.arange(n, device=self.device), tokens] = True
        greedy = [r.greedy for r in self.rows]
        if self.native is not None:  # the C step (utils.engine.native.step): same rows, positions and masks
            out = self.native.step(tokens, self.pos, self.anchors[:n], all(greedy))
            self.pos += 1
            self.steps += 1
            self._deliver(out.tolist() if all(greedy) else self._pick_rows(out, greedy))
            return
        x = self.model.embed_step(tokens)
        if self.reference:
            h = self.model.decode_hidden(x, 0, None, None, None, None, [a[:n] for a in self.attn_out])
        else:
            pos = self.pos
            torch.sub(pos, self.anchors[:n], out=self.positions[:n])
            torch.index_select(self.model.rotary.cos, 0, self.positions[:n], out=self.cos[:n])
            torch.index_select(self.model.rotary.rot_sin, 0, self.positions[:n], out=self.rot_sin[:n])
            dk = self.cos.shape[-1]
            h = self.model.decode_hidden(x, pos, self.views[n], self.cos[:n].view(n, 1, dk),
                                         self.rot_sin[:n].view(n, 1, dk), self.key_mask[:n, :, :, :pos + 1])
            self.pos += 1
        self.steps += 1
        if all(greedy):
            ids = self.screen.argmax(h, self._full_argmax) if self.screen is not None else self._full_argmax(h)
            self._deliver(ids.tolist())  # the one host sync per step
        else:
            self._deliver(self._pick_rows(self.model.head(h), greedy))

    def _pick_rows(self, logits: torch.Tensor, greedy: list[bool]) -> list[int]:
        """Each row's next id from the step's logits (n, V): argmax for greedy rows, its own sampling else."""
        picked = logits.argmax(-1).tolist()
        for b, row in enumerate(self.rows):
            if not greedy[b]:
                picked[b] = self._pick_one(row, b, logits[b:b + 1])
        return picked

    def _deliver(self, picked: list[int]) -> None:
        """Emit each running row's picked id; free the rows that finished or were cancelled."""
        done = []  # (slot, cancelled)
        for b, (row, tid) in enumerate(zip(self.rows, picked)):
            if row.cancelled:
                done.append((b, True))
            elif self._emit(row, tid):
                done.append((b, False))
            else:
                self.tokens[b] = tid
        for b, cancelled in reversed(done):
            row = self.rows[b]
            self._release(b)
            if cancelled:
                self._finish(row, "cancelled")

    def _full_argmax(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.head(h).argmax(-1)
