"""utils.engine.batching.BatchEngine: rows that join a running batch at different steps give the ids `answer` gives
each request alone (greedy, causal and reference decode; seeded sampling), slots are reused, a cancelled row
leaves at the next step, the queue is bounded. On the demo model (skipped when checkpoints/demo is absent)."""
from __future__ import annotations

import threading

import pytest

from tests.conftest import REPO

DEMO = REPO / "checkpoints" / "demo"
EXAMPLES = REPO / "examples"

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


@pytest.mark.parametrize("mode", ["causal", "reference"])
def test_joined_rows_equal_batch_one(model, mode) -> None:
    from utils.engine.batching import BatchEngine
    gen = dict(max_new_tokens=60, ignore_eos=True, decode_attention=mode)
    expected = [model.answer(**it, **gen).token_ids for it in ITEMS]
    engine = BatchEngine(model.parts.thinker, max_batch=3, max_queue=16, decode_attention=mode)
    cache_ptr = engine.cache.k.data_ptr() if engine.cache is not None else None
    try:
        outs, reasons = run_engine(model, engine, ITEMS * 2, gen)
    finally:
        engine.close()
    assert outs == expected * 2
    assert set(reasons.values()) == {"length"}
    if mode == "causal":
        assert engine.shifts >= 1  # a long prompt joined a batch whose column was too small for it
        assert engine.cache.k.data_ptr() == cache_ptr  # preallocated once, reused by every row


def test_long_running_batch_reuses_columns(model) -> None:
    """Never empty for long: the shared column passes the cache's end and the rows are moved back."""
    from utils.engine.batching import BatchEngine
    gen = dict(ignore_eos=True)
    # three budgets, so the two rows never finish at the same step (the batch would empty and start afresh)
    items = [dict(text="What is 3 plus 4?", max_new_tokens=250), dict(text="Hello", max_new_tokens=170),
             dict(text="What is 12 plus 30?", max_new_tokens=90)] * 5
    expected = {it["text"]: model.answer(**it, **gen).token_ids for it in items[:3]}
    engine = model.batch_engine(max_batch=2, max_queue=16)
    assert isinstance(engine, BatchEngine)
    try:
        outs, _ = run_engine(model, engine, items, gen, join_running=False)
    finally:
        engine.close()
    assert outs == [expected[it["text"]] for it in items]
    assert engine.shifts >= 1 and engine.steps > engine.cache.max_len  # the batch ran past the columns it has


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
