"""The μOmni OCR model: every number the reference computed on ../shared/fixtures/muomni_ocr, from each of its three
weight sources (a finished run's directory, a torch.compile'd run's periodic checkpoint, the reference export),
a variant (GQA self-attention, GELU, 64 px) against a reference written here on nn.MultiheadAttention, and the
loader's errors (no vocabulary, a vocabulary that does not fit the head, a corrupt file)."""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from tests.conftest import REPO, run_cli
from tests.factory import OCR_CHARS, make_ocr_dir, ocr_config
from utils.base.errors import OmniError

OCR_FIXTURE = REPO.parent / "shared" / "fixtures" / "muomni_ocr"
SOURCES = ("ocr_tiny", "ocr_tiny_compiled", "export")  # finished run, compiled periodic checkpoint, merged export
RTOL, ATOL = 1e-4, 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ocr_fixture() -> Path:
    """../shared/fixtures/muomni_ocr, or a skip (a failure under CI, where ../shared is always there)."""
    if not (OCR_FIXTURE / "expected.json").is_file():
        message = f"μOmni OCR fixture not found at {OCR_FIXTURE}"
        if os.environ.get("CI"):
            pytest.fail(message + ": required when CI is set")
        pytest.skip(message)
    return OCR_FIXTURE


_MODELS: dict[Path, object] = {}


def model_at(path: Path):
    from omni import load_model
    if path not in _MODELS:
        _MODELS[path] = load_model(path, device="cpu")
    return _MODELS[path]


def recompute_greedy(model, image: torch.Tensor, max_len: int) -> list[int]:
    """Greedy ids by a full forward over the whole sequence at every step (infer_chat's loop, no cache)."""
    seq = [1]
    for _ in range(max_len):
        nxt = int(model.logits(image[None], torch.tensor([seq]))[0, -1].argmax())
        seq.append(nxt)
        if nxt in (0, 2):
            break
    return seq[1:]


@pytest.mark.parametrize("source", SOURCES)
def test_fixture_values(ocr_fixture: Path, source: str) -> None:
    """Preprocessed images, ViT grids, teacher-forced and greedy logits (1e-4), greedy ids and texts (exact)."""
    expected = json.loads((ocr_fixture / "expected.json").read_text())
    tensors = load_file(str(ocr_fixture / "expected.safetensors"))
    model = model_at(ocr_fixture / source)
    ocr = model.parts.ocr
    assert model.components == ["ocr"] and len(model.parts.ocr_chars) == expected["vocab_size"]
    assert model.ocr_image_size == expected["config"]["img_size"]
    for i, inp in enumerate(expected["inputs"]):
        image = model._prompts.image_tensor(ocr_fixture / inp["file"], model.ocr_image_size)
        torch.testing.assert_close(image, tensors[f"image_tensor_{i}"], rtol=0, atol=0)
        with torch.inference_mode():
            grid = ocr.vision_encoder(image[None])[1][0]
        torch.testing.assert_close(grid, tensors[f"vision_grid_{i}"], rtol=RTOL, atol=ATOL)
        tf = ocr.logits(image[None], torch.tensor([inp["tf_ids"]]))[0]
        torch.testing.assert_close(tf, tensors[f"tf_logits_{i}"], rtol=RTOL, atol=ATOL)
        greedy = ocr.logits(image[None], torch.tensor([[1] + inp["greedy_ids"][:-1]]))[0]
        torch.testing.assert_close(greedy, tensors[f"greedy_logits_{i}"], rtol=RTOL, atol=ATOL)
        result = model.ocr(ocr_fixture / inp["file"], max_len=expected["max_len"])
        assert (result.ids, result.text, result.stop) == (inp["greedy_ids"], inp["greedy_text"], inp["greedy_stop"])
        assert len(result.text) == inp["greedy_chars"]


def test_fixture_info(ocr_fixture: Path) -> None:
    """--info's card lists the OCR model with the config it was built from."""
    from utils.cli.console import format_card
    card = model_at(ocr_fixture / "ocr_tiny").info()
    assert "OCR             224 px images (patch 16)" in format_card(card)
    assert card["components"]["ocr"]["config"].endswith("configs/ocr_tiny.json")
    assert card["ocr"]["img_size"] == 224 and card["ocr"]["vocabulary"] == 63
    assert card["components"]["ocr"]["weights"].endswith("ocr_tiny/ocr.pt")


