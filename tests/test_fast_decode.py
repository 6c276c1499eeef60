"""The fast decode paths against plain computation: greedy ids of the KV-cached causal decode (batch 1 and
left-padded batches, fused q/k/v and gate/up) equal a full causal forward recomputed at every step; bfloat16,
int8 and int4 agree with float32 on trained weights (top-1 >= 97%, logits close), and a broken quantizer
fails the same measure. Trained weights: the demo thinker in checkpoints/demo (part of the repository) and,
when ../shared is present, the μOmni fixture's `*_causal` ids. No timing assertions."""
from __future__ import annotations

import copy

import pytest
import torch

from models.layers import fuse_linears
from utils.base.options import SamplingOptions
from utils.engine.generation import forced_logits, generate, generate_batch
from utils.weights.quant import Int4Linear, Int8Linear, quantize_linears

from tests import forkserver
from tests.conftest import DEMO, REPO, c_step_param

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ("What is 3 plus 4?", "Once upon a time there was", "Describe what you see concisely.",
           "The cat sat on the", "Name a colour.")
STEPS = 40
# Bounds on the relative RMS distance of a decode step's logits from float32's, per method: measured on the
# demo thinker 0.005 (bfloat16), 0.007 (int8), 0.030 (int4), with a margin of about 3x.
LOGIT_DISTANCE = {"bfloat16": 0.015, "int8": 0.02, "int4": 0.1}


@pytest.fixture(scope="module")
def demo():
    from omni import load_model
    return load_model(DEMO, device="cpu")


def prompt_ids(model, text: str) -> list[int]:
    return model.parts.tokenizer.prompt_ids(text)


def full_forward_greedy(thinker, ids: list[int], steps: int) -> list[int]:
    """Greedy ids by a full causal forward over the whole sequence at every step: no cache, no fast path."""
    seq = list(ids)
    with torch.inference_mode():
        for _ in range(steps):
            logits = thinker(thinker.tok_emb(torch.tensor([seq])))[0, -1]
            seq.append(int(logits.argmax()))
    return seq[len(ids):]


