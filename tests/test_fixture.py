"""The μOmni-compatible core: every number the reference computed on ../shared/fixtures/muomni_small.

The comparisons run through the code paths the CLIs use (utils.weights.loading discovery, omni.load_model, the image and
audio preprocessing, the generation loop), and the ids are also checked through real CLI subprocesses. Without
../shared every test here skips (the `fixture_dir` fixture says why).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests import forkserver
from tests.conftest import REPO
from utils.base.errors import OmniError

EOS = 2
RTOL, ATOL = 1e-4, 1e-5
# Expected tensors that are inputs the reference fed in (checked for shape only, then used as inputs).
INPUT_KEYS = {"rvq_encode_input", "vocoder_input_mel"}
# Expected tensors compared in test_tensor (every other key of expected.safetensors).
OUTPUT_KEYS = ("image_tensor", "vision_cls", "vision_grid", "mel", "audio_encoder_out", "thinker_logits",
               "mm_prefill_logits_image_audio", "mm_prefill_logits_audio", "talker_base_logits", "talker_res_logits",
               "rvq_decoded_mel", "rvq_encoded", "vocoder_audio")
LAYOUTS = ("omni_sft_tiny", "export", ".")  # omni dir, merged export, checkpoints root


def until_eos(ids: list[int]) -> list[int]:
    """The reference's lists include EOS when it was emitted; our token_ids stop before it."""
    return ids[:ids.index(EOS)] if EOS in ids else list(ids)


@pytest.fixture(scope="module")
def tensors(fixture_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(fixture_dir / "expected.safetensors"))


@pytest.fixture(scope="module")
def inputs(fixture_dir: Path) -> dict[str, Path]:
    return {"image": fixture_dir / "inputs" / "image.png", "audio": fixture_dir / "inputs" / "audio_16k.wav"}


_MODELS: dict[Path, object] = {}


def model_at(path: Path):
    """omni.load_model on CPU, cached per path for this module."""
    from omni import load_model
    if path not in _MODELS:
        _MODELS[path] = load_model(path, device="cpu")
    return _MODELS[path]


def talker_greedy_by_recompute(talker, n_frames: int, reference: bool) -> list[list[int]]:
    """Greedy talker codes with no KV cache and no decode engine: the whole sequence [start, [0,0], frames...]
    through the talker's blocks at every step, under an explicit full mask. Causal: every position sees all
    earlier ones (what training did). `reference`: the generated positions see position 0 only (the reference
    implementation's incremental-mask defect). It reuses the project's Blocks (checked tensor by tensor in
    test_tensor), but none of utils.engine.generation / utils.engine.speech."""
    frames: list[list[int]] = []
    x = torch.cat([talker.start, talker.embed(torch.zeros(1, 1, 2, dtype=torch.long))], dim=1)
    while len(frames) < n_frames:
        T = x.shape[1]
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        if reference:
            mask[2:] = False
            mask[2:, 0] = True
        base, res = talker.head(talker.hidden(x, mask=mask[None, None])[:, -1])
        frames.append([int(base[0].argmax()), int(res[0].argmax())])
        x = torch.cat([x, talker.embed(torch.tensor([[frames[-1]]]))], dim=1)
    return frames


pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------- tensors

def compute(key: str, m, thinker_m, expected: dict, tensors: dict, inputs: dict) -> torch.Tensor:
    """The tensor named `key` of expected.safetensors, computed with the loaded model `m`."""
    from utils.media.audio import load_audio, power_mel
    from utils.media.image import load_image

    c = m.parts
    img = load_image(inputs["image"])
    wave = load_audio(inputs["audio"])
    codes = torch.tensor(expected["talker_greedy_24"])
    if key == "image_tensor":
        return img
    if key in ("vision_cls", "vision_grid"):
        cls, grid = c.vision(img[None])
        return (cls if key == "vision_cls" else grid)[0]
    if key == "mel":
        return power_mel(wave)
    if key == "audio_encoder_out":
        return m.encode_audio(wave)
    if key == "thinker_logits":
        t = thinker_m.parts.thinker
        ids = torch.tensor(thinker_m.parts.tokenizer.prompt_ids(expected["prompt"]))
        return t(t.tok_emb(ids)[None])[0]
    if key == "mm_prefill_logits_image_audio":
        embeds = m.prepare_chat(expected["mm_prompt"], image=img, audio=wave, max_new_tokens=16).embeds[None]
        return c.thinker(embeds)[0]
    if key == "mm_prefill_logits_audio":
        embeds = m.prepare_chat(expected["audio_prompt"], audio=wave, max_new_tokens=16).embeds[None]
        return c.thinker(embeds)[0]
    if key in ("talker_base_logits", "talker_res_logits"):
        base, res = c.talker(torch.cat([torch.zeros(1, 2, dtype=torch.long), codes])[None])
        return (base if key == "talker_base_logits" else res)[0]
    if key == "rvq_decoded_mel":
        return c.rvq.decode(codes)
    if key == "rvq_encoded":
        return c.rvq.encode(tensors["rvq_encode_input"])
    if key == "vocoder_audio":
        return c.vocoder(tensors["vocoder_input_mel"][None])[0, 0]
    raise KeyError(key)


