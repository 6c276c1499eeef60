"""The one decode engine (utils.engine.generation.Scheduler) as the server runs it: rows that join a running batch
at different steps give the ids `answer` gives each request alone (greedy, causal and reference decode, C and
torch steps; seeded sampling), at shifted columns and after moving into a freed slot; a reused slot starts
with no repetition-penalty state; a cancelled row leaves at the next step, the queue is bounded. The engine is
stepped from the test (no threads) except where the thread wrapper itself is tested. On the demo model (skipped
when checkpoints/demo is absent)."""
from __future__ import annotations

import threading

import pytest

from tests.conftest import DEMO, EXAMPLES, c_step_param


pytestmark = pytest.mark.skipif(not (DEMO / "omni_sft_tiny" / "omni.pt").is_file() or
                                not (EXAMPLES / "green_triangle.wav").is_file(),
                                reason=f"{DEMO} or examples/ not built (run: python tools/train_demo.py)")

# prompts of very different lengths (audio: ~130 positions), so joining rows force the cache columns to move
ITEMS = [dict(text="What is 3 plus 4?"), dict(audio=str(EXAMPLES / "green_triangle.wav")), dict(text="Hello"),
         dict(image=str(EXAMPLES / "red_circle.png")), dict(text="What is 12 plus 30?"),
         dict(image=str(EXAMPLES / "blue_square.png"), text="What do you see?")]


@pytest.fixture(scope="module")
def model(one_thread):
    from omni import load_model
    return load_model(DEMO, device="cpu")


def run_engine(model, engine, items, gen, join_running=True):
    """Submit `items` one after another and return their ids and finish reasons. With `join_running`, each
    item is submitted once the one before it has produced a token, so it joins a running batch however fast
    the decode step is; else all are submitted at once."""
    outs = [[] for _ in items]
    finished = threading.Event()
    started = [threading.Event() for _ in items]
    reasons: dict[int, str] = {}
    errors: list = []

    def token(i, tid):  # runs on the engine's thread
        outs[i].append(tid)
        started[i].set()

    def finish(i, reason, error):  # runs on the engine's thread: record, never raise there
        if error is not None:
            errors.append(error)
            finished.set()
        reasons[i] = reason
        started[i].set()
        if len(reasons) == len(items):
            finished.set()

    for i, it in enumerate(items):
        engine.submit(lambda it=it: model.prepare_chat(**{**gen, **it}),
                      lambda tid, i=i: token(i, tid), lambda r, e, i=i: finish(i, r, e))
        if join_running:
            assert started[i].wait(300)
    assert finished.wait(300)
    assert errors == []
    return outs, reasons


class Stepped:
    """A server Scheduler (utils.engine.generation.serving_scheduler) driven step by step from the test: rows
    join exactly when the test adds them, so placement, shifts and slot moves are deterministic."""

    def __init__(self, model, max_batch: int, **gen) -> None:
        from utils.engine.generation import serving_scheduler
        self.model, self.gen = model, gen
        self.engine = serving_scheduler(model.parts.thinker, max_batch, model.sampling_options(**gen))
        self.outs: list[list[int]] = []
        self.reasons: list[str | None] = []
        self.errors: list[BaseException] = []

    def add(self, item: dict, **gen) -> int:
        """Queue `item` (prepared as the server prepares it) for the next step; returns its index."""
        i = len(self.outs)
        self.outs.append([])
        self.reasons.append(None)

        def finish(reason, error, i=i):  # runs inside the engine, which swallows a raising callback
            if error is not None:
                self.errors.append(error)
            self.reasons[i] = reason
        self.row = self.engine.add(lambda: self.model.prepare_chat(**{**self.gen, **gen, **item}),
                                   self.outs[i].append, finish)
        return i

    def slot_of(self, i: int) -> int:
        return [r.on_token for r in self.engine.rows].index(self.outs[i].append)

    def step(self) -> None:
        self.engine.step()
        assert self.errors == []

    def run(self) -> None:
        while self.engine.step():
            pass
        assert self.errors == []


def alone(model, item: dict, **gen) -> list[int]:
    return model.answer(**item, **gen).token_ids


KERNELS = (c_step_param(), "torch")


