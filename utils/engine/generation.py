"""The one decode engine. Every generation runs on it: `OmniModel.answer` / `stream` (a batch of one),
`answer_batch`, --batch_file and batch.py (rows submitted together), the server (rows as requests arrive).

Layers, each usable on its own:
- `Slots`: the KV cache of up to `capacity` rows and how rows sit in it. The occupied rows are slots 0..n-1 and
  share one write column (`pos`): a decode step writes every row's new key there, as
  `models.layers.CausalStack.decode_hidden` requires. A row's prompt sits just left of it; its anchor (first
  column) is where its positions count from 0, and its key mask hides every column left of it, so a row's
  numbers are those of decoding it alone. A joining prompt that does not fit left of `pos`, or budgets that
  would run past the cache's end, shift the rows' columns; a leaving row's slot takes the last row (both only
  when a row joins or leaves, never per token). `step` runs one decode step for every occupied row, in C where
  `native_model` allows (the ONE place that chooses the step; `kernel` says which and why), else in torch.
- `Scheduler`: rows join and leave at step boundaries, each with its own options, generator (seed), penalty
  state (the ids seen, the counts of the ids generated) and logit bias, so a row's ids never depend on its
  neighbours; the `n` choices of one request are prefilled once, the prompt's cache copied to their slots.
  Synchronous: `add`, then `admit` / `decode` (or `step`, `run`) drive it, so tests step it deterministically.
- `generate` (one row, streamed) and `generate_batch` (rows together): a Scheduler sized for their rows (rows x
  (longest prompt + largest budget)), rows admitted longest prompt first so no shift is needed.
- `EngineThread`: the same Scheduler in a thread for the server (`submit`, `call`, `close`).

Decode attention: "causal" (the default) attends to every earlier position, as the models were trained.
"reference" reproduces a defect of the reference μOmni implementation, kept only to compare with old outputs:
every generated token attends to its sequence's first position only (spec §4). Softmax over a single score is
exactly 1, so that attention sub-layer returns the first key's value whatever the query: it is computed once
after the prefill and reused (bit-identical to running the masked attention, with no KV cache at all).

Speed: the cache, masks and rotary rows are allocated once per engine; a prefill runs each row's prompt alone
(batch 1, positions from 0, the very computation a batch of one does), and the one host sync per step reads the
picked ids. Greedy steps on CPU read the vocabulary projection as int8 and rescore the few candidates exactly
(utils.engine.sampling.greedy_head). The C step (utils.engine.native.step) runs each prefill and each step in one
call for the whole batch, writing the cache in place; the torch step runs on (B, d) rows (models.layers
Block.decode), its fused weight copies refreshed when an empty batch starts, so a weight change between
generations is seen.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Union

import torch

from models.layers import CausalStack, refresh_fused
from models.thinker import ThinkerLM
from utils.base.defaults import DECODE_ATTENTION, EOS_ID, MAX_SEED
from utils.base.errors import EngineClosed, QueueFull
from utils.base.options import SamplingOptions
from utils.engine.constrain import Constraint
from utils.engine.native.step import NativeSession, native_model
from utils.engine.sampling import (TokenLogprobs, apply_count_penalties, apply_logit_bias, apply_repetition_penalty,
                                   bias_tensors, greedy_head, greedy_screen, sample, token_logprobs)
from utils.weights.quant import GreedyHead


def check_budget(model: CausalStack, prompt_len: int, max_new_tokens: int, opts: SamplingOptions) -> None:
    """Programming errors (the API validates user input earlier): bad mode, or a prompt that cannot fit."""
    if opts.decode_attention not in DECODE_ATTENTION:
        raise ValueError(f"decode_attention {opts.decode_attention!r}: use one of {', '.join(DECODE_ATTENTION)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens {max_new_tokens}: must be >= 1")
    if prompt_len < 1:
        raise ValueError("generation needs a prompt of at least one position")
    if prompt_len + max_new_tokens > model.rotary.max_len:
        raise ValueError(f"prompt of {prompt_len} positions + max_new_tokens {max_new_tokens} exceeds the "
                         f"context of {model.rotary.max_len}")


def inference(method: Callable) -> Callable:
    """torch.inference_mode() around `method`, entered only where it is not on already: the per-step methods
    run inside loops that hold it (generate, EngineThread), and entering it costs microseconds a call, a
    fraction of a small model's step."""
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if torch.is_inference_mode_enabled():
            return method(*args, **kwargs)
        with torch.inference_mode():
            return method(*args, **kwargs)
    return wrapper


