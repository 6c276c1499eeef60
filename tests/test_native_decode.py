"""The C decode step (utils/engine/native/step.c) against the torch step: the same logits up to float rounding for
every block variant it takes (GQA / MHA, SwiGLU / GELU with biases, head sizes with and without the vector
path), left-padded batches, int8 weights close to float32, int4 weights giving the torch int4 step's ids; a
row's numbers independent of its batch (bit for bit); the screened greedy id equal to the full argmax; the path
reported and chosen as documented (auto, c, torch; no compiler, a failing compiler, builds for CPUs with fewer
vector instructions). The fixture's ids through it are checked in test_fast_decode.py and test_fixture.py (the
default path)."""
from __future__ import annotations

import copy
import functools
import json
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from models.layers import BlockConfig
from models.thinker import ThinkerConfig, ThinkerLM
from utils.base.errors import OmniError
from utils.base.options import SamplingOptions
from utils.engine.generation import Slots, forced_logits, generate, generate_batch
from utils.engine.native import step
from utils.engine.sampling import greedy_head
from utils.engine.native.step import NativeSession, native_model
from utils.weights.quant import Int4Linear, quantize_int8, quantize_linears

from tests import forkserver
from tests.conftest import DEMO, REPO, c_step_missing



pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(c_step_missing() is not None, reason=f"no C decode step: {c_step_missing()}")]


VARIANTS = {  # name: (BlockConfig kwargs, vocab)
    "gqa-swiglu": (dict(d_model=64, n_heads=4, n_kv_heads=2, d_ff=128), 302),  # 302: a partial tile of 4 rows
    "mha-gelu": (dict(d_model=48, n_heads=3, n_kv_heads=3, d_ff=80, fused_qkv=True, ffn="gelu"), 200),
    "odd-sizes": (dict(d_model=40, n_heads=2, n_kv_heads=1, d_ff=72), 150),  # head 20, no vector tiles
}


def thinker(name: str, seed: int = 0, ctx: int = 64) -> ThinkerLM:
    block, vocab = VARIANTS[name]
    model = ThinkerLM(ThinkerConfig(vocab_size=vocab, n_layers=2, block=BlockConfig(**block), ctx_len=ctx)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.dim() > 1 else 0.1) + (1.0 if p.dim() == 1 else 0))
    return model