@pytest.mark.parametrize("kernel", KERNELS)
def test_joined_rows_equal_batch_one(model, kernel) -> None:
    """Rows join a running batch one after another (each once the one before it has 3 tokens), so a long prompt
    joins when the write column is left of its length (a shift), rows run at other columns than alone (RoPE
    offsets) and rows move into freed slots; every row's ids are its `answer` ids, with the C and torch steps."""
    gen = dict(max_new_tokens=40, ignore_eos=True, decode_kernel=kernel)
    expected = [alone(model, it, **gen) for it in ITEMS]
    run = Stepped(model, 3, **gen)
    cache = run.engine.slots.cache.k.data_ptr()
    todo = list(ITEMS * 2)
    offsets, slots_seen = set(), {}
    while todo or run.engine.rows:
        if todo and run.engine.free and (not run.outs or len(run.outs[-1]) >= 3 or run.reasons[-1]):
            run.add(todo.pop(0))
        run.step()
        for i in range(len(run.outs)):
            if run.reasons[i] is None and run.outs[i]:
                slot = run.slot_of(i)
                slots_seen.setdefault(i, set()).add(slot)
                offsets.add(run.engine.slots.first[slot] > 0)
    assert run.outs == expected * 2
    assert set(run.reasons) == {"length"}
    assert run.engine.shifts >= 1  # the audio prompt (~130 positions) joined a batch whose column was left of it
    assert offsets == {True, False}  # rows decoded at their own columns and at shifted ones
    assert any(len(s) > 1 for s in slots_seen.values())  # a row moved into a freed slot
    assert run.engine.slots.cache.k.data_ptr() == cache  # preallocated once, reused by every row


def test_joined_rows_equal_batch_one_reference(model) -> None:
    gen = dict(max_new_tokens=30, ignore_eos=True, decode_attention="reference")
    expected = [alone(model, it, **gen) for it in ITEMS]
    run = Stepped(model, 3, **gen)
    todo = list(ITEMS)
    while todo or run.engine.rows:
        if todo and run.engine.free and (not run.outs or len(run.outs[-1]) >= 3):
            run.add(todo.pop(0))
        run.step()
    assert run.outs == expected
    assert run.engine.kernel == "torch (the reference decode mode)" and run.engine.slots.cache is None


TEXTS = [dict(text="What is 12 plus 30? Tell me the answer now please."), dict(text="What is 3 plus 4?"),
         dict(text="Hello")]  # longest first: rows added together take slots in this order


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_row_moved_into_a_freed_slot_keeps_its_ids(model, kernel) -> None:
    """Three rows joined together (the longest prompt in slot 0, at column 0); slot 0's row finishes first, so
    the row in slot 2 (a shorter prompt: its anchor is not 0) moves into slot 0 and goes on there."""
    gen = dict(ignore_eos=True, decode_kernel=kernel)
    budgets = (4, 30, 30)
    expected = [alone(model, it, max_new_tokens=n, **gen) for it, n in zip(TEXTS, budgets)]
    run = Stepped(model, 3, **gen)
    for it, n in zip(TEXTS, budgets):
        run.add(it, max_new_tokens=n)
    run.step()
    assert [run.slot_of(i) for i in range(3)] == [0, 1, 2]
    first = run.engine.slots.first[2]
    while run.reasons[0] is None:
        run.step()
    assert run.slot_of(2) == 0 and run.engine.slots.first[0] == first > 0  # moved, with its own anchor
    run.run()
    assert run.outs == expected


@pytest.mark.parametrize("kernel", KERNELS)
def test_repetition_penalty_state_does_not_leak_into_a_reused_slot(model, kernel) -> None:
    """Penalised rows: the first leaves early, the second moves into its slot (taking its seen ids along), and a
    new row joins in the slot the second left: each gives its `answer` ids, so no row sees another's ids."""
    gen = dict(ignore_eos=True, repetition_penalty=1.5, decode_kernel=kernel)
    items = [(TEXTS[0], 3), (TEXTS[2], 25), (dict(text="Once upon a time"), 20)]
    expected = [alone(model, it, max_new_tokens=n, **gen) for it, n in items]
    run = Stepped(model, 2, **gen)
    run.add(items[0][0], max_new_tokens=items[0][1])
    run.add(items[1][0], max_new_tokens=items[1][1])
    while run.reasons[0] is None:
        run.step()
    assert run.slot_of(1) == 0  # moved into the freed slot
    run.add(items[2][0], max_new_tokens=items[2][1])
    run.step()
    assert run.slot_of(2) == 1  # the slot row 1 left, its seen ids still there unless cleared
    run.run()
    assert run.outs == expected
    assert len(set(map(tuple, expected))) == 3