class Slots:
    """The KV slots of up to `capacity` rows over `columns` cache columns, for any `CausalStack` (the Thinker:
    token ids in, logits out; the Talker: code frames in, a pair of logits out). `longest`: the longest prompt a
    prefill takes (default `columns`). `screen`: the int8-screened greedy argmax greedy steps use. Per-row
    buffers of a caller (`track`) move with their row when a slot is freed."""

    def __init__(self, model: CausalStack, capacity: int, columns: int, opts: SamplingOptions,
                 screen: GreedyHead | None = None, longest: int | None = None) -> None:
        if opts.decode_attention not in DECODE_ATTENTION:
            raise ValueError(f"decode_attention {opts.decode_attention!r}: use one of {', '.join(DECODE_ATTENTION)}")
        if capacity < 1 or columns < 1:
            raise ValueError(f"capacity {capacity} and columns {columns} must be >= 1")
        _, _, _, p = model.cache_spec()
        dev = p.device
        self.model, self.capacity, self.columns = model, capacity, columns
        self.longest = min(longest or columns, columns)
        self.reference = opts.decode_attention == "reference"
        self.cache = None if self.reference else model.new_cache(capacity, columns)
        self.views = {n: self.cache.first_rows(n) for n in range(1, capacity + 1)} if self.cache else {}
        self.column_ids = torch.arange(columns, device=dev)
        self.key_mask = torch.zeros(capacity, 1, 1, columns, dtype=torch.bool, device=dev)
        self.anchors = torch.zeros(capacity, dtype=torch.long, device=dev)
        self.positions = torch.zeros(capacity, dtype=torch.long, device=dev)
        rot = model.rotary
        self.cos = torch.zeros(capacity, rot.cos.shape[-1], dtype=rot.cos.dtype, device=dev)
        self.rot_sin = torch.zeros_like(self.cos)
        self.attn_out = [torch.zeros(capacity, 1, p.shape[0], dtype=p.dtype, device=dev)
                         for _ in model.blocks] if self.reference else None
        self.zero = torch.zeros(1, dtype=torch.long, device=dev)
        self.screen = screen
        native, self.kernel = native_model(model, opts.decode_kernel, self.reference, screen)
        self.native = NativeSession(native, self.cache.k, self.cache.v, self.longest) if native is not None else None
        self.scratch = model.new_cache(1, self.longest) if self.native is None else None  # torch prefills
        self.moved: list[torch.Tensor] = [self.key_mask, self.anchors, *(self.attn_out or [])]
        self.first: list[int] = []  # each occupied slot's anchor, on the host
        self.needs: list[int] = []  # the cache writes (decode steps) each occupied slot may still make
        self.pos = 0  # the cache column the next step writes
        self.fresh = False  # the torch step's fused weight copies are refreshed when an empty batch starts
        self.steps = 0
        self.shifts = 0  # times the occupied rows' columns were moved to place a joining prompt

    @property
    def n(self) -> int:
        """Occupied slots (0..n-1)."""
        return len(self.first)

    def track(self, buf: torch.Tensor) -> None:
        """Move `buf[slot]` (a caller's per-row state, first dimension `capacity`) with its row."""
        self.moved.append(buf)

    def place(self, prompt_len: int, writes: int) -> int:
        """Reserve the next slot for a prompt of `prompt_len` positions followed by `writes` decode steps, at
        columns pos - prompt_len .. pos - 1, shifting the occupied rows if they must make room. Returns it."""
        n = self.n
        if n == self.capacity:
            raise RuntimeError(f"all {self.capacity} slots are occupied")
        if prompt_len > self.longest:
            raise ValueError(f"a prompt of {prompt_len} positions: this engine prefills at most {self.longest}")
        anchor = 0
        if not self.reference:
            S = self.columns
            need = max(self.needs + [writes])
            if n == 0:
                self.pos = prompt_len
            elif self.pos < prompt_len or self.pos + need > S:
                span = max(self.pos - a for a in self.first)
                target = max(prompt_len, span)
                if target + need <= S:
                    self._shift(target, span)
            if self.pos < prompt_len or self.pos + need > S:
                raise ValueError(f"a prompt of {prompt_len} positions and {writes} steps do not fit the "
                                 f"{S} cache columns beside the running rows")
            anchor = self.pos - prompt_len
            self.key_mask[n, 0, 0] = self.column_ids >= anchor
        self.anchors[n] = anchor
        self.first.append(anchor)
        self.needs.append(writes)
        return n

    def _shift(self, target: int, span: int) -> None:
        """Move the occupied rows' columns so the write column becomes `target`."""
        n, delta, lo = self.n, target - self.pos, self.pos - span
        for buf in (self.cache.k, self.cache.v):
            buf[:, :n, :, lo + delta:self.pos + delta] = buf[:, :n, :, lo:self.pos].clone()
        self.first = [a + delta for a in self.first]
        self.anchors[:n] += delta
        self.key_mask[:n, 0, 0] = self.column_ids[None] >= self.anchors[:n, None]
        self.pos = target
        self.shifts += 1

    @inference
    def prefill(self, slot: int, embeds: torch.Tensor, greedy: bool = False) -> Any:
        """Run the prompt `embeds` (T, d) of a placed `slot` alone (positions 0..T-1) into its columns. Returns
        the model head's output for its last position ((1, V) logits for the Thinker), or its greedy id (1,)."""
        if self.native is not None:
            return self.native.prefill(embeds, slot, self.first[slot], greedy)
        T = embeds.shape[0]
        h = self.model.hidden(embeds[None], 0, self.scratch, last_only=True)
        if self.reference:
            for buf, out in zip(self.attn_out, self.model.reference_attention(self.scratch, self.zero)):
                buf[slot] = out[0]
        else:
            a = self.first[slot]
            self.cache.k[:, slot, :, a:a + T] = self.scratch.k[:, 0, :, :T]
            self.cache.v[:, slot, :, a:a + T] = self.scratch.v[:, 0, :, :T]
        out = self.model.head(h)
        return out.argmax(-1) if greedy else out

    @inference
    def step(self, inputs: torch.Tensor, greedy: bool = False) -> Any:
        """One decode step of every occupied row: feed `inputs` (what the model's `embed_step` takes, one entry
        per row) at the write column. Returns the head's output (logits (n, V)), or with `greedy` the argmax ids
        (n,): possibly views of buffers the next step overwrites."""
        n = self.n
        if self.native is not None:
            out = self.native.step(inputs, self.pos, self.anchors, greedy)  # reads the first n anchors
        else:
            if not self.fresh:
                refresh_fused(self.model)
                self.fresh = True
            x = self.model.embed_step(inputs)
            if self.reference:
                h = self.model.decode_hidden(x, 0, None, None, None, None, [a[:n] for a in self.attn_out])
            else:
                pos = self.pos
                if not any(self.first):  # every row starts at column 0: one rotary row, no key mask
                    rot = self.model.rotary
                    cos, rot_sin, mask = rot.cos[pos:pos + 1], rot.rot_sin[pos:pos + 1], None
                else:
                    torch.sub(pos, self.anchors[:n], out=self.positions[:n])
                    torch.index_select(self.model.rotary.cos, 0, self.positions[:n], out=self.cos[:n])
                    torch.index_select(self.model.rotary.rot_sin, 0, self.positions[:n], out=self.rot_sin[:n])
                    dk = self.cos.shape[-1]
                    cos, rot_sin = self.cos[:n].view(n, 1, dk), self.rot_sin[:n].view(n, 1, dk)
                    mask = self.key_mask[:n, :, :, :pos + 1]
                h = self.model.decode_hidden(x, pos, self.views[n], cos, rot_sin, mask)
            if greedy:
                out = self.screen.argmax(h, self._full_argmax) if self.screen is not None else self._full_argmax(h)
            else:
                out = self.model.head(h)
        self.pos += 1
        self.steps += 1
        self.needs = [w - 1 for w in self.needs]
        return out

    def _full_argmax(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.head(h).argmax(-1)

    def copy(self, src: int, dst: int, length: int) -> None:
        """Give placed slot `dst` the prefilled prompt of slot `src` (its first `length` columns' keys and
        values, or its reference attention outputs): `n` choices of one prompt share one prefill."""
        if self.cache is not None:
            a, b = self.first[src], self.first[dst]
            self.cache.k[:, dst, :, b:b + length] = self.cache.k[:, src, :, a:a + length]
            self.cache.v[:, dst, :, b:b + length] = self.cache.v[:, src, :, a:a + length]
        for buf in self.attn_out or []:
            buf[dst] = buf[src]

    def release(self, slot: int) -> None:
        """Free `slot`; the last occupied row moves into it (its columns, mask, anchor and tracked state)."""
        last = self.n - 1
        if slot != last:
            if self.cache is not None:
                lo = self.first[last]
                self.cache.k[:, slot, :, lo:self.pos] = self.cache.k[:, last, :, lo:self.pos]
                self.cache.v[:, slot, :, lo:self.pos] = self.cache.v[:, last, :, lo:self.pos]
            for buf in self.moved:
                buf[slot] = buf[last]
            self.first[slot], self.needs[slot] = self.first[last], self.needs[last]
        self.first.pop()
        self.needs.pop()
        if not self.first:
            self.pos = 0
            self.fresh = False


@dataclass
class RowPrompt:
    """One request ready for the engine: prompt embeddings (T, d), its text ids (for the repetition
    penalty), the sampling options (`max_new_tokens` is this row's budget), notes for the caller, with
    `opts.response_format` the row's grammar state (utils.engine.constrain.Constraint, built by the caller, who
    has the tokenizer), and what was cut to fit the context (PromptBuilder.build's `fitted`: the server reports
    it in `usage`)."""
    embeds: torch.Tensor
    ids: list[int]
    opts: SamplingOptions
    notes: list[str] = field(default_factory=list)
    constraint: Constraint | None = None
    fitted: dict[str, Any] = field(default_factory=dict)


def _no_start(prompt: RowPrompt) -> None:
    return None


# A choice's callbacks: on_token(id), on_finish(reason, error), and on_logprobs(TokenLogprobs) (called just
# before on_token, for rows whose options ask for logprobs; None: not wanted).
Handlers = tuple[Callable[[int], None], Callable[[str, BaseException | None], None],
                 Union[Callable[[TokenLogprobs], None], None]]


def choice_seed(seed: int | None, choice: int) -> int | None:
    """The seed of choice `choice` of a request seeded with `seed`: seed + choice (wrapping past MAX_SEED), so
    choice 0 is the answer the request alone gives and every choice is reproducible."""
    return None if seed is None else (seed + choice) % (MAX_SEED + 1)


class Row:
    """A submitted request's choice: the caller's handle (`cancel()`) and the scheduler's per-row state. The
    `group` are the choices of one request (this row among them, at index `choice`): they share one prefill."""

    def __init__(self, prepare: Callable[[], RowPrompt], on_token: Callable[[int], None],
                 on_finish: Callable[[str, BaseException | None], None],
                 on_start: Callable[[RowPrompt], None] = _no_start,
                 on_logprobs: Callable[[TokenLogprobs], None] | None = None) -> None:
        self.prepare, self.on_start, self.on_token, self.on_finish = prepare, on_start, on_token, on_finish
        self.on_logprobs = on_logprobs
        self.cancelled = False
        self.opts = SamplingOptions()
        self.generator: torch.Generator | None = None
        self.bias: tuple[torch.Tensor, torch.Tensor] | None = None  # logit_bias as (ids, values)
        self.logprobs: TokenLogprobs | None = None  # the last pick's, delivered with its id
        self.generated = 0
        self.greedy = True
        self.group: list[Row] = [self]
        self.choice = 0
        self.constraint: Constraint | None = None

    def cancel(self) -> None:
        """Free the row at the scheduler's next step (a client went away, a stop string matched)."""
        self.cancelled = True


ENGINE_WIDE = ("decode_attention", "decode_kernel", "fast_greedy")  # options a whole engine decodes with


class Scheduler:
    """Rows join and leave a running decode batch at step boundaries. `add` queues a row (a RowPrompt, or a
    `prepare()` building it when a slot is free); `admit` prefills queued rows into free slots (longest prompt
    first) and emits their first ids; `decode` runs one step for every running row and frees those that
    finished. Callbacks: `on_start(prompt)`, then `on_token(id)` per generated id (EOS excluded), then exactly
    one `on_finish(reason, error)`: 'stop' (EOS), 'length' (budget), 'cancelled', or 'error' with the exception
    prepare or the model raised (that row fails, the others go on)."""

    def __init__(self, model: ThinkerLM, max_batch: int, columns: int, opts: SamplingOptions,
                 screen: GreedyHead | None = None, longest: int | None = None) -> None:
        self.slots = Slots(model, max_batch, columns, opts, screen, longest)
        self.model, self.opts, self.max_batch = model, opts, max_batch
        dev = self.slots.column_ids.device
        self.device = dev
        self.rows: list[Row] = []  # rows[i] is in slot i
        self.pending: collections.deque[Row] = collections.deque()
        self.admitting = 0  # rows taken from `pending` and not yet in `rows`
        self.tokens = torch.zeros(max_batch, dtype=torch.long, device=dev)  # each row's last id, fed next
        self.token_views = [self.tokens[:n] for n in range(max_batch + 1)]  # made once: views cost per step
        self.modes: tuple[bool, bool, bool] | None = None  # the running rows' (all greedy, any repetition
        # penalty, any presence/frequency penalty), worked out when the rows change
        self.seen = torch.zeros(max_batch, model.cfg.vocab_size, dtype=torch.bool, device=dev)
        # how often each id occurred in each row's answer (presence / frequency penalties), updated in place
        self.counts = torch.zeros(max_batch, model.cfg.vocab_size, device=dev)
        for buf in (self.tokens, self.seen, self.counts):
            self.slots.track(buf)
        self.row_ids = torch.arange(max_batch, device=dev)
        self.ones = torch.ones(max_batch, device=dev)
        self.cancelled = 0  # rows freed before finishing (cancel() or shutdown)

    @property
    def kernel(self) -> str:
        """The decode step this engine runs: "c (...)" or "torch (why)"."""
        return self.slots.kernel

    @property
    def steps(self) -> int:
        return self.slots.steps

    @property
    def shifts(self) -> int:
        return self.slots.shifts

    @property
    def running(self) -> int:
        """Rows in the batch or granted a slot (queued here, or being prefilled), each choice one row."""
        return len(self.rows) + self.admitting + sum(len(r.group) for r in self.pending)

    @property
    def free(self) -> int:
        return self.max_batch - self.running

    def add(self, prompt: Union[RowPrompt, Callable[[], RowPrompt]], on_token: Callable[[int], None],
            on_finish: Callable[[str, BaseException | None], None],
            on_start: Callable[[RowPrompt], None] = _no_start,
            on_logprobs: Callable[[TokenLogprobs], None] | None = None) -> Row:
        """Queue a row for the next `admit` (see the class docstring for the callbacks)."""
        return self.add_choices(prompt, [(on_token, on_finish, on_logprobs)], on_start)[0]

    def add_choices(self, prompt: Union[RowPrompt, Callable[[], RowPrompt]], handlers: list[Handlers],
                    on_start: Callable[[RowPrompt], None] = _no_start) -> list[Row]:
        """Queue len(handlers) choices of one prompt (prefilled once; choice i seeded `choice_seed(seed, i)`)."""
        rows = choice_rows(prompt if callable(prompt) else (lambda: prompt), handlers, on_start)
        self.enqueue(rows[0])
        return rows

    def enqueue(self, row: Row) -> None:
        self.pending.append(row)

    def step(self) -> bool:
        """Admit what fits, then one decode step; True while rows run or wait."""
        self.admit()
        self.decode()
        return bool(self.rows or self.pending)

    def run(self) -> None:
        """Step until every row has finished."""
        while self.step():
            pass

    def finish(self, row: Row, reason: str, error: BaseException | None = None) -> None:
        self.cancelled += reason == "cancelled"
        try:
            row.on_finish(reason, error)
        except Exception:  # a caller's callback must not take the scheduler down
            pass

    # ------------------------------------------------------------ admission
    @inference
    def admit(self) -> int:
        """Prefill queued rows into the free slots, longest prompt first (the first sets the write column, the
        others fit left of it); returns how many joined."""
        take = []
        while self.pending and len(self.rows) + self.admitting + len(self.pending[0].group) <= self.max_batch:
            row = self.pending.popleft()
            take.append(row)
            self.admitting += len(row.group)
        ready = []
        for row in take:
            if row.cancelled:
                self.admitting -= len(row.group)
                for choice in row.group:
                    self.finish(choice, "cancelled")
                continue
            try:
                prompt = row.prepare()
                self._check(prompt)
                row.on_start(prompt)
            except Exception as exc:  # bad input: this request fails, the others go on
                self.admitting -= len(row.group)
                for choice in row.group:
                    self.finish(choice, "error", exc)
                continue
            ready.append((row, prompt))
        ready.sort(key=lambda rp: -rp[1].embeds.shape[0])
        joined = 0
        for row, prompt in ready:
            self.admitting -= len(row.group)
            try:
                joined += self._start(row, prompt)
            except Exception as exc:  # a failing model: this request fails
                for choice in reversed(row.group):
                    if choice in self.rows:
                        self._free(self.rows.index(choice))
                    self.finish(choice, "error", exc)
        return joined

    def _check(self, prompt: RowPrompt) -> None:
        opts = prompt.opts
        if prompt.embeds.ndim != 2:
            raise ValueError(f"a row's prompt embeddings must be (T, d), not {tuple(prompt.embeds.shape)}")
        check_budget(self.model, prompt.embeds.shape[0], opts.max_new_tokens, opts)
        if opts.response_format != (prompt.constraint.format if prompt.constraint is not None else None):
            raise ValueError("a row's response_format and its Constraint (RowPrompt.constraint) must agree")
        for name in ENGINE_WIDE:
            if getattr(opts, name) != getattr(self.opts, name):
                raise ValueError(f"this engine decodes with {name} {getattr(self.opts, name)!r}, "
                                 f"not {getattr(opts, name)!r}")

    def _start(self, row: Row, prompt: RowPrompt) -> int:
        """Place a request's choices, prefill the first and copy its prompt to the others; emit each choice's
        first id. Returns how many are still running after that."""
        opts = prompt.opts
        embeds = prompt.embeds.to(self.device)
        T = embeds.shape[0]
        slots = []
        for choice in row.group:
            choice.opts = dataclasses.replace(opts, seed=choice_seed(opts.seed, choice.choice))
            choice.greedy = opts.greedy
            seed = choice.opts.seed
            choice.generator = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
            choice.bias = bias_tensors(opts.logit_bias, self.device) if opts.logit_bias else None
            if prompt.constraint is not None:  # each choice follows the grammar on its own
                choice.constraint = prompt.constraint if choice.choice == 0 else prompt.constraint.copy()
            slot = self.slots.place(T, opts.max_new_tokens - 1)
            self.rows.append(choice)
            self.modes = None
            self.seen[slot] = False  # a reused slot starts clean
            self.counts[slot] = 0
            if opts.repetition_penalty != 1.0:
                ids = [i for i in prompt.ids if 0 <= i < self.seen.shape[1]]
                if ids:
                    self.seen[slot, torch.tensor(ids, device=self.device)] = True
            slots.append(slot)
        out = self.slots.prefill(slots[0], embeds, greedy=row.greedy)
        for slot in slots[1:]:
            self.slots.copy(slots[0], slot, T)
        done = []
        for choice, slot in zip(row.group, slots):
            tid = int(out[0]) if row.greedy else self._pick(choice, slot, out)
            if self._emit(choice, tid):
                done.append(choice)
            else:
                self.tokens[slot] = tid
        for choice in done:
            self._free(self.rows.index(choice))
        return len(slots) - len(done)

    # ------------------------------------------------------------ decoding
    @inference
    def decode(self) -> None:
        """One decode step for every running row: feed its last id, pick its next one, emit, free the done."""
        for slot in range(len(self.rows) - 1, -1, -1):
            if self.rows[slot].cancelled:
                row = self.rows[slot]
                self._free(slot)
                self.finish(row, "cancelled")
        n = len(self.rows)
        if n == 0:
            return
        tokens = self.token_views[n]
        if self.modes is None:
            rows = self.rows
            self.modes = (all(r.greedy for r in rows), any(r.opts.repetition_penalty != 1.0 for r in rows),
                          any(r.opts.counts for r in rows))
        greedy, repetition, counts = self.modes
        try:
            if repetition:
                self.seen[self.row_ids[:n], tokens] = True
            if counts:
                self.counts.index_put_((self.row_ids[:n], tokens), self.ones[:n], accumulate=True)
            out = self.slots.step(tokens, greedy=greedy)
            picked = out.tolist() if greedy else self._pick_rows(out)  # the one host sync per step
            if greedy:
                tokens.copy_(out)  # each row's next input (a finished row's is never read)
        except Exception as exc:  # a failing model step fails the rows in it, not the engine
            for slot in range(n - 1, -1, -1):
                row = self.rows[slot]
                self._free(slot)
                self.finish(row, "error", exc)
            return
        done = []
        for b, (row, tid) in enumerate(zip(self.rows, picked)):
            if row.cancelled:
                done.append((b, True))
            elif self._emit(row, tid):
                done.append((b, False))
            elif not greedy:
                self.tokens[b] = tid
        for b, cancelled in reversed(done):
            row = self.rows[b]
            self._free(b)
            if cancelled:
                self.finish(row, "cancelled")

    def _pick(self, row: Row, slot: int, logits: torch.Tensor) -> int:
        """One row's next id from its raw logits (1, V), in this order: 1. the score adjustments (repetition,
        presence and frequency penalties, logit bias: `_adjust`); 2. its grammar's mask (a constrained row is
        never greedy, so it always comes here: neither the C step's argmax nor the int8 screen skips the mask);
        3. temperature, top-k, top-p, min-p and the draw from the row's generator, or the argmax (`sample`).
        Log-probabilities, when the row asks, are those of the raw logits (the model's distribution), read after
        the pick."""
        scores = self._adjust(row, slot, logits)
        if row.constraint is not None:
            if scores is logits and row.opts.logprobs is not None:
                scores = logits.clone()  # the mask writes in place (only this row's slice); logprobs read the raw
            scores = row.constraint.mask(scores)
        tid = int(sample(scores, row.opts, row.generator)[0])
        if row.opts.logprobs is not None:
            row.logprobs = token_logprobs(logits, tid, row.opts.logprobs)
        return tid
    def _adjust(self, row: Row, slot: int, logits: torch.Tensor) -> torch.Tensor:
        """A row's scores after its penalties and logit bias (the logits themselves when it has none)."""
        opts = row.opts
        if opts.repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, self.seen[slot:slot + 1], opts.repetition_penalty)
        if opts.counts:
            logits = apply_count_penalties(logits, self.counts[slot:slot + 1], opts.presence_penalty,
                                           opts.frequency_penalty)
        if row.bias is not None:
            logits = apply_logit_bias(logits, *row.bias)
        return logits

    def _pick_rows(self, logits: torch.Tensor) -> list[int]:
        """Each row's next id from the step's logits (n, V): argmax for greedy rows, its own pick else."""
        picked = logits.argmax(-1).tolist()
        for b, row in enumerate(self.rows):
            if not row.greedy:
                picked[b] = self._pick(row, b, logits[b:b + 1])
        return picked

    def _emit(self, row: Row, tid: int) -> bool:
        """Deliver one picked id; True when the row is finished by it."""
        if tid == EOS_ID and not row.opts.ignore_eos:
            self.finish(row, "stop")
            return True
        row.generated += 1
        try:
            if row.logprobs is not None and row.on_logprobs is not None:
                row.on_logprobs(row.logprobs)
            row.on_token(tid)
        except Exception:  # the caller is gone (e.g. its event loop closed): free the row
            row.cancel()
        if row.generated >= row.opts.max_new_tokens:
            self.finish(row, "length")
            return True
        if row.constraint is not None:
            try:
                row.constraint.advance(tid)
            except Exception as exc:  # a dead end of this row's grammar fails this row only
                self.finish(row, "error", exc)
                return True
        return False

    def _free(self, slot: int) -> None:
        self.slots.release(slot)
        self.rows[slot] = self.rows[-1]
        self.rows.pop()
        self.modes = None