def step_logits(model: ThinkerLM, kernel: str, lens=(5, 9, 7), steps: int = 6, seed: int = 3) -> torch.Tensor:
    """Logits (steps + 1, B, V) of a left-padded batch: the prefill, then `steps` teacher-forced decode steps."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.cfg.vocab_size
    rows = [torch.randint(3, vocab, (n,), generator=g) for n in lens]
    fed = torch.randint(3, vocab, (steps, len(lens)), generator=g)
    opts = SamplingOptions(max_new_tokens=steps + 1, decode_kernel=kernel)
    with torch.inference_mode():
        longest = max(lens)
        dec = Slots(model, len(rows), longest + steps, opts, longest=longest)
        assert dec.kernel.split(" (")[0] == kernel
        for r in rows:  # slot b holds rows[b] (the 9-position row shifts the 5-position one)
            dec.place(len(r), steps)
        out = [torch.cat([dec.prefill(b, model.tok_emb(r)).clone() for b, r in enumerate(rows)])]
        out += [dec.step(t).clone() for t in fed]
    return torch.stack([o.float() for o in out])


@pytest.mark.parametrize("name", VARIANTS)
def test_c_logits_equal_torch_logits(name: str) -> None:
    model = thinker(name)
    want, got = step_logits(model, "torch"), step_logits(model, "c")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert want[1:].std() > 0.1  # real logits, not a degenerate case


@pytest.mark.parametrize("name", VARIANTS)
def test_c_int8_is_as_close_to_float32_as_the_torch_int8_step(name: str) -> None:
    """int8 weights: the C step (activations quantized per row to int8) is about as far from the float32 logits
    as the torch step (bfloat16 activations) on the same int8 weights (these random weights are harsher than
    trained ones: test_fast_decode.py holds both to >= 97% top-1 on the demo thinker)."""
    model = thinker(name)
    want = step_logits(model, "torch")
    quantized = copy.deepcopy(model)
    quantize_linears(quantized, "int8")

    def distance(kernel: str) -> float:
        got = step_logits(quantized, kernel)
        return float((got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt())
    c, torch_step = distance("c"), distance("torch")
    assert 0 < c < 0.08 and c <= 1.3 * torch_step + 0.005, (c, torch_step)


@pytest.mark.parametrize("method", (None, "int8", "int4"))
@pytest.mark.parametrize("name", ("gqa-swiglu", "mha-gelu"))
def test_a_rows_numbers_do_not_depend_on_its_batch(name: str, method: str | None) -> None:
    """Bit for bit: each row of batches of 1..8 rows (different first columns) equals the row decoded alone
    (int4: the gqa-swiglu blocks; mha-gelu's inner sizes are no multiples of 32 and stay float32)."""
    model = thinker(name)
    if method:
        assert bool(quantize_linears(model, method)) == (method != "int4" or name == "gqa-swiglu")
    native, _ = native_model(model, "c", False, None)
    tokens, firsts = [7, 11, 13, 17, 19, 23, 29, 31], [0, 3, 1, 0, 2, 5, 0, 1]
    g = torch.Generator().manual_seed(1)
    cache0 = model.new_cache(1, 32)
    k0, v0 = torch.randn(cache0.k.shape, generator=g), torch.randn(cache0.v.shape, generator=g)

    def run(rows: list[int]) -> torch.Tensor:
        cache = model.new_cache(len(rows), 32)
        cache.k.copy_(k0.expand_as(cache.k))
        cache.v.copy_(v0.expand_as(cache.v))
        session = NativeSession(native, cache.k, cache.v)
        with torch.inference_mode():
            return session.step(torch.tensor([tokens[r] for r in rows]), 20, torch.tensor([firsts[r] for r in rows]),
                                greedy=False).clone()

    alone = torch.cat([run([r]) for r in range(8)])
    for n in (2, 3, 5, 8):
        assert torch.equal(run(list(range(n))), alone[:n]), n


@pytest.mark.parametrize("method", (None, "int8"))
def test_a_long_prefill_equals_its_positions_fed_one_by_one(method: str | None) -> None:
    """A prefill of 53 positions (tiles of 6 rows, past a row block of 48) through inner sizes of 320 (past a k block
    of 256) gives, bit for bit, the logits of its positions fed one at a time (a 1-position prefill, then steps),
    on 1 and 2 threads; and torch's full forward's logits up to float rounding (float32)."""
    block = dict(d_model=64, n_heads=4, n_kv_heads=2, d_ff=320)
    model = ThinkerLM(ThinkerConfig(vocab_size=130, n_layers=2, block=BlockConfig(**block), ctx_len=64)).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if p.dim() > 1 else 0.1) + (1.0 if p.dim() == 1 else 0))
    if method:
        quantize_linears(model, method)
    native, _ = native_model(model, "c", False, None)
    ids = torch.randint(3, 130, (53,), generator=g)
    with torch.inference_mode():
        embeds = model.tok_emb(ids)
        longs = []
        for threads in (1, 2):
            cache = model.new_cache(1, 64)
            session = NativeSession(native, cache.k, cache.v, positions=53, threads=threads)
            longs.append(session.prefill(embeds, 0, 0, greedy=False).clone())
        cache = model.new_cache(1, 64)
        session = NativeSession(native, cache.k, cache.v, positions=1)
        fed = session.prefill(embeds[:1], 0, 0, greedy=False)
        for pos in range(1, 53):
            fed = session.step(ids[pos:pos + 1], pos, torch.zeros(1, dtype=torch.long), greedy=False)
        assert torch.equal(longs[0], fed) and torch.equal(longs[1], fed)
        if method is None:
            torch.testing.assert_close(longs[0].reshape(-1), model(embeds[None])[0, -1], rtol=1e-4, atol=1e-4)


