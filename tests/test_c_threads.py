"""The C step on several threads (the worker pool of utils/engine/native/step.c): ids and logits equal bit for bit
on 1, 2, 3 and 8 threads for prefills and steps (float32, int8 and int4 weights, batches of 1 and 4, a model where
every thread gets work and one too small for that); a session's workers started once, reused for every step
and joined when it is freed; the thread count the step runs on reported; the physical-core count serve.py and
batch.py default to; torch's OpenMP workers told to sleep between regions (they would spin on the C step's
cores)."""
from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.layers import BlockConfig
from models.thinker import ThinkerConfig, ThinkerLM
from utils.base.cpus import physical_cores, service_threads
from utils.base.options import SamplingOptions
from utils.engine.generation import Slots
from utils.engine.native.step import NativeSession, native_model
from utils.engine.sampling import greedy_head
from utils.weights.quant import quantize_linears

from tests.conftest import REPO, c_step_missing

needs_c = pytest.mark.skipif(c_step_missing() is not None, reason=f"no C decode step: {c_step_missing()}")

MODELS = {  # name: (BlockConfig kwargs, vocab)
    # every projection has >= 4 blocks of 64 outputs, 4 query heads: work for each of 3 threads in every region
    "every-thread-works": (dict(d_model=256, n_heads=4, n_kv_heads=2, d_ff=384), 4096),
    # one block of 64 outputs per projection, 2 heads: a single chunk, most threads get nothing
    "some-threads-idle": (dict(d_model=32, n_heads=2, n_kv_heads=1, d_ff=48), 62),  # 62: partial int8 tile
}


def thinker(name: str, ctx: int = 32) -> ThinkerLM:
    block, vocab = MODELS[name]
    model = ThinkerLM(ThinkerConfig(vocab_size=vocab, n_layers=2, block=BlockConfig(**block), ctx_len=ctx)).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.dim() > 1 else 0.1) + (1.0 if p.dim() == 1 else 0))
    return model


def outputs(model: ThinkerLM, rows: int, threads: int) -> list[torch.Tensor]:
    """On `threads` threads: a prefill of 16 positions (the per-position work split over the threads too), then
    each row's prefill (5 + row positions from column row), then 3 decode steps, each as logits and as greedy ids
    (the full argmax, and the int8 screen's ids where the head is float32)."""
    views = [native_model(model, "c", False, None)[0]]
    screen = greedy_head(model)
    if screen is not None:
        views.append(native_model(model, "c", False, screen)[0])
    cache = model.new_cache(rows, 24)
    sessions = [NativeSession(view, cache.k, cache.v, positions=16, threads=threads) for view in views]
    g = torch.Generator().manual_seed(1)
    d, vocab = model.cfg.block.d_model, model.cfg.vocab_size
    first = torch.arange(rows)
    out = []
    with torch.inference_mode():
        long = torch.randn(16, d, generator=g)
        out.append(sessions[0].prefill(long, 0, 0, greedy=False).clone())
        out.append(cache.k[:, 0, :, :16].clone())  # every position's keys, not only the last one's logits
        for r in range(rows):
            embeds = torch.randn(5 + r, d, generator=g)
            out.append(sessions[0].prefill(embeds, r, r, greedy=False).clone())
            out += [s.prefill(embeds, r, r, greedy=True).clone() for s in sessions]
        for pos in (10, 11, 12):
            tokens = torch.randint(3, vocab, (rows,), generator=g)
            out.append(sessions[0].step(tokens, pos, first, greedy=False).clone())
            out += [s.step(tokens, pos, first, greedy=True).clone() for s in sessions]
    return out


@needs_c
@pytest.mark.usefixtures("one_thread")  # torch's own threads (the int4 quantizer's) spin on a loaded machine
@pytest.mark.parametrize("rows", (1, 4))
@pytest.mark.parametrize("method", (None, "int8", "int4"))
@pytest.mark.parametrize("name", MODELS)
def test_numbers_are_identical_on_any_thread_count(name: str, method: str | None, rows: int) -> None:
    model = thinker(name)
    if method:
        quantize_linears(model, method)
    alone = outputs(model, rows, 1)
    assert alone[0].std() > 0.1  # real logits
    for threads in (2, 3, 8):  # 8: more threads than any region has chunks
        got = outputs(model, rows, threads)
        assert all(torch.equal(a, b) for a, b in zip(got, alone, strict=True)), threads


def step_workers() -> int:
    """Live threads of this process that are C step workers (step.c names them muomni-step)."""
    tasks = Path("/proc/self/task")
    return sum((t / "comm").read_text().strip() == "muomni-step" for t in tasks.iterdir())


@needs_c
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through Linux's /proc")
def test_a_sessions_workers_start_once_serve_every_step_and_end_with_it() -> None:
    """200 greedy steps on 3 threads (the same ids as on 1): 2 workers started with the session, no more after
    the steps, none left once the session and its model are freed."""
    model = thinker("some-threads-idle", ctx=256)
    native, _ = native_model(model, "c", False, None)
    before = step_workers()

    def run(threads: int) -> tuple[list[int], NativeSession]:
        cache = model.new_cache(1, 201)
        session = NativeSession(native, cache.k, cache.v, threads=threads)
        token, ids = torch.tensor([5]), []
        with torch.inference_mode():
            for pos in range(200):
                token = session.step(token, pos, None, greedy=True).clone()
                ids.append(int(token))
        return ids, session

    want, _ = run(1)
    got, session = run(3)
    assert got == want and step_workers() == before + 2
    del session, native, model
    gc.collect()
    assert step_workers() == before


@needs_c
def test_the_step_runs_on_torchs_thread_count_and_says_so() -> None:
    model = thinker("some-threads-idle")
    before = torch.get_num_threads()
    try:
        for threads, said in ((3, ", 3 threads, "), (1, ", 1 thread, ")):
            torch.set_num_threads(threads)
            slots = Slots(model, 1, 16, SamplingOptions(max_new_tokens=4))
            assert slots.native.threads == threads and said in slots.kernel, slots.kernel
    finally:
        torch.set_num_threads(before)


def test_physical_cores_count_each_core_of_the_allowed_cpus_once(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Two packages of two cores with two hardware threads each (CPUs 0-7), CPU 9 without topology files."""
    for cpu in range(8):
        topology = tmp_path / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text(f"{cpu // 4}\n")
        (topology / "core_id").write_text(f"{cpu % 2}\n")
    assert physical_cores(set(range(8)), tmp_path) == 4
    assert physical_cores({0, 2}, tmp_path) == 1  # hardware threads of one core
    assert physical_cores({0, 1, 4}, tmp_path) == 3
    assert physical_cores({0, 9}, tmp_path) == 2
    assert physical_cores() == physical_cores(os.sched_getaffinity(0))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    assert service_threads(None) == physical_cores() and service_threads(3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert service_threads(None) is None  # torch follows OMP_NUM_THREADS


@pytest.mark.parametrize("preset", (None, "ACTIVE"))
def test_importing_omni_sets_openmps_passive_wait_policy_unless_the_environment_has_one(preset: str | None) -> None:
    """A fresh process: `import omni` loads torch with OMP_WAIT_POLICY=PASSIVE, or with the caller's policy."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    code = "import os, sys, omni; assert 'torch' in sys.modules; print(os.environ['OMP_WAIT_POLICY'])"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (preset or "PASSIVE")
