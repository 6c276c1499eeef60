"""Generation: batched == one-by-one, KV-cached == full recompute, the reference decode rule, sampling,
bfloat16 / int8 paths and the exact int8-screened greedy argmax. No timing assertions."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import utils.engine.generation as gen
import utils.engine.sampling as sampling
from models.layers import BlockConfig
from models.thinker import ThinkerConfig, ThinkerLM
from utils.base.options import SamplingOptions
from utils.engine.generation import Slots, generate, generate_batch
from utils.weights.quant import GreedyHead, Int8Linear, PackedInt8Weight, quantize_int8, quantize_linears

pytestmark = pytest.mark.usefixtures("one_thread")

MODES = ("reference", "causal")
PROMPT_LENS = (5, 1, 9, 3, 12)


def tiny_thinker(seed: int = 0, mha: bool = False, moe: bool = False, vocab: int = 97, d: int = 32,
                 ctx: int = 64) -> ThinkerLM:
    block = BlockConfig(d_model=d, n_heads=4, n_kv_heads=4 if mha else 2, d_ff=2 * d, fused_qkv=mha,
                        num_experts=4 if moe else 0)
    model = ThinkerLM(ThinkerConfig(vocab_size=vocab, n_layers=2, block=block, ctx_len=ctx)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.1) + (1.0 if p.dim() == 1 else 0))
    return model


def prompts(model: ThinkerLM, lens=PROMPT_LENS, seed: int = 1) -> tuple[list[torch.Tensor], list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    ids = [[1] + torch.randint(3, model.cfg.vocab_size, (n - 1,), generator=g).tolist() for n in lens]
    with torch.no_grad():
        embeds = [model.tok_emb(torch.tensor(i)) for i in ids]
    return embeds, ids


def one_by_one(model, embeds, ids, opts) -> list[list[int]]:
    return [list(generate(model, e[None], opts, i)) for e, i in zip(embeds, ids)]


def filled_slots(model, embeds, opts, steps: int) -> tuple[Slots, torch.Tensor]:
    """Slots holding one row per prompt, slot b = embeds[b] (placed in that order: a longer prompt after a
    shorter one shifts the rows), prefilled; returns them and the prefill logits (B, V). Step outputs are views
    the next step overwrites (with the C step): read them before stepping again."""
    longest = max(e.shape[0] for e in embeds)
    slots = Slots(model, len(embeds), 2 * longest + steps, opts, longest=longest)
    for e in embeds:
        slots.place(e.shape[0], steps)
    return slots, torch.cat([slots.prefill(b, e).clone() for b, e in enumerate(embeds)])


# ---------------------------------------------------------------- batched == batch 1

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", ["gqa", "mha", "moe"])
def test_batch_equals_single_greedy(mode: str, arch: str) -> None:
    model = tiny_thinker(mha=arch == "mha", moe=arch == "moe")
    embeds, ids = prompts(model)
    opts = SamplingOptions(max_new_tokens=10, decode_attention=mode, ignore_eos=True)
    single = one_by_one(model, embeds, ids, opts)
    assert generate_batch(model, embeds, ids, opts) == single
    assert all(len(s) == 10 for s in single)
    assert len({tuple(s) for s in single}) > 1  # the rows really differ


@pytest.mark.parametrize("mode", MODES)
def test_batch_equals_single_with_penalty_and_eos(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_thinker(seed=3)
    embeds, ids = prompts(model, seed=4)
    opts = SamplingOptions(max_new_tokens=12, decode_attention=mode, repetition_penalty=1.3)
    free = one_by_one(model, embeds, ids, SamplingOptions(**{**opts.__dict__, "ignore_eos": True}))
    # Make a token that some row emits mid-answer the end-of-sequence id: those rows stop early.
    monkeypatch.setattr(gen, "EOS_ID", free[0][4])
    single = one_by_one(model, embeds, ids, opts)
    assert len(single[0]) == free[0].index(free[0][4]) < 12
    assert generate_batch(model, embeds, ids, opts) == single


def test_batch_of_equal_lengths_and_single_row() -> None:
    model = tiny_thinker(seed=5)
    embeds, ids = prompts(model, lens=(6, 6, 6))
    for mode in MODES:
        opts = SamplingOptions(max_new_tokens=8, decode_attention=mode, ignore_eos=True)
        assert generate_batch(model, embeds, ids, opts) == one_by_one(model, embeds, ids, opts)
        assert generate_batch(model, embeds[:1], ids[:1], opts) == one_by_one(model, embeds[:1], ids[:1], opts)
    assert generate_batch(model, [], [], SamplingOptions()) == []


# ---------------------------------------------------------------- cache == recompute, reference rule

def full_logits(model: ThinkerLM, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(x[None], 0, None, mask=mask)[0, -1]


@pytest.mark.parametrize("arch", ["gqa", "mha"])
def test_cached_causal_decode_matches_full_recompute(arch: str) -> None:
    model = tiny_thinker(seed=7, mha=arch == "mha")
    embeds, _ = prompts(model, lens=(4, 9, 1))
    opts = SamplingOptions(max_new_tokens=8, decode_attention="causal")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        dec, logits = filled_slots(model, embeds, opts, opts.max_new_tokens)
        assert dec.shifts == 1  # the 9-position prompt came after the 4-position one
        seqs = [e.clone() for e in embeds]
        for step in range(opts.max_new_tokens):
            for b, seq in enumerate(seqs):
                torch.testing.assert_close(logits[b], full_logits(model, seq), atol=1e-4, rtol=1e-4)
            tokens = torch.randint(3, model.cfg.vocab_size, (len(seqs),), generator=g)
            seqs = [torch.cat([s, model.tok_emb(t)[None]]) for s, t in zip(seqs, tokens)]
            logits = dec.step(tokens)


def first_key_rule_logits(model: ThinkerLM, x: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """No cache, whole sequence each time: prompt positions attend causally, every generated position
    attends to position 0 only (the μOmni reference decode rule, written out as one full mask)."""
    L = x.shape[0]
    mask = torch.ones(L, L, dtype=torch.bool).tril()
    mask[prompt_len:] = False
    mask[prompt_len:, 0] = True
    return full_logits(model, x, mask[None, None])


@pytest.mark.parametrize("arch", ["gqa", "mha", "moe"])
def test_reference_decode_follows_the_first_key_rule(arch: str) -> None:
    model = tiny_thinker(seed=11, mha=arch == "mha", moe=arch == "moe")
    embeds, ids = prompts(model, lens=(7, 2, 5))
    opts = SamplingOptions(max_new_tokens=9, decode_attention="reference", ignore_eos=True)
    expected = []
    for e in embeds:
        seq, out = e.clone(), []
        for _ in range(opts.max_new_tokens):
            t = int(first_key_rule_logits(model, seq, e.shape[0]).argmax())
            out.append(t)
            with torch.no_grad():
                seq = torch.cat([seq, model.tok_emb(torch.tensor([t]))])
        expected.append(out)
    assert one_by_one(model, embeds, ids, opts) == expected
    assert generate_batch(model, embeds, ids, opts) == expected
    # and the logits themselves, through the padded batch decoder
    with torch.no_grad():
        dec, _ = filled_slots(model, embeds, opts, 1)
        logits = dec.step(torch.tensor([o[0] for o in expected]))
    for b, e in enumerate(embeds):
        with torch.no_grad():
            seq = torch.cat([e, model.tok_emb(torch.tensor([expected[b][0]]))])
        torch.testing.assert_close(logits[b], first_key_rule_logits(model, seq, e.shape[0]), atol=1e-4, rtol=1e-4)


def test_reference_and_causal_differ() -> None:
    model = tiny_thinker(seed=2)
    embeds, ids = prompts(model, lens=(8,))
    a = one_by_one(model, embeds, ids, SamplingOptions(max_new_tokens=12, decode_attention="reference",
                                                       ignore_eos=True))
    b = one_by_one(model, embeds, ids, SamplingOptions(max_new_tokens=12, decode_attention="causal",
                                                       ignore_eos=True))
    assert a != b


# ---------------------------------------------------------------- sampling

def test_seeded_sampling_is_reproducible() -> None:
    model = tiny_thinker(seed=13)
    embeds, ids = prompts(model, lens=(6,))
    opts = SamplingOptions(max_new_tokens=20, temperature=1.0, top_k=20, top_p=0.9, seed=123, ignore_eos=True)
    a = one_by_one(model, embeds, ids, opts)
    assert a == one_by_one(model, embeds, ids, opts)
    others = [one_by_one(model, embeds, ids, SamplingOptions(**{**opts.__dict__, "seed": s})) for s in (1, 2, 3)]
    assert any(o != a for o in others)
    assert generate_batch(model, embeds * 2, ids * 2, opts) == generate_batch(model, embeds * 2, ids * 2, opts)


def test_seeded_sampled_rows_do_not_depend_on_the_batch() -> None:
    """Every row has its own generator: a seeded sampled row of a batch gives the ids it gives alone."""
    model = tiny_thinker(seed=13)
    embeds, ids = prompts(model)
    opts = SamplingOptions(max_new_tokens=12, temperature=1.0, top_k=30, seed=7, ignore_eos=True)
    single = one_by_one(model, embeds, ids, opts)
    assert generate_batch(model, embeds, ids, opts) == single
    assert generate_batch(model, embeds[::-1], ids[::-1], opts) == single[::-1]
    assert len({tuple(s) for s in single}) > 1


@pytest.mark.parametrize("mode", MODES)
def test_top_k_1_equals_greedy(mode: str) -> None:
    model = tiny_thinker(seed=17)
    embeds, ids = prompts(model)
    greedy = SamplingOptions(max_new_tokens=10, decode_attention=mode, ignore_eos=True)
    topk1 = SamplingOptions(max_new_tokens=10, decode_attention=mode, ignore_eos=True, temperature=0.7, top_k=1,
                            seed=5)
    assert one_by_one(model, embeds, ids, topk1) == one_by_one(model, embeds, ids, greedy)
    assert generate_batch(model, embeds, ids, topk1) == generate_batch(model, embeds, ids, greedy)


def test_bad_options_are_refused() -> None:
    model = tiny_thinker()
    embeds, ids = prompts(model, lens=(4,))
    with pytest.raises(ValueError, match="decode_attention"):
        list(generate(model, embeds[0][None], SamplingOptions(decode_attention="sideways"), ids[0]))
    with pytest.raises(ValueError, match="context"):
        list(generate(model, embeds[0][None], SamplingOptions(max_new_tokens=model.cfg.ctx_len), ids[0]))


# ---------------------------------------------------------------- bfloat16 / int8

def test_bfloat16_int8_and_int4_paths_run_batched_as_single() -> None:
    model = tiny_thinker(seed=19)
    embeds, ids = prompts(model)
    opts = SamplingOptions(max_new_tokens=6, ignore_eos=True)
    ref = one_by_one(model, embeds, ids, opts)

    bf = copy.deepcopy(model).to(torch.bfloat16)
    bf_embeds = [e.to(torch.bfloat16) for e in embeds]
    for mode in MODES:
        o = SamplingOptions(**{**opts.__dict__, "decode_attention": mode})
        out = one_by_one(bf, bf_embeds, ids, o)
        assert [len(r) for r in out] == [6] * len(embeds)
        assert generate_batch(bf, bf_embeds, ids, o) == out

    for method in ("int8", "int4"):
        q = copy.deepcopy(model)
        names = quantize_linears(q, method)
        assert "blocks.0.attn.q" in names and "blocks.0.mlp.gate_proj" in names
        assert ("lm_head" in names) == (method == "int8")  # 97 outputs: not a shape the int4 kernel takes
        for mode in MODES:
            o = SamplingOptions(**{**opts.__dict__, "decode_attention": mode})
            out = one_by_one(q, embeds, ids, o)
            assert [len(r) for r in out] == [6] * len(embeds)
            assert generate_batch(q, embeds, ids, o) == out
        # close to float: most first tokens agree on this peaky random model
        agree = sum(a[0] == b[0] for a, b in zip(out, ref))
        assert agree >= len(ref) - 2, method


def test_int8_linear_is_close_to_linear() -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(5, 3, 64)
    with torch.no_grad():
        ref, out = lin(x), q(x)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() < 0.02 * ref.abs().max()


def test_quantize_keeps_torch_attention_layers_float() -> None:
    layer = torch.nn.TransformerEncoderLayer(32, 2, 64, batch_first=True, norm_first=True)
    seq = torch.nn.Sequential(layer, torch.nn.Linear(32, 8))
    assert quantize_linears(seq, "int8") == ["1"]
    assert type(layer.linear1) is torch.nn.Linear
    with torch.no_grad():
        assert seq.eval()(torch.randn(2, 5, 32)).shape == (2, 5, 8)


# ---------------------------------------------------------------- exact int8-screened greedy argmax

def test_greedy_head_is_the_exact_argmax() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5000, 64, generator=g) * 0.05
    head = GreedyHead(w, k=32)
    for scale in (0.1, 1.0, 10.0):
        x = torch.randn(16, 64, generator=g) * scale
        got = head.argmax(x)
        assert got is not None, f"scale {scale}: ordinary rows must be decided by the screen itself"
        assert torch.equal(got, (x @ w.t()).argmax(-1))
    # a near-tie the int8 copy may not separate: resolved exactly, or handed to the fallback (the full argmax);
    # either way the id is the exact one, never the other member of the tie
    w2 = w.clone()
    w2[7] = w2[3] * (1 + 1e-6)
    x = w2[3][None] * 50
    got = GreedyHead(w2, k=4).argmax(x, lambda rows: (rows @ w2.t()).argmax(-1))
    assert int(got) == int((x @ w2.t()).argmax()) == 7
    # exact ties go to the lowest id, as with a full argmax
    w3 = w.clone()
    w3[10] = w3[4000]
    x = w3[10][None] * 20
    got = GreedyHead(w3, k=8).argmax(x, lambda rows: (rows @ w3.t()).argmax(-1))
    assert int(got) == 10


def test_greedy_head_rows_do_not_depend_on_the_batch() -> None:
    """Several rows go through the pre-packed int8 weight, one row through torch._int_mm: the same scores,
    so each row's answer is the one it gets alone. A vocabulary of 4999 = 4999 x 1 blocks exercises the
    block size fallback."""
    g = torch.Generator().manual_seed(5)
    for vocab in (6400, 4999):
        w = torch.randn(vocab, 48, generator=g) * 0.05
        head = GreedyHead(w, k=32)
        x = torch.randn(8, 48, generator=g) * 4
        assert head.block == max(b for b in range(1, 65) if vocab % b == 0)
        full = lambda rows: (rows @ w.t()).argmax(-1)  # noqa: E731
        batched = head.argmax(x, full)
        assert torch.equal(batched, torch.cat([head.argmax(x[b:b + 1], full) for b in range(8)]))
        assert torch.equal(batched, (x @ w.t()).argmax(-1))
    q, scale = quantize_int8(torch.randn(300, 40, generator=g))
    packed = PackedInt8Weight.build(q, scale)
    if packed is not None:  # this torch has the oneDNN int8 ops
        xq = torch.randint(-127, 128, (5, 40), dtype=torch.int8, generator=g)
        assert torch.equal(packed(xq), torch._int_mm(xq, q.t()) * scale)


def test_fast_greedy_matches_plain_greedy() -> None:
    model = tiny_thinker(seed=23, vocab=3000, d=64)
    embeds, ids = prompts(model)
    assert sampling.greedy_head(model, build=False) is None
    for mode in MODES:
        fast = SamplingOptions(max_new_tokens=sampling.SCREEN_MIN_TOKENS + 8, decode_attention=mode, ignore_eos=True)
        plain = SamplingOptions(**{**fast.__dict__, "fast_greedy": False})
        assert one_by_one(model, embeds, ids, fast) == one_by_one(model, embeds, ids, plain)
        assert generate_batch(model, embeds, ids, fast) == generate_batch(model, embeds, ids, plain)
    assert sampling.greedy_head(model, build=False) is not None  # the screen was built and used
    bf = copy.deepcopy(model).to(torch.bfloat16)
    bf_embeds = [e.to(torch.bfloat16) for e in embeds]
    fast = SamplingOptions(max_new_tokens=sampling.SCREEN_MIN_TOKENS + 8, ignore_eos=True)
    plain = SamplingOptions(**{**fast.__dict__, "fast_greedy": False})
    assert one_by_one(bf, bf_embeds, ids, fast) == one_by_one(bf, bf_embeds, ids, plain)
    assert sampling.greedy_head(bf, build=False) is not None


@pytest.mark.parametrize("mode", MODES)
def test_per_row_budgets_near_the_context_end(mode: str) -> None:
    """Each row may have its own max_new_tokens; a long prompt with a small budget sits beside a short prompt
    with a large one, together needing more columns than the context (each row alone fits)."""
    model = tiny_thinker(seed=29, ctx=32)
    embeds, ids = prompts(model, lens=(28, 3, 10))
    budgets = [4, 29, 0]
    opts = SamplingOptions(decode_attention=mode, ignore_eos=True)
    single = [list(generate(model, e[None], SamplingOptions(**{**opts.__dict__, "max_new_tokens": n}), i))
              for e, i, n in zip(embeds, ids, budgets)]
    assert [len(s) for s in single] == budgets
    times: list[float] = []
    assert generate_batch(model, embeds, ids, opts, max_new_tokens=budgets, step_times=times) == single
    assert len(times) == max(budgets) and times == sorted(times)
    with pytest.raises(ValueError, match="context"):
        generate_batch(model, embeds, ids, opts, max_new_tokens=[5, 1, 1])


def test_greedy_head_hands_back_non_finite_inputs() -> None:
    w = torch.randn(2000, 32)
    head = GreedyHead(w, k=16)
    for bad in (float("nan"), float("inf")):
        x = torch.randn(2, 32)
        x[1, 3] = bad
        assert head.argmax(x) is None
    with pytest.raises(ValueError):
        GreedyHead(w, k=2000)


# ---------------------------------------------------------------- CLI: --batch_file, --quantize

def test_cli_batch_file_matches_one_shot_answers(tiny_tree, tmp_path) -> None:
    from PIL import Image

    from tests.conftest import run_cli

    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "red.png")
    texts = ["what is one plus two ?", "hello", "once upon a time there was a small yellow shape"]
    lines = [json.dumps({"text": texts[0]}), "", json.dumps({"text": texts[1], "image": "red.png"}), "{oops",
             json.dumps({"text": texts[2]}), json.dumps({"text": "x", "image": "missing.png"})]
    (tmp_path / "requests.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    common = ["--ckpt_dir", str(tiny_tree), "--max_new_tokens", "10", "--quiet"]
    for mode in MODES:
        r = run_cli(*common, "--decode_attention", mode, "--batch_file", str(tmp_path / "requests.jsonl"),
                    "--batch_size", "2", cwd=tmp_path.parent)  # image path relative to the file's directory
        assert r.returncode == 1  # two bad lines
        out = [json.loads(line) for line in r.stdout.splitlines()]
        assert [o["line"] for o in out] == [1, 3, 4, 5, 6]
        assert "error" in out[2] and "error" in out[4] and "missing.png" in out[4]["error"]
        assert "line 4:" in r.stderr and "line 6:" in r.stderr
        for o, extra in ((out[0], []), (out[1], ["--image", str(tmp_path / "red.png")]), (out[3], [])):
            one = run_cli(*common, "--decode_attention", mode, "--text", o["input"]["text"], "--json", *extra)
            assert one.returncode == 0, one.stderr
            single = json.loads(one.stdout)
            assert o["token_ids"] == single["token_ids"] and o["text"] == single["text"]
            assert o["prompt_tokens"] == single["prompt_tokens"]
            assert o["timing"]["batch_size"] in (1, 2)


def test_cli_batch_file_usage_errors(tiny_tree, tmp_path) -> None:
    from tests.conftest import run_cli

    (tmp_path / "r.jsonl").write_text('{"text": "hello"}\n', encoding="utf-8")
    r = run_cli("--ckpt_dir", str(tiny_tree), "--batch_file", str(tmp_path / "r.jsonl"), "--text", "hi")
    assert r.returncode == 2 and "--batch_file" in r.stderr
    r = run_cli("--ckpt_dir", str(tiny_tree), "--batch_file", str(tmp_path / "absent.jsonl"))
    assert r.returncode == 1 and "absent.jsonl" in r.stderr


def test_cli_quantize_int8_and_bfloat16_run(tiny_tree) -> None:
    from tests.conftest import run_cli

    for flags in (["--quantize", "int8"], ["--dtype", "bfloat16"], ["--dtype", "bfloat16", "--quantize", "int8"]):
        r = run_cli("--ckpt_dir", str(tiny_tree), "--text", "hello", "--max_new_tokens", "5", "--json", "--quiet",
                    *flags)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["generated_tokens"] <= 5


def test_api_chat_batch_equals_chat(tiny_tree) -> None:
    from omni import load_model

    model = load_model(tiny_tree, device="cpu")
    items = [{"text": "hello"}, {"text": "what do you see ?"}, {"text": "a red circle . a blue square"}]
    for mode in MODES:
        single = [model.chat(it["text"], max_new_tokens=8, decode_attention=mode) for it in items]
        assert model.chat_batch(items, max_new_tokens=8, decode_attention=mode) == single
        assert model.chat_batch(items, batch_size=2, max_new_tokens=8, decode_attention=mode) == single
    from utils.base.errors import OmniError
    with pytest.raises(OmniError, match="request 2"):
        model.chat_batch([{"text": "hello"}, {"text": 5}])


def test_bench_quick_runs(tmp_path) -> None:
    """bench.py --quick end to end for one dtype on both models: the tables on stdout and the JSON file (no
    timing checks)."""
    import sys

    from tests import forkserver
    from tests.conftest import REPO

    out = tmp_path / "bench.json"
    r = forkserver.run([sys.executable, str(REPO / "bench.py"), "--quick", "--dtypes", "float32", "--threads", "1",
                        "--json_out", str(out)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("| **decode batch 1, causal (tokens/s)** |") == 2
    results = json.loads(out.read_text())["results"]
    for model in ("tiny", "demo"):
        res = results[model]["float32"]
        assert res["threads"] == 1 and res["top1_agreement"] == 1.0
        for key in ("load_s", "prefill_tok_s", "ttft_ms", "b1_causal_tok_s", "b8_causal_tok_s", "b1_reference_tok_s",
                    "b1_mb_per_token", "b1_bound_tok_s", "b1_bound_fraction", "peak_rss_mb"):
            assert res[key] > 0, (model, key)
    tiny = results["tiny"]["float32"]
    # the tiny thinker's blocks (4 x 0.98 M float32 weights) + the int8 vocabulary screen (32000 x 256)
    assert 23 < tiny["b1_mb_per_token"] < 26
    for key in ("image_encode_ms", "audio_rtf", "speech_rtf", "speedup_vs_baseline_causal"):
        assert tiny[key] > 0, key


def test_greedy_head_fallback_handles_only_undecided_rows() -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(3000, 32, generator=g)
    w[5:17] = w[5] * (1 + 1e-6 * torch.arange(12.0))[:, None]  # 12 near-ties: more than k = 8 candidates
    x = torch.randn(4, 32, generator=g)
    x[2] = w[5] * 10  # row 2's best rows are those twelve
    head = GreedyHead(w, k=8)
    assert head.argmax(x) is None
    seen = []

    def full(rows: torch.Tensor) -> torch.Tensor:
        seen.append(rows.shape[0])
        return (rows @ w.t()).argmax(-1)

    assert torch.equal(head.argmax(x, full), (x @ w.t()).argmax(-1))
    assert seen[0] == 1  # only the undecided row was computed in full