def test_c_int4_equals_the_torch_int4_step_on_the_demo() -> None:
    """int4 weights (the demo thinker, `--quantize int4`): the C step (activations quantized per group of 32 to
    int8) gives the torch step's greedy ids (bfloat16 activations, torch's int4 kernel) on the same weights,
    alone and batched, and logits within 2% relative RMS of its teacher-forced ones (measured 0.7%)."""
    from omni import load_model
    model = load_model(DEMO, device="cpu", quantize="int4")
    thinker_ = model.parts.thinker
    assert "blocks.0.mlp.down_proj" in {n for n, m in thinker_.named_modules() if isinstance(m, Int4Linear)}
    prompts = [model.parts.tokenizer.prompt_ids(p) for p in ("What is 3 plus 4?", "Once upon a time there was",
                                                             "Name a colour.")]
    with torch.inference_mode():
        embeds = [thinker_.tok_emb(torch.tensor(ids)) for ids in prompts]
    got = {}
    for kernel in ("c", "torch"):
        opts = SamplingOptions(max_new_tokens=24, ignore_eos=True, decode_kernel=kernel)
        single = [list(generate(thinker_, e[None], opts, ids)) for e, ids in zip(embeds, prompts)]
        assert generate_batch(thinker_, embeds, prompts, opts) == single
        got[kernel] = single
    assert got["c"] == got["torch"]
    for kernel in ("c", "torch"):
        opts = SamplingOptions(max_new_tokens=24, decode_kernel=kernel)
        got[kernel] = forced_logits(thinker_, embeds[1], got["torch"][1][:-1], opts)
    distance = (got["c"] - got["torch"]).pow(2).mean().sqrt() / got["torch"].pow(2).mean().sqrt()
    assert 0 < float(distance) < 0.02 and torch.equal(got["c"].argmax(-1), got["torch"].argmax(-1))


def test_screened_greedy_equals_the_full_argmax() -> None:
    """A vocabulary large enough for the int8 screen: the C step's greedy ids equal the argmax of its own full
    logits at every step, and the torch step's ids."""
    block = BlockConfig(d_model=64, n_heads=4, n_kv_heads=2, d_ff=128)
    model = ThinkerLM(ThinkerConfig(vocab_size=4096, n_layers=2, block=block, ctx_len=128)).eval()
    ids = list(range(3, 20))
    x = model.tok_emb(torch.tensor(ids))[None].detach()
    screen = greedy_head(model)
    assert screen is not None
    opts = SamplingOptions(max_new_tokens=60, ignore_eos=True)
    with torch.inference_mode():
        dec = Slots(model, 1, x.shape[1] + 60, opts, screen=screen)
        full = Slots(model, 1, x.shape[1] + 60, opts)  # no screen: logits
        token = dec.prefill(dec.place(x.shape[1], 59), x[0]).argmax(-1)
        full.prefill(full.place(x.shape[1], 59), x[0])
        for _ in range(59):
            want = full.step(token).argmax(-1)
            token = dec.step(token, greedy=True).clone()
            assert torch.equal(token, want)
    fast = list(generate(model, x, opts))
    assert fast == list(generate(model, x, SamplingOptions(**{**opts.__dict__, "decode_kernel": "torch"})))


def test_paths_are_chosen_and_reported() -> None:
    model = thinker("gqa-swiglu")
    assert native_model(model, "auto", False, None)[1].startswith("c (")
    assert native_model(model, "torch", False, None) == (None, "torch (asked for)")
    assert native_model(model, "auto", True, None) == (None, "torch (the reference decode mode)")
    with pytest.raises(OmniError, match="--decode_kernel c: .*reference decode mode"):
        native_model(model, "c", True, None)
    moe = ThinkerLM(ThinkerConfig(vocab_size=50, n_layers=1, ctx_len=16, block=BlockConfig(
        d_model=32, n_heads=2, n_kv_heads=2, d_ff=32, num_experts=2)))
    assert native_model(moe, "auto", False, None) == (None, "torch (mixture-of-experts blocks)")
    half = copy.deepcopy(model).to(torch.bfloat16)
    assert "torch.bfloat16" in native_model(half, "auto", False, None)[1]
    int4 = copy.deepcopy(model)
    quantize_linears(int4, "int4")
    kernel = native_model(int4, "auto", False, None)[1]
    assert re.match(r"c \([\w-]+, int4 (avx2|generic), 1 thread, ", kernel), kernel
    assert ", int4 " not in native_model(model, "auto", False, None)[1]
    coarse = copy.deepcopy(model)
    coarse.blocks[0].attn.o = Int4Linear.from_linear(coarse.blocks[0].attn.o, group=64)
    assert native_model(coarse, "auto", False, None) == (
        None, "torch (block 0: int4 groups of 64 (the C step takes 32))")