@pytest.mark.parametrize("kernel", KERNELS)
def test_seeded_sampled_row_is_independent_of_its_neighbours(model, kernel) -> None:
    """A seeded sampled row has its own generator: the same ids alone, beside greedy rows and beside other
    sampled rows (seeded or not), joined at different steps."""
    seeded = dict(temperature=1.5, seed=5, max_new_tokens=30, ignore_eos=True)
    want = alone(model, TEXTS[2], decode_kernel=kernel, **seeded)
    assert alone(model, TEXTS[2], decode_kernel=kernel, **{**seeded, "seed": 6}) != want  # the seed matters
    for neighbours in ([dict(max_new_tokens=30)], [dict(temperature=1.0, max_new_tokens=30),
                                                   dict(temperature=1.5, seed=9, max_new_tokens=10)]):
        run = Stepped(model, 3, decode_kernel=kernel)
        for j, gen in enumerate(neighbours):
            run.add(TEXTS[j], **gen)
            run.step()
        mine = run.add(TEXTS[2], **seeded)
        run.run()
        assert run.outs[mine] == want, neighbours


def test_long_running_batch_reuses_columns(model) -> None:
    """Never empty for long: the shared column passes the cache's end and the rows are moved back."""
    from utils.engine.generation import EngineThread
    gen = dict(ignore_eos=True)
    # three budgets, so the two rows never finish at the same step (the batch would empty and start afresh)
    items = [dict(text="What is 3 plus 4?", max_new_tokens=250), dict(text="Hello", max_new_tokens=170),
             dict(text="What is 12 plus 30?", max_new_tokens=90)] * 5
    expected = {it["text"]: model.answer(**it, **gen).token_ids for it in items[:3]}
    engine = model.batch_engine(max_batch=2, max_queue=16)
    assert isinstance(engine, EngineThread)
    try:
        outs, _ = run_engine(model, engine, items, gen, join_running=False)
    finally:
        engine.close()
    assert outs == [expected[it["text"]] for it in items]
    assert engine.shifts >= 1 and engine.steps > engine.engine.slots.columns  # the batch ran past its columns


def test_natural_stops_and_seeded_sampling(model) -> None:
    gen = dict(temperature=0.9, top_p=0.9, seed=5, max_new_tokens=40)
    expected = [model.answer(**it, **gen).token_ids for it in ITEMS]
    greedy = [model.answer(**it).token_ids for it in ITEMS]
    engine = model.batch_engine(max_batch=4)
    try:
        outs, _ = run_engine(model, engine, ITEMS, gen)
        outs_greedy, reasons = run_engine(model, engine, ITEMS, {})
    finally:
        engine.close()
    assert outs == expected
    assert outs_greedy == greedy and "stop" in reasons.values()


def test_cancel_queue_limit_and_close(model) -> None:
    from utils.base.errors import EngineClosed, QueueFull
    engine = model.batch_engine(max_batch=1, max_queue=1)
    got: list[int] = []
    done: dict[str, tuple] = {}
    started, gate = threading.Event(), threading.Event()

    def prepare():
        return model.prepare_chat("What is 3 plus 4?", max_new_tokens=400, ignore_eos=True)

    def on_token(tid):  # holds the scheduler after the first token, so the queue state is known
        got.append(tid)
        started.set()
        gate.wait()

    try:
        first = engine.submit(prepare, on_token, lambda r, e: done.__setitem__("first", (r, e)))
        assert started.wait(60)
        engine.submit(prepare, lambda t: None, lambda r, e: done.__setitem__("second", (r, e)))  # waits for the row
        assert (engine.running, engine.queued) == (1, 1)
        with pytest.raises(QueueFull):
            engine.submit(prepare, lambda t: None, lambda r, e: None)
        first.cancel()
    finally:
        gate.set()
        engine.close(timeout=0.0)  # the queued request is refused, nothing is left running
    assert done["first"] == ("cancelled", None) and len(got) < 400
    assert done["second"][0] == "cancelled" and isinstance(done["second"][1], EngineClosed)
    assert engine.running == 0 and engine.queued == 0 and engine.cancelled == 2
    with pytest.raises(EngineClosed):
        engine.submit(prepare, lambda t: None, lambda r, e: None)