def test_every_expected_tensor_is_covered(tensors):
    assert set(tensors) == set(OUTPUT_KEYS) | INPUT_KEYS, "expected.safetensors changed: cover the new keys"
    assert tensors["rvq_encode_input"].shape == (20, 128)
    assert tensors["vocoder_input_mel"].shape == (128, 12)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("key", OUTPUT_KEYS)
def test_tensor(key, layout, fixture_dir, expected, tensors, inputs):
    m = model_at(fixture_dir / layout)
    # thinker_logits come from the thinker checkpoint; the omni/export thinker holds the same weights here.
    thinker_m = model_at(fixture_dir / "thinker_tiny") if layout == "omni_sft_tiny" else m
    with torch.inference_mode():
        got = compute(key, m, thinker_m, expected, tensors, inputs).float()
    want = tensors[key]
    assert got.shape == want.shape, f"{key}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if key == "rvq_encoded":  # code ids, stored as float: exact
        assert torch.equal(got, want)
        return
    atol = ATOL
    if key == "mel":
        # Power values span 3e-3 .. 1.7e3. float32 STFT rounding error scales with the energy of the whole
        # frame (every bin sums 1024 products), not with the bin's own value, so an absolute floor tied to the
        # spectrogram's peak is the honest tolerance: 1e-6 * peak (~1.7e-3, about 10 float32 ulps of the peak),
        # plus the usual rtol 1e-4. Observed: max abs error 1.7e-3 at the peak bins, max relative 2.1e-5.
        atol = 1e-6 * float(want.abs().max())
    err = (got - want).abs()
    assert torch.allclose(got, want, rtol=RTOL, atol=atol), \
        f"{key} via {layout}: max abs error {float(err.max()):.3g} (rtol {RTOL}, atol {atol:.3g})"


# ---------------------------------------------------------------- ids, in-process

def test_prompt_ids(fixture_dir, expected):
    for layout in ("thinker_tiny", "omni_sft_tiny", "export"):
        assert model_at(fixture_dir / layout).parts.tokenizer.prompt_ids(expected["prompt"]) == expected["prompt_ids"]


# Default commands give the `_causal` ids; decode_attention="reference" reproduces the reference's own ids.
MODES = {"causal": "_causal", "reference": ""}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ("thinker_tiny",) + LAYOUTS)
def test_thinker_greedy_16(layout, mode, fixture_dir, expected):
    gen = {} if mode == "causal" else {"decode_attention": mode}
    ans = model_at(fixture_dir / layout).answer(expected["prompt"], max_new_tokens=16, **gen)
    assert ans.prompt_tokens == len(expected["prompt_ids"])
    assert ans.token_ids == until_eos(expected["thinker_greedy_16" + MODES[mode]])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", ("image", "image_audio", "audio"))
def test_mm_greedy_16(case, layout, mode, fixture_dir, expected, inputs):
    m = model_at(fixture_dir / layout)
    text = expected["audio_prompt"] if case == "audio" else expected["mm_prompt"]
    gen = {} if mode == "causal" else {"decode_attention": mode}
    ans = m.answer(text, image=inputs["image"] if "image" in case else None,
                   audio=inputs["audio"] if "audio" in case else None, max_new_tokens=16, **gen)
    assert ans.token_ids == until_eos(expected[f"mm_greedy_16_{case}" + MODES[mode]])


def test_image_alone_uses_the_default_image_prompt(fixture_dir, expected, inputs):
    ans = model_at(fixture_dir / "omni_sft_tiny").answer(None, image=inputs["image"], max_new_tokens=16)
    assert ans.token_ids == until_eos(expected["mm_greedy_16_image_causal"])