def test_new_weights_rebuild_the_c_view() -> None:
    """Changing a weight in place between generations is seen (the C view is rebuilt, never stale)."""
    model = thinker("gqa-swiglu")
    before = step_logits(model, "c")
    with torch.no_grad():
        model.blocks[0].mlp.down_proj.weight.mul_(-1)
    after = step_logits(model, "c")
    assert not torch.allclose(before[1:], after[1:])
    torch.testing.assert_close(after, step_logits(model, "torch"), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- the CLI, and builds in other environments

def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return forkserver.run([sys.executable, str(REPO / "infer_chat.py"), "--ckpt_dir", str(DEMO), *args],
                          capture_output=True, text=True, timeout=180, cwd=REPO, env={**os.environ, **(env or {})})


def test_cli_reports_the_decode_kernel() -> None:
    q = ("--text", "What is 3 plus 4?", "--json")
    auto = json.loads(cli(*q).stdout)
    torch_step = json.loads(cli(*q, "--decode_kernel", "torch").stdout)
    assert auto["timing"]["decode_kernel"].startswith("c (")
    assert torch_step["timing"]["decode_kernel"] == "torch (asked for)"
    assert auto["token_ids"] == torch_step["token_ids"] and auto["text"] == "7"
    verbose = cli("--text", "What is 3 plus 4?", "--verbose", "--decode_kernel", "c", "--threads", "2")
    assert verbose.returncode == 0 and re.search(r"decode kernel = c \([\w-]+, 2 threads, ", verbose.stderr)
    assert "\n7\n" in f"\n{verbose.stdout}"  # the same answer on 2 threads
    bad = cli("--text", "hi", "--decode_kernel", "c", "--decode_attention", "reference")
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.strip().splitlines()[-1].startswith("error: --decode_kernel c: ")
    usage = cli("--text", "hi", "--decode_kernel", "fast")
    assert usage.returncode == 2 and "--decode_kernel/--decode-kernel: 'fast' must be one of auto, c, torch" in usage.stderr


def test_without_a_compiler_torch_runs_and_says_why(tmp_path: Path) -> None:
    env = {"CC": str(tmp_path / "no-such-cc"), "MUOMNI_CACHE_DIR": str(tmp_path / "cache")}
    ans = cli("--text", "What is 3 plus 4?", "--json", env=env)
    assert ans.returncode == 0, ans.stderr
    out = json.loads(ans.stdout)
    assert out["text"] == "7" and out["timing"]["decode_kernel"].startswith("torch (no C compiler")
    strict = cli("--text", "What is 3 plus 4?", "--decode_kernel", "c", env=env)
    assert strict.returncode == 1 and "error: --decode_kernel c: the C decode step cannot run here: no C compiler" \
        in strict.stderr


def test_a_failing_compiler_leaves_nothing_behind(tmp_path: Path) -> None:
    cc = tmp_path / "cc"
    cc.write_text("#!/bin/sh\n[ \"$1\" = --version ] && { echo broken-cc 1.0; exit 0; }\necho 'boom: no' >&2\nexit 1\n")
    cc.chmod(0o755)
    cache = tmp_path / "cache"
    ans = cli("--text", "What is 3 plus 4?", "--json", env={"CC": str(cc), "MUOMNI_CACHE_DIR": str(cache)})
    out = json.loads(ans.stdout)
    assert out["text"] == "7"
    assert out["timing"]["decode_kernel"] == "torch (the C compiler failed on step.c: boom: no)"
    assert list(cache.iterdir()) == []  # no partial library


def cpu_has(flag: str) -> bool:
    try:
        return f" {flag} " in Path("/proc/cpuinfo").read_text() + " "
    except OSError:
        return False


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="builds for other x86-64 CPUs")
@pytest.mark.parametrize("flags,features", [
    ("-march=x86-64-v2", "generic"),  # the portable C path, what a CPU without AVX2 runs
    pytest.param("-mno-avx512f", "avx2", marks=pytest.mark.skipif(
        not (cpu_has("avx2") and cpu_has("fma")), reason="this CPU has no AVX2 + FMA")),  # 256-bit panels and tiles
    pytest.param("-mno-avx512vnni", "avx512+avx2", marks=pytest.mark.skipif(
        not cpu_has("avx512f"), reason="this CPU has no AVX-512")),  # float32 panels in AVX-512, int8 tiles in AVX2
])
def test_builds_for_other_cpus_give_the_same_answers(flags: str, features: str, tmp_path: Path, fixture_dir: Path,
                                                    expected: dict) -> None:
    """The C step built for a CPU with fewer vector instructions: the fixture's causal ids, the same int8 ids as
    this build (int8 sums are exact in every path), the same int4 ids, and the build says which paths it has."""
    env = {"MUOMNI_CFLAGS": flags, "MUOMNI_CACHE_DIR": str(tmp_path / "cache")}
    code = ("import json, sys; from omni import load_model\n"
            "def ask(**load):\n"
            "    a = load_model(sys.argv[1], device='cpu', **load).answer(sys.argv[2], max_new_tokens=16, "
            "decode_kernel='c')\n"
            "    return [a.token_ids, a.timing['decode_kernel']]\n"
            "print(json.dumps([ask(), ask(quantize='int8'), ask(quantize='int4')]))")
    run = [sys.executable, "-c", code, str(fixture_dir / "thinker_tiny"), expected["prompt"]]
    done = forkserver.run(run, capture_output=True, text=True, timeout=180, cwd=REPO, env={**os.environ, **env})
    assert done.returncode == 0, done.stderr
    (ids, kernel), (int8_ids, _), (int4_ids, int4_kernel) = json.loads(done.stdout)
    want = expected["thinker_greedy_16_causal"]
    assert ids == (want[:want.index(2)] if 2 in want else want)
    assert kernel.startswith(f"c ({features}, ")
    portable = "generic" if flags == "-march=x86-64-v2" else "avx2"  # the int4 kernel (no AVX-512 one)
    assert int4_kernel.startswith(f"c ({features}, int4 {portable}, ")
    here = json.loads(forkserver.run(run, capture_output=True, text=True, timeout=180, cwd=REPO).stdout)
    assert here[1][0] == int8_ids
    assert here[2][0] == int4_ids  # int4: float sums in another order, the same ids on this trained thinker