def embed(thinker, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return thinker.tok_emb(torch.tensor(ids))


@pytest.mark.parametrize("kernel", (c_step_param(), "torch"))
def test_fast_causal_decode_equals_full_forward(kernel, demo) -> None:
    thinker = demo.parts.thinker
    opts = SamplingOptions(max_new_tokens=STEPS, ignore_eos=True, decode_attention="causal", decode_kernel=kernel)
    ids = [prompt_ids(demo, p) for p in PROMPTS]
    want = [full_forward_greedy(thinker, i, STEPS) for i in ids]
    single = [list(generate(thinker, embed(thinker, i)[None], opts, i)) for i in ids]
    assert single == want
    assert generate_batch(thinker, [embed(thinker, i) for i in ids], ids, opts) == want
    assert len({tuple(w) for w in want}) == len(want)  # the rows really differ


def test_fused_projections_equal_separate_ones(demo) -> None:
    attn, mlp = demo.parts.thinker.blocks[0].attn, demo.parts.thinker.blocks[0].mlp
    x = torch.randn(3, attn.q.in_features, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        fused = fuse_linears([attn.q, attn.k, attn.v])
        torch.testing.assert_close(fused(x), torch.cat([attn.q(x), attn.k(x), attn.v(x)], -1))
        for cls in (Int8Linear, Int4Linear):
            parts = [cls.from_linear(m) for m in (mlp.gate_proj, mlp.up_proj)]
            got = fuse_linears(parts)(x)
            assert torch.equal(got, torch.cat([p(x) for p in parts], -1)), cls.__name__


def decode_logits(thinker, ids: list[int], continuation: list[int], kernel: str = "auto") -> torch.Tensor:
    """The logits of each decode step (prefill, then one cached step per token of `continuation`):
    teacher-forced, so one early disagreement does not change every later step."""
    opts = SamplingOptions(max_new_tokens=len(continuation) + 1, decode_attention="causal", decode_kernel=kernel)
    return forced_logits(thinker, embed(thinker, ids).to(thinker.tok_emb.weight.dtype), continuation, opts)


def agreement(reference, candidate, demo, kernel: str = "auto") -> tuple[float, float]:
    """(top-1 agreement, worst relative RMS logit distance) of `candidate` (decoded with `kernel`) with
    `reference` over the float32 greedy continuations of PROMPTS."""
    agree = total = 0
    worst = 0.0
    opts = SamplingOptions(max_new_tokens=STEPS, ignore_eos=True, decode_attention="causal")
    for text in PROMPTS:
        ids = prompt_ids(demo, text)
        cont = list(generate(reference, embed(reference, ids)[None], opts, ids))
        a, b = decode_logits(reference, ids, cont[:-1]), decode_logits(candidate, ids, cont[:-1], kernel)
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += a.shape[0]
        worst = max(worst, float((a - b).pow(2).mean().sqrt() / a.pow(2).mean().sqrt()))
    return agree / total, worst


@pytest.mark.parametrize("method,kernel", (("bfloat16", "torch"), c_step_param("int8"), ("int8", "torch"),
                                           c_step_param("int4"), ("int4", "torch")))
def test_quantized_decode_agrees_with_float32(method, kernel, demo) -> None:
    reference = demo.parts.thinker
    candidate = copy.deepcopy(reference)
    if method == "bfloat16":
        candidate.to(torch.bfloat16)
    else:
        assert "blocks.0.attn.q" in quantize_linears(candidate, method)
    top1, distance = agreement(reference, candidate, demo, kernel)
    assert top1 >= 0.97, (method, top1)
    assert distance <= LOGIT_DISTANCE[method], (method, distance)


def test_a_broken_quantizer_fails_the_agreement_measure(demo) -> None:
    """Positive control: int8 weights whose per-channel scales are off (rotated by one channel) must fail."""
    candidate = copy.deepcopy(demo.parts.thinker)
    quantize_linears(candidate, "int8")
    with torch.no_grad():
        for m in candidate.modules():
            if isinstance(m, Int8Linear):
                m.scale.copy_(m.scale.roll(1))
    top1, distance = agreement(demo.parts.thinker, candidate, demo)
    assert top1 < 0.97 or distance > LOGIT_DISTANCE["int8"]


@pytest.mark.parametrize("kernel", (c_step_param(), "torch"))
def test_fixture_causal_ids_through_every_fast_path(kernel, fixture_dir, expected) -> None:
    """The fixture thinker's `thinker_greedy_16_causal` ids (a full causal forward per step, computed by
    the reference's own code): batch 1, and as one row of a left-padded batch, through the C step and the
    torch step."""
    from omni import load_model
    model = load_model(fixture_dir / "thinker_tiny", device="cpu")
    thinker, ids = model.parts.thinker, expected["prompt_ids"]
    want = expected["thinker_greedy_16_causal"]
    want = want[:want.index(2)] if 2 in want else want
    opts = SamplingOptions(max_new_tokens=16, decode_attention="causal", decode_kernel=kernel)
    assert list(generate(thinker, embed(thinker, ids)[None], opts, ids)) == want
    longer = ids + ids[1:]
    got = generate_batch(thinker, [embed(thinker, longer), embed(thinker, ids)], [longer, ids], opts)
    assert got[1] == want


# ---------------------------------------------------------------- --quantize int4 and --threads in the CLI

def test_cli_quantize_int4_and_threads(tmp_path, demo) -> None:
    """`--quantize int4 --threads 1` answers with the ids the library gives for the same settings; a negative
    thread count is a usage error."""
    import json
    import sys

    from omni import load_model
    want = load_model(DEMO, device="cpu", quantize="int4").answer("What is 3 plus 4?", max_new_tokens=8)
    cmd = [sys.executable, str(REPO / "infer_chat.py"), "--ckpt_dir", str(DEMO), "--text", "What is 3 plus 4?",
           "--max_new_tokens", "8", "--json"]
    r = forkserver.run(cmd + ["--quantize", "int4", "--threads", "1"], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["token_ids"] == want.token_ids
    r = forkserver.run(cmd + ["--threads", "-1"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 2 and "--threads" in r.stderr and r.stdout == ""


def test_threads_default_is_one_unless_the_environment_says(monkeypatch) -> None:
    import torch

    from omni import set_threads
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
        torch.set_num_threads(2)
        assert set_threads(None) == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        torch.set_num_threads(2)
        assert set_threads(None) == 2  # the environment's count stands
        assert set_threads(3) == 3
    finally:
        torch.set_num_threads(before)