# ---------------------------------------------------------------- a variant, against a reference written here

def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w


def rope(x: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE, base 10000, positions 0..T-1, on (h, T, dk)."""
    T, dk = x.shape[-2:]
    inv = 1.0 / (10000.0 ** (torch.arange(0, dk, 2, dtype=torch.float32) / dk))
    ang = torch.outer(torch.arange(T, dtype=torch.float32), inv)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    half = torch.cat([-x[..., dk // 2:], x[..., :dk // 2]], -1)
    return x * cos + half * sin


def reference_logits(sd: dict[str, torch.Tensor], grid: torch.Tensor, ids: list[int], h: int) -> torch.Tensor:
    """MUOMNI_OCR §3 from the state dict alone: explicit causal GQA self-attention, torch's own
    nn.MultiheadAttention for the cross-attention, GELU MLP. grid (N, dv) -> logits (T, V)."""
    p = "decoder."
    m = grid @ sd[p + "img_proj.weight"].T + sd[p + "img_proj.bias"]
    x = sd[p + "char_embed.weight"][ids]
    T, d = x.shape
    dk = d // h
    for i in range(sum(k.endswith(".norm1.weight") for k in sd if k.startswith(p + "blocks."))):
        b = f"{p}blocks.{i}."
        n = rms(x, sd[b + "norm1.weight"])
        q = (n @ sd[b + "self_attn.q.weight"].T).view(T, h, dk).transpose(0, 1)
        k = (n @ sd[b + "self_attn.k.weight"].T).view(T, -1, dk).transpose(0, 1)
        v = (n @ sd[b + "self_attn.v.weight"].T).view(T, -1, dk).transpose(0, 1)
        g = k.shape[0]
        k, v = k.repeat_interleave(h // g, 0), v.repeat_interleave(h // g, 0)
        scores = rope(q) @ rope(k).transpose(-1, -2) / math.sqrt(dk)
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        x = x + (scores.softmax(-1) @ v).transpose(0, 1).reshape(T, d) @ sd[b + "self_attn.o.weight"].T
        mha = torch.nn.MultiheadAttention(d, h, batch_first=True)
        mha.load_state_dict({k[len(b + "cross_attn."):]: t for k, t in sd.items() if k.startswith(b + "cross_attn.")})
        n = rms(x, sd[b + "norm2.weight"])
        x = x + mha.eval()(n[None], m[None], m[None], need_weights=False)[0][0]
        n = rms(x, sd[b + "norm3.weight"])
        hid = F.gelu(n @ sd[b + "mlp.fc1.weight"].T + sd[b + "mlp.fc1.bias"])
        x = x + hid @ sd[b + "mlp.fc2.weight"].T + sd[b + "mlp.fc2.bias"]
    return rms(x, sd[p + "norm.weight"]) @ sd[p + "head.weight"].T


def test_variant_gqa_gelu_64px(tmp_path: Path) -> None:
    """A GQA (4 query heads, 2 KV heads), GELU, 64 px model found through the loader: the cached greedy decode
    gives the ids of a full recompute, and its logits are those of the nn.MultiheadAttention reference."""
    from omni import load_model
    cfg = ocr_config("gqa", "gelu", img_size=64)
    # seed 0: its greedy ids vary (a model repeating one id would hide a cache that ignores earlier positions)
    d = make_ocr_dir(tmp_path / "checkpoints" / "ocr_small", cfg, seed=0)
    img = Image.new("RGB", (150, 70), (230, 220, 200))
    ImageDraw.Draw(img).text((10, 20), "abc 42", fill=(20, 30, 90))
    img.save(tmp_path / "text.png")
    model = load_model(d, device="cpu")
    ocr = model.parts.ocr
    assert (ocr.cfg.n_heads, ocr.cfg.n_kv_heads, ocr.cfg.ffn, model.ocr_image_size) == (4, 2, "gelu", 64)
    assert model.parts.ocr_chars == OCR_CHARS
    result = model.ocr(tmp_path / "text.png", max_len=24)
    image = model._prompts.image_tensor(tmp_path / "text.png", 64)
    assert result.ids == recompute_greedy(ocr, image, 24)
    sd = {k: v.detach() for k, v in ocr.state_dict().items()}
    with torch.inference_mode():
        grid = ocr.vision_encoder(image[None])[1][0]
        ref = reference_logits(sd, grid, [1] + result.ids[:-1], h=4)
    torch.testing.assert_close(ocr.logits(image[None], torch.tensor([[1] + result.ids[:-1]]))[0], ref,
                               rtol=RTOL, atol=ATOL)
    assert [int(i) for i in ref.argmax(-1)] == result.ids


# ---------------------------------------------------------------- bad input: one error line each

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run's directory (vocabulary only in ocr_metadata.json), with a text image beside it."""
    root = tmp_path_factory.mktemp("ocr") / "checkpoints"
    make_ocr_dir(root / "ocr_tiny", ocr_config("mha", "swiglu", img_size=32), seed=1)
    Image.new("RGB", (60, 30), "white").save(root / "blank.png")
    return root


def broken_copy(finished_run: Path, tmp_path: Path) -> Path:
    shutil.copytree(finished_run, tmp_path / "checkpoints")
    return tmp_path / "checkpoints" / "ocr_tiny"


def one_error(r) -> str:
    """The one `error:` line of a failed CLI run (exit 1)."""
    assert r.returncode == 1 and r.stdout == "", (r.returncode, r.stdout, r.stderr)
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    return r.stderr


def test_no_vocabulary_names_both_places(finished_run: Path, tmp_path: Path) -> None:
    d = broken_copy(finished_run, tmp_path)
    (d / "ocr_metadata.json").unlink()
    err = one_error(run_cli("--ckpt_dir", str(d), "--ocr", "--image", str(finished_run / "blank.png")))
    assert f"{d / 'ocr_metadata.json'} not found, and {d / 'ocr.pt'} holds no 'idx_to_char'" in err


def test_vocabulary_must_fit_the_head(finished_run: Path, tmp_path: Path) -> None:
    d = broken_copy(finished_run, tmp_path)
    meta = json.loads((d / "ocr_metadata.json").read_text())
    meta["char_to_idx"].pop("z")
    meta["idx_to_char"].pop(str(len(OCR_CHARS) - 1))
    meta["vocab_size"] -= 1
    (d / "ocr_metadata.json").write_text(json.dumps(meta))
    err = one_error(run_cli("--ckpt_dir", str(d), "--ocr", "--image", str(finished_run / "blank.png")))
    assert f"vocabulary has {len(OCR_CHARS) - 1} entries but the decoder head in {d / 'ocr.pt'} has " \
           f"{len(OCR_CHARS)} rows" in err


def test_corrupt_weights_file(finished_run: Path, tmp_path: Path) -> None:
    d = broken_copy(finished_run, tmp_path)
    data = (d / "ocr.pt").read_bytes()
    (d / "ocr.pt").write_bytes(data[:len(data) // 2])
    err = one_error(run_cli("--ckpt_dir", str(d), "--ocr", "--image", str(finished_run / "blank.png")))
    assert f"checkpoint {d / 'ocr.pt'}: " in err


def test_vocabularies_that_disagree(finished_run: Path, tmp_path: Path) -> None:
    """ocr.pt's own vocabulary and ocr_metadata.json must be the same (in-process: the loader's rule)."""
    from omni import load_model
    d = broken_copy(finished_run, tmp_path)
    obj = torch.load(d / "ocr.pt", weights_only=True)
    chars = OCR_CHARS[:4] + OCR_CHARS[5:] + OCR_CHARS[4:5]
    torch.save({**obj, "idx_to_char": dict(enumerate(chars))}, d / "ocr.pt")
    with pytest.raises(OmniError, match="OCR vocabularies of .*ocr_metadata.json and .*ocr.pt disagree"):
        load_model(d, device="cpu")


# ---------------------------------------------------------------- export.py carries it

@pytest.fixture(scope="module")
def tree_with_ocr(tiny_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The factory's μOmni tree plus an OCR directory (found beside the others, as in checkpoints/)."""
    root = tmp_path_factory.mktemp("with_ocr") / "checkpoints"
    shutil.copytree(tiny_tree, root)
    make_ocr_dir(root / "ocr_tiny", ocr_config("gqa", "swiglu", img_size=48), seed=0)
    return root


@pytest.mark.parametrize("dtype, quantize", [(None, None), ("bfloat16", None), (None, "int8")])
def test_export_round_trip(tree_with_ocr: Path, tmp_path: Path, dtype: str | None, quantize: str | None) -> None:
    """The tree loads with its OCR model; the export holds `ocr.*` (int8 Linear weights under --quantize int8),
    the OCR config and vocabulary, and reads the same text (float32: the same ids)."""
    from omni import export_checkpoints, load_model
    source = model_at(tree_with_ocr)
    assert "ocr" in source.components and source.ocr_image_size == 48
    image = Image.new("RGB", (100, 40), "white")
    ImageDraw.Draw(image).text((5, 10), "hi 7", fill="black")
    result = export_checkpoints(tmp_path / "e", ckpt_root=tree_with_ocr, dtype=dtype, quantize=quantize)
    stored = result.merged["ocr"]
    assert stored and (quantize is None) == all(v.dtype != torch.int8 for v in stored.values())
    info = json.loads((tmp_path / "e" / "model_info.json").read_text())
    cfg = json.loads((tmp_path / "e" / "config.json").read_text())["ocr"]
    assert info["components"]["ocr"] and cfg["img_size"] == 48 and cfg["decoder_heads"] == 4 and cfg["use_gqa"]
    exported = load_model(tmp_path / "e", device="cpu")
    assert exported.parts.ocr_chars == OCR_CHARS and exported.ocr_image_size == 48
    ids = exported.ocr(image, max_len=12).ids
    if dtype is None and quantize is None:
        assert ids == source.ocr(image, max_len=12).ids
    assert len(ids) <= 12


# ---------------------------------------------------------------- the command lines and the server

def test_cli_ocr_modes(ocr_fixture: Path, tmp_path: Path) -> None:
    """--ocr prints each image's text (--json: ocr_text, ocr_ids, ocr_stop); /ocr in a pipe; batch.py --task ocr."""
    expected = json.loads((ocr_fixture / "expected.json").read_text())
    files = [str(ocr_fixture / inp["file"]) for inp in expected["inputs"]]
    r = run_cli("--ckpt_dir", str(ocr_fixture / "ocr_tiny"), "--ocr", "--image", files[0], "--image", files[1])
    assert r.returncode == 0, r.stderr
    assert r.stdout == "".join(inp["greedy_text"] + "\n" for inp in expected["inputs"][:2])
    r = run_cli("--ckpt_dir", str(ocr_fixture / "export"), "--json", script="infer_safetensors.py",
                stdin=f"/ocr {files[2]}\n/ocr {tmp_path / 'missing.png'}\n")
    assert r.returncode == 1 and "error: line 2: image file" in r.stderr
    first, second = [json.loads(line) for line in r.stdout.splitlines()]
    inp = expected["inputs"][2]
    assert first == {"input": {"ocr": files[2]}, "ocr_text": inp["greedy_text"], "ocr_ids": [inp["greedy_ids"]],
                     "ocr_stop": ["eos"]}
    assert second["input"] == {"ocr": str(tmp_path / "missing.png")} and "error" in second
    r = run_cli("--ckpt_dir", str(ocr_fixture / "ocr_tiny_compiled"), "--task", "ocr", str(ocr_fixture / "inputs"),
                "-o", str(tmp_path / "out.jsonl"), script="batch.py")
    assert r.returncode == 0, r.stderr
    records = {Path(rec["id"]).name: rec for rec in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    for inp in expected["inputs"]:
        rec = records[Path(inp["file"]).name]
        assert (rec["ocr_text"], rec["ocr_ids"], rec["ocr_stop"]) == (inp["greedy_text"], [inp["greedy_ids"]], ["eos"])


def test_cli_ocr_question(tree_with_ocr: Path) -> None:
    """--ocr --text answers the question with the image's text joined in as μOmni does (its ids are those of
    the same prompt asked directly), and --json carries the OCR fields beside the answer's."""
    from omni import ocr_prompt
    image = tree_with_ocr / "sign.png"
    Image.new("RGB", (120, 50), (250, 240, 230)).save(image)
    model = model_at(tree_with_ocr)
    read = model.ocr(image)
    direct = model.answer(ocr_prompt("what does it say?", [read.text]), image=str(image), max_new_tokens=8)
    assert ocr_prompt("q", ["a", "b"]) == "q (OCR extracted: a; b)"
    assert ocr_prompt(None, ["a"]) == "Extracted text from image: a. Describe what you see."
    r = run_cli("--ckpt_dir", str(tree_with_ocr), "--ocr", "--image", str(image), "--text", "what does it say?",
                "--max_new_tokens", "8", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["token_ids"] == direct.token_ids and out["prompt_tokens"] == direct.prompt_tokens
    assert (out["ocr_text"], out["ocr_ids"], out["ocr_stop"]) == (read.text, [read.ids], [read.stop])


def test_server_ocr_endpoint(tree_with_ocr: Path) -> None:
    """POST /v1/ocr on a real server: the text and ids OmniModel.ocr gives; max_len honoured; unknown fields and
    a missing image refused by name."""
    import base64
    import httpx
    from tests.test_serve import server
    image = tree_with_ocr / "served.png"
    Image.new("RGB", (90, 40), (200, 220, 250)).save(image)
    url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    read = model_at(tree_with_ocr).ocr(image)
    with server(ckpt=tree_with_ocr) as served:
        ok = httpx.post(f"{served.base}/v1/ocr", json={"image_url": {"url": url}}, timeout=120)
        assert ok.status_code == 200, ok.text
        assert ok.json() == {"object": "ocr", "model": "muomni", "text": read.text, "ids": read.ids,
                             "stop": read.stop}
        short = httpx.post(f"{served.base}/v1/ocr", json={"image_url": url, "max_len": 2}, timeout=120).json()
        assert short["ids"] == read.ids[:2] and (short["stop"] == "max_len" or len(read.ids) <= 2)
        bad = httpx.post(f"{served.base}/v1/ocr", json={"image_url": url, "language": "en"}, timeout=120)
        assert bad.status_code == 400 and "'language'" in bad.json()["error"]["message"]
        missing = httpx.post(f"{served.base}/v1/ocr", json={}, timeout=120)
        assert missing.status_code == 422 and "image_url" in missing.json()["error"]["message"]


# ---------------------------------------------------------------- the demo's OCR data and training tools

def test_demo_text_images_follow_their_distribution() -> None:
    """tools/ocr_demo.py draws words or numbers 10-999 in 120-400 x 40-160 images, the text inside the image and
    spanning at least MIN_SPAN of its width, dark on light."""
    import random
    from tools import ocr_demo
    rng = random.Random(7)
    for _ in range(40):
        img, text = ocr_demo.draw_text(rng)
        assert text in ocr_demo.WORDS or (text.isdigit() and 10 <= int(text) <= 999)
        assert 120 <= img.width <= 400 and 40 <= img.height <= 160
        dark = (torch.from_numpy(np.array(img.convert("L"))) < 128).nonzero()
        span = (dark[:, 1].max() - dark[:, 1].min() + 1) / img.width
        assert span >= ocr_demo.MIN_SPAN * 0.75, (text, img.size, float(span))  # ink < 128: antialiased edges off
        assert set(ocr_demo.encode(text, ocr_demo.OCRRecipe().max_text_length)) <= set(range(len(ocr_demo.CHARS)))


def test_demo_training_input_map_folds_exactly() -> None:
    """The training input map x -> a (c - x), folded into the patch projection, leaves the image features as
    they were: the saved model takes the plain preprocessed image."""
    from tools import ocr_demo
    recipe = ocr_demo.OCRRecipe()
    model = ocr_demo.make_model(recipe).eval()
    x = torch.rand(2, 3, recipe.img_size, recipe.img_size)
    with torch.inference_mode():
        before = model.vision_encoder(recipe.in_scale * (recipe.in_shift - x))[1]
        after = ocr_demo.fold_input(model, recipe).vision_encoder(x)[1]
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