# ---------------------------------------------------------------- greedy ids: ties, NaN, the screen's near-ties

def random_step(model: ThinkerLM, rows: int, seed: int) -> tuple[object, torch.Tensor, torch.Tensor]:
    """A seeded random cache of `rows` rows, their input tokens and first columns (rows start at different
    columns), the same for the C and the torch step."""
    g = torch.Generator().manual_seed(seed)
    cache = model.new_cache(rows, 32)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    return cache, torch.randint(3, model.cfg.vocab_size, (rows,), generator=g), torch.arange(rows) % 4


def decode_rows(model: ThinkerLM, screen=None, rows: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """One C decode step of `rows` rows over a random cache (rows starting at different columns): (the greedy
    ids (rows,), the full logits (rows, V)) of the same step."""
    native, _ = native_model(model, "c", False, screen)
    cache, tokens, first = random_step(model, rows, seed)
    out = []
    for greedy in (True, False):
        session = NativeSession(native, cache.k, cache.v)
        with torch.inference_mode():
            out.append(session.step(tokens, 20, first, greedy=greedy).clone())
    return out[0], out[1]


def torch_hidden(model: ThinkerLM, rows: int = 8, seed: int = 1) -> torch.Tensor:
    """The normed hidden states (rows, d) of `decode_rows`'s step, through the torch step."""
    cache, tokens, first = random_step(model, rows, seed)
    rot = model.rotary
    cos, rot_sin = rot.cos[20 - first][:, None], rot.rot_sin[20 - first][:, None]
    mask = (torch.arange(21)[None] >= first[:, None])[:, None, None]
    with torch.inference_mode():
        return model.decode_hidden(model.embed_step(tokens), 20, cache, cos, rot_sin, mask)


@pytest.mark.parametrize("vocab", (300, 4096))  # the full projection's argmax; the int8 screen's rescoring
def test_c_greedy_ties_give_the_lowest_id_as_torch_argmax(vocab: int) -> None:
    """The head makes ids 5 and 9 score 30 h_c and ids 6 and 10 score -30 h_c (all others 0), exactly, for a
    coordinate c of the normed hidden state whose sign differs between rows: every row's best score is a tie,
    at 5 for some rows and at 6 for others; the C greedy id is the lowest of the tie, as torch.argmax of its own
    logits."""
    model = ThinkerLM(ThinkerConfig(vocab_size=vocab, n_layers=2, ctx_len=64, block=BlockConfig(
        d_model=64, n_heads=4, n_kv_heads=2, d_ff=128))).eval()
    with torch.no_grad():
        model.norm.weight.fill_(10.0)  # |h_c| well above the screen's bound
        h = torch_hidden(model)
        c = int(((h > 1).any(0) & (h < -1).any(0)).nonzero()[0])
        w = model.lm_head.weight
        w.zero_()
        w[[5, 9], c], w[[6, 10], c] = 30.0, -30.0
    screen = greedy_head(model) if vocab >= 1024 else None
    assert (screen is not None) == (vocab >= 1024)
    ids, logits = decode_rows(model, screen)
    assert torch.equal(logits[:, 5], logits[:, 9]) and torch.equal(logits[:, 6], logits[:, 10])
    want = logits.argmax(-1)
    assert set(want.tolist()) == {5, 6}  # both ties occur
    assert torch.equal(ids, want)


def test_c_greedy_with_nan_logits_picks_what_torch_argmax_picks() -> None:
    """Id 7's head row is (inf, inf, 0, ...): its score is NaN where h_0 and h_1 have opposite signs, +-inf
    elsewhere. torch.argmax takes the first NaN; the C greedy id does the same, and the other rows' ids are
    their argmax as before."""
    model = thinker("gqa-swiglu")
    with torch.no_grad():
        model.lm_head.weight[7, :2] = float("inf")
    ids, logits = decode_rows(model)
    nan_rows = logits.isnan().any(-1)
    assert nan_rows.any() and not nan_rows.all()
    assert logits[nan_rows].isnan().sum(-1).eq(1).all()  # id 7 only
    finite_best = logits.nan_to_num(nan=float("-inf")).argmax(-1)
    assert not torch.equal(finite_best[nan_rows], torch.full_like(finite_best[nan_rows], 7))  # NaN decides
    assert torch.equal(ids, logits.argmax(-1))


def test_screen_near_tie_is_decided_by_the_exact_scores() -> None:
    """Ids 1000 and 3000 share their int8 screen row exactly (row 1000 on the int8 grid, 3000 = 1000 + delta e_j
    with delta a quarter of the row's step): their screened scores tie, and only the exact rescoring tells them
    apart (3000 wins where h_j > 0, 1000 where h_j < 0). The C greedy id equals the full projection's argmax on
    every row."""
    model = ThinkerLM(ThinkerConfig(vocab_size=4096, n_layers=2, ctx_len=64, block=BlockConfig(
        d_model=64, n_heads=4, n_kv_heads=2, d_ff=128))).eval()
    h = torch_hidden(model)
    u = (h / h.norm(dim=-1, keepdim=True)).sum(0)
    q, scale = quantize_int8((5 * u / u.norm())[None])
    u = q[0].float() * scale[0]  # on the int8 grid: a quarter step more rounds back to it
    assert (h @ u).min() > 1.0  # ids 1000 and 3000 lead every row
    j = int(((h > 0.3).any(0) & (h < -0.3).any(0) & (u.abs() < 0.5 * u.abs().max())).nonzero()[0])
    with torch.no_grad():
        w = model.lm_head.weight
        w.normal_(0, 0.02, generator=torch.Generator().manual_seed(2))
        w[1000] = u
        w[3000] = u
        w[3000, j] += float(u.abs().max()) / 127 / 4
    q, scale = quantize_int8(w[[1000, 3000]])
    assert torch.equal(q[0], q[1]) and torch.equal(scale[0], scale[1])  # one screen row for both
    ids, logits = decode_rows(model, greedy_head(model))
    want = logits.argmax(-1)
    assert set(want.tolist()) == {1000, 3000}
    assert torch.equal(ids, want)


# ---------------------------------------------------------------- the library: ABI check, stale builds

@dataclass
class FreshCache:
    path: Path  # MUOMNI_CACHE_DIR, empty (not yet created)
    compiles: list[str]  # the outputs of the compiler's runs since


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FreshCache:
    """An empty MUOMNI_CACHE_DIR for this test, and a record of the compiler's runs."""
    cache = FreshCache(tmp_path / "cache", [])
    monkeypatch.setenv("MUOMNI_CACHE_DIR", str(cache.path))
    real = step.compile_library

    def counted(tools: step.Toolchain, out: str) -> str | None:
        cache.compiles.append(out)
        return real(tools, out)
    monkeypatch.setattr(step, "compile_library", counted)
    return cache


@pytest.mark.parametrize("change", ("version", "layout"))
def test_a_library_of_another_abi_is_rebuilt_once_then_refused(fresh_cache: FreshCache, change: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """step.py expecting another ABI version, or another struct layout (as if a field had moved): the cached
    build is rebuilt once, still disagrees, is not used (torch runs and says why; decode_kernel c is an error
    naming it), and the cache keeps only the first build."""
    lib, detail = step.load_library()
    assert lib is not None and detail.startswith("c (")
    first = sorted(p.name for p in fresh_cache.path.iterdir())
    if change == "version":
        monkeypatch.setattr(step, "ABI_VERSION", step.ABI_VERSION + 1)
        why = f"it speaks ABI {step.ABI_VERSION - 1}, step.py ABI {step.ABI_VERSION}"
    else:
        layout = step.struct_layout()
        moved = [(what, at + 4) if what == "_Model.eps" else (what, at) for what, at in layout]
        monkeypatch.setattr(step, "struct_layout", lambda: moved)
        at = dict(layout)["_Model.eps"]
        why = f"_Model.eps is {at} there, {at + 4} in step.py"
    del fresh_cache.compiles[:]
    lib, reason = step.load_library()
    assert lib is None and why in reason and "does not match step.py" in reason
    assert len(fresh_cache.compiles) == 1
    assert sorted(p.name for p in fresh_cache.path.iterdir()) == first
    monkeypatch.setattr(step, "library", functools.cache(step.load_library))
    model = thinker("gqa-swiglu")
    assert native_model(model, "auto", False, None) == (None, f"torch ({reason})")
    with pytest.raises(OmniError, match=re.escape(f"--decode_kernel c: the C decode step cannot run here: {reason}")):
        native_model(model, "c", False, None)


def test_a_foreign_library_at_the_build_path_is_rebuilt(fresh_cache: FreshCache, tmp_path: Path) -> None:
    """A file at the build's path that is not this step.c's build (here a library whose mu_abi says 0) is
    replaced by a rebuild, which is then used."""
    tools = step.toolchain()
    fresh_cache.path.mkdir()
    foreign = tmp_path / "foreign.c"
    foreign.write_text("#include <stdint.h>\nint32_t mu_abi(int32_t *layout, int32_t n) { return 0; }\n")
    subprocess.run([tools.exe, "-shared", "-fPIC", "-o", str(tools.target), str(foreign)], check=True)
    before = tools.target.read_bytes()
    lib, detail = step.load_library()
    assert lib is not None and detail.startswith("c (") and len(fresh_cache.compiles) == 1
    assert step.abi_mismatch(lib) is None and tools.target.read_bytes() != before


def test_a_new_build_removes_stale_builds_and_keeps_foreign_files(fresh_cache: FreshCache) -> None:
    """Writing a build removes this toolchain's builds of other step.c versions and the earlier naming's
    builds; builds for other toolchains, temporary files and every file not of our naming stay."""
    tools = step.toolchain()
    toolchain_key = step.BUILD_NAME.fullmatch(tools.target.name)[1]
    stale = [f"decode_step-{toolchain_key}-{'0' * 12}.so", f"native_decode-{'a1' * 10}.so"]
    kept = [f"decode_step-{'f' * 12}-{'0' * 12}.so",  # another compiler / flags / CPU
            ".decode_step-x1y2.so",                    # another process's build in progress
            "decode_step-notes.so", "native_decode.so", "step.so", "notes.txt"]
    fresh_cache.path.mkdir()
    for name in stale + kept:
        (fresh_cache.path / name).write_bytes(b"not ours to judge")
    lib, _ = step.load_library()
    assert lib is not None and len(fresh_cache.compiles) == 1
    assert sorted(p.name for p in fresh_cache.path.iterdir()) == sorted([*kept, tools.target.name])