def choice_rows(prepare: Callable[[], RowPrompt], handlers: list[Handlers],
                on_start: Callable[[RowPrompt], None] = _no_start) -> list[Row]:
    """The rows of one request's choices, one per handler triple, grouped (the first prepares and starts)."""
    if not handlers:
        raise ValueError("a request needs at least one choice")
    rows = [Row(prepare, on_token, on_finish, on_start, on_logprobs) for on_token, on_finish, on_logprobs in handlers]
    for i, row in enumerate(rows):
        row.group, row.choice = rows, i
    return rows


def one_off(model: ThinkerLM, prompts: list[RowPrompt], opts: SamplingOptions) -> Scheduler:
    """A Scheduler for exactly these rows: one slot each, rows x (longest prompt + largest budget) columns."""
    longest = max(p.embeds.shape[0] for p in prompts)
    budget = max(p.opts.max_new_tokens for p in prompts)
    return Scheduler(model, len(prompts), longest + budget, opts, greedy_screen(model, opts), longest)


def forced_logits(model: ThinkerLM, embeds: torch.Tensor, continuation: list[int], opts: SamplingOptions
                  ) -> torch.Tensor:
    """Teacher forcing through the decode engine: the logits (len(continuation) + 1, V) after the prompt `embeds`
    (T, d), then after each token of `continuation` fed in turn, with `opts`' decode mode and kernel. What the
    agreement measures compare (one early disagreement between two models does not change every later step)."""
    T = embeds.shape[0]
    with torch.inference_mode():
        slots = Slots(model, 1, T + len(continuation), opts, longest=T)
        out = torch.empty(len(continuation) + 1, model.cfg.vocab_size)
        out[0] = slots.prefill(slots.place(T, len(continuation)), embeds)[0]
        for i, tok in enumerate(continuation):
            out[i + 1] = slots.step(torch.tensor([tok], device=embeds.device))[0]
    return out