@pytest.mark.parametrize("layout", ("audio_enc_tiny",) + LAYOUTS)
def test_ctc_greedy_text(layout, fixture_dir, expected, inputs):
    m = model_at(fixture_dir / layout)
    if layout == "export":  # the fixture's export ships without audio_enc_metadata.json: no character map
        assert m.parts.ctc_chars is None
        with pytest.raises(OmniError, match="CTC"):
            m.transcribe(inputs["audio"])
        return
    assert m.parts.ctc_head is not None, f"{layout}: the CTC head was not loaded"
    assert m.transcribe(inputs["audio"]).text == expected["ctc_greedy_text"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_talker_greedy_24(layout, mode, fixture_dir, expected):
    """Through the path --audio_out uses (OmniModel.speak -> utils.engine.speech), and by full recompute."""
    m = model_at(fixture_dir / layout)
    want = expected["talker_greedy_24" + MODES[mode]]
    gen = {} if mode == "causal" else {"decode_attention": mode}
    speech = m.speak(frames=24, vocoder="griffin-lim", **gen)
    assert speech.codes.tolist() == want
    with torch.inference_mode():
        assert talker_greedy_by_recompute(m.parts.talker, 24, reference=mode == "reference") == want


def test_vocoder_found_for_every_layout(fixture_dir):
    """vocoder_tiny/vocoder.pt beside the omni dir (preferred over the export's copy), the export's own copy."""
    for layout, where in (("omni_sft_tiny", "vocoder_tiny"), (".", "vocoder_tiny"), ("export", "export")):
        m = model_at(fixture_dir / layout)
        assert m.parts.vocoder is not None, layout
        source = Path(m.parts.sources["vocoder"])
        assert (source.parent.name, source.name) == (where, "vocoder.pt"), layout


# ---------------------------------------------------------------- the CLIs, as a user runs them

def launch(script: str, args: list[str], cwd: Path) -> subprocess.Popen:
    return forkserver.popen([sys.executable, str(REPO / script), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def cli(fixture_dir, expected, inputs, renamed_tree, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Every CLI run of this module, launched together as separate processes (each mostly waits on imports),
    from a scratch cwd so nothing resolves relative to the repository."""
    cwd = tmp_path_factory.mktemp("cwd")
    img, wav = str(inputs["image"]), str(inputs["audio"])
    gen = ["--max_new_tokens", "16", "--json"]
    omni = str(fixture_dir / "omni_sft_tiny")
    runs = {
        "thinker_text": ("infer_chat.py", ["--ckpt_dir", str(fixture_dir / "thinker_tiny"),
                                           "--text", expected["prompt"], *gen]),
        "omni_image_audio": ("infer_chat.py", ["--ckpt_dir", omni, "--image", img, "--audio_in", wav,
                                               "--text", expected["mm_prompt"], *gen]),
        "omni_image": ("infer_chat.py", ["--ckpt_dir", omni, "--image", img, *gen]),
        "omni_audio": ("infer_chat.py", ["--ckpt_dir", omni, "--audio_in", wav, "--text", expected["audio_prompt"],
                                         *gen]),
        "export": ("infer_safetensors.py", ["--ckpt_dir", str(fixture_dir / "export"), "--image", img,
                                            "--audio_in", wav, "--text", expected["mm_prompt"], *gen]),
        "root": ("infer_chat.py", ["--ckpt_dir", str(fixture_dir), "--image", img, "--audio_in", wav,
                                   "--text", expected["mm_prompt"], *gen]),
        "transcribe": ("infer_chat.py", ["--ckpt_dir", str(fixture_dir / "audio_enc_tiny"), "--transcribe",
                                         "--audio_in", wav]),
        "renamed_omni": ("infer_chat.py", ["--ckpt_dir", str(renamed_tree / "my_omni"), "--image", img,
                                           "--audio_in", wav, "--text", expected["mm_prompt"], *gen]),
        "renamed_root": ("infer_chat.py", ["--ckpt_dir", str(renamed_tree), "--audio_in", wav,
                                           "--text", expected["audio_prompt"], *gen]),
    }
    for name in ("thinker_text", "omni_image_audio", "omni_image", "omni_audio", "export"):
        script, args = runs[name]
        runs[f"{name}_reference"] = (script, [*args, "--decode_attention", "reference"])
    procs = {name: launch(script, args, cwd) for name, (script, args) in runs.items()}
    done = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return done


def cli_ids(proc: subprocess.CompletedProcess) -> list[int]:
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stdout
    return json.loads(lines[0])["token_ids"]


@pytest.mark.parametrize("run,key", [
    ("thinker_text", "thinker_greedy_16_causal"),  # infer_chat.py --ckpt_dir thinker_tiny --text <prompt>
    ("omni_image_audio", "mm_greedy_16_image_audio_causal"),  # omni_sft_tiny --image --audio_in --text <mm_prompt>
    ("omni_image", "mm_greedy_16_image_causal"),  # image alone, no --text: the default image prompt
    ("omni_audio", "mm_greedy_16_audio_causal"),  # audio alone with --text <audio_prompt>
    ("export", "mm_greedy_16_image_audio_causal"),  # infer_safetensors.py on the merged export
    ("root", "mm_greedy_16_image_audio_causal"),  # --ckpt_dir at the checkpoints root
    ("renamed_omni", "mm_greedy_16_image_audio_causal"),  # renamed dirs and configs, another cwd
    ("renamed_root", "mm_greedy_16_audio_causal"),
    # the same commands with --decode_attention reference: the reference implementation's own ids
    ("thinker_text_reference", "thinker_greedy_16"),
    ("omni_image_audio_reference", "mm_greedy_16_image_audio"),
    ("omni_image_reference", "mm_greedy_16_image"),
    ("omni_audio_reference", "mm_greedy_16_audio"),
    ("export_reference", "mm_greedy_16_image_audio"),
])
def test_cli_ids(cli, expected, run, key):
    assert cli_ids(cli[run]) == until_eos(expected[key])


def test_cli_transcribe(cli, expected):
    proc = cli["transcribe"]
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == expected["ctc_greedy_text"]


# ---------------------------------------------------------------- renamed copy: discovery follows save_dir

RENAMES = {"thinker_tiny": "thinker_small", "omni_sft_tiny": "my_omni", "audio_enc_tiny": "ears",
           "vision_tiny": "eyes", "talker_tiny": "voice", "vocoder_tiny": "hifi"}
POINTERS = {"thinker_ckpt": "thinker_small", "audio_ckpt": "ears", "vision_ckpt": "eyes", "talker_ckpt": "voice"}


@pytest.fixture(scope="module")
def renamed_tree(fixture_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture tree with every directory renamed, the config files renamed too, their `save_dir` (and the
    omni config's pointers) edited to match, plus stale decoy configs still naming the old directories."""
    root = tmp_path_factory.mktemp("renamed") / "runs"
    root.mkdir()
    for old, new in RENAMES.items():
        shutil.copytree(fixture_dir / old, root / new)
    (root / "configs").mkdir()
    for i, path in enumerate(sorted((fixture_dir / "configs").glob("*.json"))):
        cfg = json.loads(path.read_text())
        old = cfg["save_dir"].rsplit("/", 1)[-1]
        cfg["save_dir"] = f"checkpoints/{RENAMES[old]}"
        for key, new in POINTERS.items():
            if key in cfg:
                cfg[key] = f"checkpoints/{new}"
        (root / "configs" / f"run_{i}.json").write_text(json.dumps(cfg))
    # Decoys: named like the defaults and pointing at the old names, with values that would break everything.
    for name in ("thinker_tiny", "vision_tiny", "audio_enc_tiny", "talker_tiny"):
        (root / "configs" / f"{name}.json").write_text(json.dumps(
            {"save_dir": f"checkpoints/{name}", "n_heads": 1, "rope_theta": 7.0, "ctx_len": 16}))
    return root


def test_renamed_tree_config_association(renamed_tree):
    from utils.weights.checkpoint import find_config
    for new in RENAMES.values():
        cfg, path = find_config(renamed_tree / new)
        assert path is not None and path.name.startswith("run_"), (new, path)
        assert cfg["save_dir"] == f"checkpoints/{new}"


def test_renamed_tree_in_process(renamed_tree, expected, inputs, monkeypatch, tmp_path):
    from omni import load_model
    monkeypatch.chdir(tmp_path)  # the pointers' cwd-relative form cannot resolve: found by basename
    m = load_model(renamed_tree / "my_omni", device="cpu")
    assert m.parts.thinker.cfg.block.n_heads == 4 and m.parts.ctx_len == 512
    assert {k: Path(v).parent.name for k, v in m.parts.sources.items()} == {
        "thinker": "my_omni", "vision": "eyes", "audio": "ears", "talker": "voice", "vocoder": "hifi"}
    ans = m.answer(expected["mm_prompt"], image=inputs["image"], audio=inputs["audio"], max_new_tokens=16)
    assert ans.token_ids == until_eos(expected["mm_greedy_16_image_audio_causal"])