class _Outcome:
    """Collects one row's ids, their log-probabilities (when asked) and its finish (reason, error), for the
    run-to-completion helpers."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.logprobs: list[TokenLogprobs] = []
        self.reason: str | None = None
        self.error: BaseException | None = None

    def finished(self, reason: str, error: BaseException | None) -> None:
        self.reason, self.error = reason, error

    def handlers(self) -> Handlers:
        return self.ids.append, self.finished, self.logprobs.append


def generate(model: ThinkerLM, embeds: torch.Tensor, opts: SamplingOptions,
             prompt_ids: list[int] | None = None, info: dict[str, Any] | None = None,
             logprobs: list[TokenLogprobs] | None = None, constraint: Constraint | None = None) -> Iterator[int]:
    """Yield new token ids for one prompt (`embeds` (1, T, d)) until EOS or `max_new_tokens`; EOS is not
    yielded. A batch of one on the Scheduler. `info`, if given, receives "decode_kernel" (Slots.kernel) and
    "finish_reason" (the Scheduler's) once done; `logprobs`, with `opts.logprobs` set, each yielded id's
    TokenLogprobs (appended before the id is yielded); `constraint`: the row's grammar state (RowPrompt)."""
    if opts.max_new_tokens <= 0:
        return
    with torch.inference_mode():
        prompt = RowPrompt(embeds[0], list(prompt_ids or []), opts, constraint=constraint)
        engine = one_off(model, [prompt], opts)
        if info is not None:
            info["decode_kernel"] = engine.kernel
        row = _Outcome()
        if logprobs is not None:
            row.logprobs = logprobs
        engine.add_choices(prompt, [row.handlers()])
        engine.admit()
        while True:
            yield from row.ids  # the ids of the last admit / decode: one per step
            row.ids.clear()
            if row.reason is not None:
                if row.error is not None:
                    raise row.error
                if info is not None:
                    info["finish_reason"] = row.reason
                return
            engine.decode()


def generate_choices(model: ThinkerLM, embeds: torch.Tensor, prompt_ids: list[int], opts: SamplingOptions, n: int,
                     info: dict[str, Any] | None = None, constraint: Constraint | None = None
                     ) -> list[tuple[list[int], list[TokenLogprobs], str]]:
    """`n` answers to one prompt (`embeds` (T, d)), prefilled once: each choice's ids (EOS not included), with
    `opts.logprobs` their TokenLogprobs, and its finish reason. Choice i is seeded `choice_seed(opts.seed, i)`,
    so choice 0 is what `generate` gives. `info` as for `generate`; `constraint`: the grammar state every choice
    starts from (RowPrompt)."""
    rows = [_Outcome() for _ in range(n)]
    with torch.inference_mode():
        prompt = RowPrompt(embeds, list(prompt_ids), opts, constraint=constraint)
        T = embeds.shape[0]
        engine = Scheduler(model, n, T + opts.max_new_tokens, opts, greedy_screen(model, opts), T)
        if info is not None:
            info["decode_kernel"] = engine.kernel
        engine.add_choices(prompt, [row.handlers() for row in rows])
        engine.run()
    for row in rows:
        if row.error is not None:
            raise row.error
    return [(row.ids, row.logprobs, row.reason) for row in rows]


def generate_batch(model: ThinkerLM, embeds: list[torch.Tensor], prompt_ids: list[list[int]] | None,
                   opts: SamplingOptions, max_new_tokens: list[int] | None = None,
                   step_times: list[float] | None = None, info: dict[str, Any] | None = None,
                   logprobs: list[list[TokenLogprobs]] | None = None,
                   constraints: list[Constraint | None] | None = None, reasons: list[str] | None = None
                   ) -> list[list[int]]:
    """New token ids for several prompts at once (each embeds[i] is (T_i, d)), EOS not included: the rows
    submitted together to one Scheduler. Each row's ids are those `generate` gives it alone (greedy, and
    sampled with a seed: every row has its own generator). Row i stops at EOS or its budget
    (`max_new_tokens[i]`, default `opts.max_new_tokens`; 0: no answer). `step_times`, if given, receives
    time.perf_counter() as each step's ids arrive (entry i: when every row's i-th token was known). `info` as
    for `generate` (without finish_reason); `logprobs`, with `opts.logprobs` set, receives each row's
    TokenLogprobs (one list per prompt); `constraints[i]`: row i's grammar state (RowPrompt: it sets the row's
    response_format, whatever `opts` has); `reasons`, if given, receives each row's finish reason (None for a row
    of budget 0). A row that fails raises its error once the others have finished."""
    if not embeds:
        return []
    if any(e.ndim != 2 for e in embeds):
        raise ValueError("generate_batch: each prompt's embeddings must be (T_i, d)")
    B = len(embeds)
    prompt_ids = prompt_ids if prompt_ids is not None else [[] for _ in range(B)]
    if len(prompt_ids) != B:
        raise ValueError(f"generate_batch: {B} prompts but {len(prompt_ids)} prompt id lists")
    budgets = list(max_new_tokens) if max_new_tokens is not None else [opts.max_new_tokens] * B
    if len(budgets) != B:
        raise ValueError(f"generate_batch: {B} prompts but {len(budgets)} max_new_tokens")
    rows = [_Outcome() for _ in range(B)]
    live = [b for b in range(B) if budgets[b] > 0]
    if not live:
        if logprobs is not None:
            logprobs[:] = [[] for _ in range(B)]
        return [[] for _ in range(B)]
    with torch.inference_mode():
        grammar = constraints or [None] * B
        prompts = {b: RowPrompt(embeds[b], list(prompt_ids[b]), dataclasses.replace(
            opts, max_new_tokens=budgets[b], response_format=grammar[b].format if grammar[b] else None),
            constraint=grammar[b]) for b in live}
        engine = one_off(model, list(prompts.values()), opts)
        if info is not None:
            info["decode_kernel"] = engine.kernel
        for b in live:
            engine.add_choices(prompts[b], [rows[b].handlers()])
        engine.admit()
        while True:
            if step_times is not None:
                step_times.append(time.perf_counter())
            if not engine.rows:
                break
            engine.decode()
    for row in rows:
        if row.error is not None:
            raise row.error
    if logprobs is not None:
        logprobs[:] = [row.logprobs for row in rows]
    if reasons is not None:
        reasons.extend(row.reason for row in rows)
    return [row.ids for row in rows]


class EngineThread:
    """The Scheduler in a thread of its own, for the server: `submit` a request (it waits in a bounded queue
    until a slot is free), receive its tokens through callbacks run on that thread; `call` runs other model
    work (encoders, speech, CTC) between steps, so one thread runs the model. `after_steps(fn)`: `fn()` runs on
    that thread once after each round (admission, jobs, one step), so callbacks may buffer their events and
    hand on all of a step's at once (the server wakes its event loop once per step, not once per token)."""

    def __init__(self, engine: Scheduler, max_queue: int) -> None:
        if max_queue < 0:
            raise ValueError(f"max_queue {max_queue} must be >= 0")
        self.engine, self.max_queue, self.max_batch = engine, max_queue, engine.max_batch
        self.waiting: collections.deque[Row] = collections.deque()
        self.jobs: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future]] = collections.deque()
        self.cond = threading.Condition()
        self.closing = False
        self.deadline: float | None = None
        self.listeners: list[Callable[[], None]] = []
        self.thread = threading.Thread(target=self._run, name="omni-scheduler", daemon=True)
        self.thread.start()

    kernel = property(lambda self: self.engine.kernel)
    steps = property(lambda self: self.engine.steps)
    shifts = property(lambda self: self.engine.shifts)
    cancelled = property(lambda self: self.engine.cancelled)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    @property
    def running(self) -> int:
        """Rows in the batch, counting those being prefilled."""
        return self.engine.running

    def submit(self, prepare: Callable[[], RowPrompt], on_token: Callable[[int], None],
               on_finish: Callable[[str, BaseException | None], None],
               on_start: Callable[[RowPrompt], None] = _no_start,
               on_logprobs: Callable[[TokenLogprobs], None] | None = None) -> Row:
        """Queue a request (Scheduler.add's callbacks; `prepare()` runs on the engine's thread). Raises
        QueueFull past `max_queue` waiting requests, EngineClosed once closing."""
        return self.submit_choices(prepare, [(on_token, on_finish, on_logprobs)], on_start)[0]

    def submit_choices(self, prepare: Callable[[], RowPrompt], handlers: list[Handlers],
                       on_start: Callable[[RowPrompt], None] = _no_start) -> list[Row]:
        """Queue a request of len(handlers) choices (Scheduler.add_choices), as `submit`; more choices than
        `max_batch` rows is a ValueError (they are decoded side by side)."""
        if len(handlers) > self.max_batch:
            raise ValueError(f"{len(handlers)} choices do not fit the {self.max_batch} rows decoded together")
        rows = choice_rows(prepare, handlers, on_start)
        row = rows[0]
        with self.cond:
            if self.closing:
                raise EngineClosed("the server is shutting down")
            free = max(0, self.engine.free)
            if len(self.waiting) - free >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting (max_queue {self.max_queue})")
            self.waiting.append(row)
            self.cond.notify()
        return rows

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run `fn()` on the engine's thread before its next step; its result or exception in the Future."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self.cond:
            if self.closing:
                raise EngineClosed("the server is shutting down")
            self.jobs.append((fn, fut))
            self.cond.notify()
        return fut

    def after_steps(self, fn: Callable[[], None]) -> None:
        """Run `fn()` on the engine's thread after each round, and once more before the thread stops (see the
        class docstring); an exception it raises is dropped, as a callback's is."""
        self.listeners.append(fn)

    def close(self, timeout: float = 10.0, wait: bool = True) -> None:
        """Admit nothing more; let running rows finish for up to `timeout` seconds, then cancel them (and
        any request still waiting). With `wait`, return once the engine's thread has stopped."""
        with self.cond:
            if not self.closing:
                self.closing = True
                self.deadline = time.monotonic() + timeout
            self.cond.notify()
        if wait:
            self.thread.join()

    def _run(self) -> None:
        engine = self.engine
        with torch.inference_mode():
            while self._round(engine):
                self._notify()
        self._notify()

    def _notify(self) -> None:
        for fn in self.listeners:
            try:
                fn()
            except Exception:  # a caller's listener must not take the engine down
                pass

    def _round(self, engine: Scheduler) -> bool:
        """Admission, the queued jobs and one step; False once closed with nothing left to run."""
        with self.cond:
            while not (engine.rows or self.waiting or self.jobs or self.closing):
                self.cond.wait()
            jobs = list(self.jobs)
            self.jobs.clear()
            if self.closing:
                if time.monotonic() >= self.deadline:
                    for row in engine.rows:
                        row.cancel()
                while self.waiting:
                    for choice in self.waiting.popleft().group:
                        engine.finish(choice, "cancelled", EngineClosed("the server is shutting down"))
                if not engine.rows and not jobs:
                    for fn, fut in self.jobs:
                        fut.set_exception(EngineClosed("the server is shutting down"))
                    return False
            for row in [r for r in self.waiting if r.cancelled]:  # the client left while waiting
                self.waiting.remove(row)
                for choice in row.group:
                    engine.finish(choice, "cancelled")
            while self.waiting and engine.free >= len(self.waiting[0].group):
                engine.enqueue(self.waiting.popleft())
        for fn, fut in jobs:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as exc:  # handed to the caller, who reports it
                    fut.set_exception(exc)
        engine.step()
        return True


def serving_scheduler(model: ThinkerLM, max_batch: int, opts: SamplingOptions) -> Scheduler:
    """The server's Scheduler: `max_batch` slots of 2 x context columns (room for any request that fits the
    context, wherever the write column is), the int8 greedy screen built up front (with `opts.fast_greedy`)."""
    if max_batch < 1:
        raise ValueError(f"max_batch {max_batch} must be >= 1")
    ctx = model.rotary.max_len
    return Scheduler(model, max_batch, 2 * ctx, opts, greedy_head(model) if opts.fast_greedy else None, ctx)


def serving_engine(model: ThinkerLM, max_batch: int, max_queue: int, opts: SamplingOptions) -> EngineThread:
    """`serving_scheduler` in its thread (EngineThread): what `OmniModel.batch_engine` gives the server."""
    return EngineThread(serving_scheduler(model, max_batch, opts), max_queue)
