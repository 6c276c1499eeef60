"""Every checkpoint layout of MUOMNI_FORMAT.md §1 reloads to the same numbers (self-contained: no ../shared).

Trees come from tests/factory.py (the trainers' layout, written with the project's own modules); the expected
numbers come from `reference_modules`, the same weights built in memory with explicit configurations, so a
loader that guesses an architecture, a file or a config wrongly shows up as a mismatch. The bulk runs the
loader in-process; a few real CLI subprocesses (run concurrently) cover the user's path end to end.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests import forkserver
from tests.conftest import EXAMPLES, REPO
from tests.factory import compiled_keys, make_export, make_tree, random_init, reference_modules, thinker_config
from models.thinker import ThinkerLM
from utils.base.errors import OmniError
from utils.weights.loading import Components, load_components

IDS = [1, 5, 17, 33, 8, 99, 3, 120, 42]
ATOL = 1e-5
WAVE = (0.3 * np.sin(np.linspace(0, 900, 16000 * 3 // 4))).astype(np.float32)  # 0.75 s at 16 kHz


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=ATOL)


@torch.inference_mode()
def thinker_logits(model) -> torch.Tensor:
    ids = torch.tensor(IDS)
    return model(model.tok_emb(ids)[None])[0]


@torch.inference_mode()
def outputs(comps_or_refs) -> dict[str, torch.Tensor]:
    """One output per present component, for a Components or a reference_modules dict."""
    get = (lambda k: getattr(comps_or_refs, k)) if isinstance(comps_or_refs, Components) else comps_or_refs.get
    g = torch.Generator().manual_seed(7)
    img = torch.rand(1, 3, 224, 224, generator=g)
    mel = torch.rand(1, 50, 128, generator=g) * 10
    codes = torch.randint(0, 128, (1, 6, 2), generator=g)
    out = {}
    if get("thinker") is not None:
        out["thinker"] = thinker_logits(get("thinker"))
    if get("vision") is not None:
        out["vision"] = get("vision")(img)[0]
    if get("audio") is not None:
        out["audio"] = get("audio")(mel)
        if get("proj_a") is not None:
            out["proj_a"] = get("proj_a")(out["audio"])
        if get("ctc_head") is not None:
            out["ctc_head"] = get("ctc_head")(out["audio"])
    if get("proj_v") is not None and get("vision") is not None:
        out["proj_v"] = get("proj_v")(out["vision"])
    if get("talker") is not None:
        out["talker"] = torch.cat(get("talker")(codes), dim=-1)
    if get("rvq") is not None:
        out["rvq"] = get("rvq").decode(codes)
    if get("vocoder") is not None:
        out["vocoder"] = get("vocoder")(mel.transpose(1, 2)[:, :, :6])
    return out


def assert_matches(comps: Components, refs: dict, expect: set[str] | None = None) -> None:
    got, want = outputs(comps), outputs(refs)
    if expect is not None:
        assert set(got) == expect, f"loaded {sorted(got)}, expected {sorted(expect)}"
    for k, v in got.items():
        assert close(v, want[k]), f"{k}: max abs diff {float((v - want[k]).abs().max()):.3g}"


FULL = {"thinker", "vision", "audio", "proj_a", "proj_v", "talker", "rvq", "vocoder", "ctc_head"}


def write_cfg(path: Path, cfg: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg), encoding="utf-8")


def set_thinker_cfg(tree: Path, **changes) -> None:
    """A thinker hyper-parameter in thinker_tiny.json and in the omni config's nested thinker object (which
    takes precedence for the omni checkpoint's thinker)."""
    edit_cfg(tree / "configs" / "thinker_tiny.json", **changes)
    omni = tree / "configs" / "omni_sft_tiny.json"
    edit_cfg(omni, thinker={**json.loads(omni.read_text())["thinker"], **changes})


def edit_cfg(path: Path, **changes) -> None:
    cfg = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg))


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "checkpoints")



pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------- architectures

@pytest.mark.parametrize("attention,ffn,moe", [("gqa", "swiglu", False), ("mha", "gelu", False),
                                               ("gqa", "swiglu", True), ("mha", "gelu", True)])
def test_architectures_reload_identically(tmp_path, attention, ffn, moe):
    root = make_tree(tmp_path / "checkpoints", attention=attention, ffn=ffn, moe=moe)
    refs = reference_modules(attention=attention, ffn=ffn, moe=moe)
    comps = load_components(root / "omni_sft_tiny")
    assert_matches(comps, refs, FULL)
    block = comps.thinker.cfg.block
    assert block.fused_qkv == (attention == "mha") and block.ffn == ffn and bool(block.num_experts) == moe
    assert close(thinker_logits(load_components(root / "thinker_tiny").thinker), thinker_logits(refs["thinker"]))


def test_moe_top_k_comes_from_config(tmp_path):
    root = make_tree(tmp_path / "checkpoints", moe=True)
    logits = {}
    for k in (1, 2):
        edit_cfg(root / "configs" / "thinker_tiny.json", num_experts_per_tok=k)
        thinker = load_components(root / "thinker_tiny").thinker
        assert thinker.cfg.block.num_experts_per_tok == k
        logits[k] = thinker_logits(thinker)
        assert close(logits[k], thinker_logits(reference_modules(moe=True, top_k=k)["thinker"]))
    assert not close(logits[1], logits[2]), "top-1 and top-2 routing gave the same logits"


@pytest.mark.parametrize("factor", [4, 8])
def test_audio_downsample(tmp_path, factor):
    root = make_tree(tmp_path / "checkpoints", audio_downsample=factor)
    comps = load_components(root / "audio_enc_tiny")
    assert comps.audio.cfg.downsample == factor
    refs = reference_modules(audio_downsample=factor)
    mel = torch.rand(1, 50, 128) * 10
    with torch.inference_mode():
        got = comps.audio(mel)
        assert got.shape == (1, -(-50 // factor), 24)
        assert close(got, refs["audio"](mel))
        assert close(comps.ctc_head(got), refs["ctc_head"](got))


@pytest.mark.parametrize("component,key,heads", [("thinker", "n_heads", 2), ("vision", "n_heads", 4),
                                                 ("audio", "n_heads", 2), ("talker", "n_heads", 6)])
def test_heads_come_from_config(tree, component, key, heads):
    """Head counts cannot be read off the shapes: a non-default value in the config changes the outputs and
    matches an in-memory model built with it."""
    names = {"thinker": "thinker_tiny", "vision": "vision_tiny", "audio": "audio_enc_tiny", "talker": "talker_tiny"}
    before = outputs(load_components(tree)).get(component)
    if component == "thinker":
        set_thinker_cfg(tree, **{key: heads})
    else:
        edit_cfg(tree / "configs" / f"{names[component]}.json", **{key: heads})
    comps = load_components(tree)
    refs = reference_modules(**{f"{component}_heads": heads})
    after, want = outputs(comps)[component], outputs(refs)[component]
    assert close(after, want)
    assert not close(after, before), f"{component}: n_heads {heads} did not change the outputs"


@pytest.mark.parametrize("component", ["thinker", "talker"])
def test_rope_theta_comes_from_config(tree, component):
    cfg = {"thinker": "thinker_tiny", "talker": "talker_tiny"}[component]
    before = outputs(load_components(tree))[component]
    if component == "thinker":
        set_thinker_cfg(tree, rope_theta=321.0)
    else:
        edit_cfg(tree / "configs" / f"{cfg}.json", rope_theta=321.0)
    comps = load_components(tree)
    refs = reference_modules(**{"rope_theta" if component == "thinker" else "talker_rope_theta": 321.0})
    after = outputs(comps)[component]
    assert close(after, outputs(refs)[component])
    assert not close(after, before)


def test_vocoder_dilations_come_from_config(tree):
    """Dilations do not show in the weight shapes: resblock_dilation_sizes from vocoder_tiny.json is honoured."""
    from models.vocoder import HiFiGANConfig, HiFiGANGenerator
    voc = random_init(HiFiGANGenerator(HiFiGANConfig(upsample_initial_channel=16,
                                                     resblock_dilation_sizes=((1, 3), (1, 3), (1, 3)))), 3)
    torch.save({"generator": voc.state_dict()}, tree / "vocoder_tiny" / "vocoder.pt")
    mel = torch.rand(1, 128, 5)
    edit_cfg(tree / "configs" / "vocoder_tiny.json", resblock_dilation_sizes=[[1, 3], [1, 3], [1, 3]])
    with torch.inference_mode():
        assert close(load_components(tree).vocoder(mel), voc(mel))
        edit_cfg(tree / "configs" / "vocoder_tiny.json", resblock_dilation_sizes=None)
        assert not close(load_components(tree).vocoder(mel), voc(mel))  # spec default (1, 2) is another network


def test_vision_checkpoint_of_another_image_size(tree):
    """img_size and patch are read off `pos` and `proj`: a 112 px / patch 8 ViT loads and answers images."""
    from models.vision import ViTConfig, ViTTiny
    from omni import OmniModel
    vit = random_init(ViTTiny(ViTConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, patch=8, img_size=112)), 4)
    torch.save({"vit": vit.state_dict()}, tree / "vision_tiny" / "vision.pt")
    comps = load_components(tree / "omni_sft_tiny")
    assert (comps.vision.cfg.img_size, comps.vision.cfg.patch) == (112, 8)
    img = torch.rand(1, 3, 112, 112)
    with torch.inference_mode():
        assert close(comps.vision(img)[0], vit(img)[0])
    ans = OmniModel(comps, torch.device("cpu")).answer("hi", image=torch.rand(3, 224, 224), max_new_tokens=2)
    assert ans.prompt_tokens > 1


def test_repl_video_uses_the_checkpoints_image_size(tree):
    """/video (REPL and pipes) decodes frames at the vision checkpoint's size, as --video does: with a 112 px ViT
    the piped /video answer equals the one-shot --video answer and the API's (224 px frames would not fit)."""
    from models.vision import ViTConfig, ViTTiny
    from omni import load_model
    vit = random_init(ViTTiny(ViTConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, patch=8, img_size=112)), 4)
    torch.save({"vit": vit.state_dict()}, tree / "vision_tiny" / "vision.pt")
    video = EXAMPLES / "shapes.mp4"
    model = load_model(tree / "omni_sft_tiny", device="cpu")
    from utils.cli.repl import Attachments, attach
    attached = Attachments()
    attach(model, "video", str(video), attached, 2)  # the REPL's and pipes' /video
    frames = model.load_media(video=video, video_frames=2).images  # what --video and the API use
    assert [f.shape for f in attached.images] == [f.shape for f in frames] == [(3, 112, 112)] * 2
    assert all(torch.equal(a, b) for a, b in zip(attached.images, frames))
    want = model.answer("what is it ?", video=video, video_frames=2, max_new_tokens=4).token_ids
    base = [sys.executable, str(REPO / "infer_chat.py"), "--ckpt_dir", str(tree / "omni_sft_tiny"), "--device", "cpu",
            "--max_new_tokens", "4", "--video_frames", "2", "--json"]
    piped = forkserver.run(base, input=f"/video {video}\nwhat is it ?\n", capture_output=True, text=True,
                           timeout=120)
    assert piped.returncode == 0, piped.stderr
    one_shot = forkserver.run(base + ["--video", str(video), "--text", "what is it ?"], capture_output=True, text=True,
                              timeout=120)
    assert one_shot.returncode == 0, one_shot.stderr
    assert json.loads(piped.stdout)["token_ids"] == json.loads(one_shot.stdout)["token_ids"] == want


def test_ctx_len_from_config(tree):
    edit_cfg(tree / "configs" / "thinker_tiny.json", ctx_len=64)
    comps = load_components(tree / "thinker_tiny")
    assert comps.ctx_len == 64 and comps.thinker.rotary.max_len >= 64
    omni = tree / "configs" / "omni_sft_tiny.json"
    cfg = json.loads(omni.read_text())
    cfg["thinker"].pop("ctx_len")
    cfg["ctx_len"] = 96
    omni.write_text(json.dumps(cfg))
    assert load_components(tree / "omni_sft_tiny").ctx_len == 96


def test_ctx_len_limits_the_audio_tokens(tree):
    from omni import OmniModel
    edit_cfg(tree / "configs" / "omni_sft_tiny.json", ctx_len=40, thinker=None)
    edit_cfg(tree / "configs" / "thinker_tiny.json", ctx_len=None)
    m = OmniModel(load_components(tree / "omni_sft_tiny"), torch.device("cpu"))
    assert m.parts.ctx_len == 40
    ans = m.answer("what did you hear ?", audio=np.tile(WAVE, 4), max_new_tokens=4)
    assert any("audio trimmed" in w for w in ans.warnings)
    assert ans.prompt_tokens <= 40 - 4


# ---------------------------------------------------------------- weights files

def wrong_thinker_sd() -> dict:
    """Same architecture, other weights: a file the loader must not pick."""
    return random_init(ThinkerLM(thinker_config()), 99).state_dict()


def thinker_variant(d: Path, variant: str) -> None:
    """Rewrite d/thinker.pt in one of the legal forms; 'wrong' weights come from another seed."""
    right = torch.load(d / "thinker.pt", weights_only=True)
    sd = right["model"]
    wrong = {"model": wrong_thinker_sd()}
    (d / "thinker.pt").unlink()
    if variant == "model.pt":
        torch.save(right, d / "model.pt")
    elif variant == "steps_900_1200":
        torch.save(wrong, d / "thinker_step_900.pt")
        torch.save(right, d / "thinker_step_1200.pt")
    elif variant == "steps_99_100":
        torch.save(right, d / "thinker_step_100.pt")
        torch.save(wrong, d / "thinker_step_99.pt")
    elif variant == "name_beats_model_and_steps":
        torch.save(right, d / "thinker.pt")
        torch.save(wrong, d / "model.pt")
        torch.save(wrong, d / "thinker_step_5000.pt")
    elif variant == "model_beats_steps":
        torch.save(right, d / "model.pt")
        torch.save(wrong, d / "thinker_step_5000.pt")
    elif variant == "bare":
        torch.save(sd, d / "thinker.pt")
    elif variant == "bare_model.pt":
        torch.save(sd, d / "model.pt")
    elif variant == "compiled":
        torch.save({**right, "model": compiled_keys(sd)}, d / "thinker.pt")
    elif variant == "compiled_bare_model.pt":
        torch.save(compiled_keys(sd), d / "model.pt")
    elif variant == "thinker_key_model.pt":  # the omni trainer's wrapper name, without projectors
        torch.save({"thinker": sd, "optimizer": {"state": {}}}, d / "model.pt")
    else:
        raise ValueError(variant)


THINKER_VARIANTS = ["model.pt", "steps_900_1200", "steps_99_100", "name_beats_model_and_steps", "model_beats_steps",
                    "bare", "bare_model.pt", "compiled", "compiled_bare_model.pt", "thinker_key_model.pt"]


@pytest.mark.parametrize("variant", THINKER_VARIANTS)
def test_thinker_weights_file(tree, variant):
    thinker_variant(tree / "thinker_tiny", variant)
    comps = load_components(tree / "thinker_tiny")
    assert close(thinker_logits(comps.thinker), thinker_logits(reference_modules()["thinker"]))
    # The same directory found as a sibling from the checkpoints root (no omni dir there).
    shutil.rmtree(tree / "omni_sft_tiny")
    comps = load_components(tree)
    assert_matches(comps, reference_modules(), FULL - {"proj_a", "proj_v"})


def test_step_file_numeric_order_names_the_file(tree):
    thinker_variant(tree / "thinker_tiny", "steps_900_1200")
    assert Path(load_components(tree / "thinker_tiny").sources["thinker"]).name == "thinker_step_1200.pt"


def resave(path: Path, new: Path, transform) -> None:
    obj = torch.load(path, weights_only=True)
    path.unlink()
    torch.save(transform(obj), new)


@pytest.mark.parametrize("case", [
    "omni_step", "omni_model.pt", "omni_compiled", "audio_step", "audio_model.pt", "vision_bare", "vision_model.pt",
    "vision_compiled", "talker_model.pt", "talker_steps", "vocoder_hifigan", "vocoder_model.pt", "vocoder_bare"])
def test_component_weights_files(tree, case):
    t = tree
    if case == "omni_step":
        torch.save({"thinker": wrong_thinker_sd(), "proj_a": {}, "proj_v": {}}, t / "omni_sft_tiny/omni_step_90.pt")
        resave(t / "omni_sft_tiny/omni.pt", t / "omni_sft_tiny/omni_step_100.pt", lambda o: o)
    elif case == "omni_model.pt":
        resave(t / "omni_sft_tiny/omni.pt", t / "omni_sft_tiny/model.pt", lambda o: o)
    elif case == "omni_compiled":
        resave(t / "omni_sft_tiny/omni.pt", t / "omni_sft_tiny/omni.pt",
               lambda o: {k: compiled_keys(v) for k, v in o.items()})
    elif case == "audio_step":
        resave(t / "audio_enc_tiny/audio_enc.pt", t / "audio_enc_tiny/audio_enc_step_1200.pt", lambda o: o)
    elif case == "audio_model.pt":
        resave(t / "audio_enc_tiny/audio_enc.pt", t / "audio_enc_tiny/model.pt",
               lambda o: {"enc": compiled_keys(o["enc"]), "head": o["head"], "optimizer": {"state": {}}})
    elif case == "vision_bare":
        resave(t / "vision_tiny/vision.pt", t / "vision_tiny/vision.pt", lambda o: o["vit"])
    elif case == "vision_model.pt":
        resave(t / "vision_tiny/vision.pt", t / "vision_tiny/model.pt", lambda o: o)
    elif case == "vision_compiled":
        resave(t / "vision_tiny/vision.pt", t / "vision_tiny/model.pt", lambda o: compiled_keys(o["vit"]))
    elif case == "talker_model.pt":
        resave(t / "talker_tiny/talker.pt", t / "talker_tiny/model.pt", lambda o: o)
    elif case == "talker_steps":
        torch.save({"talker": {}, "rvq": {}}, t / "talker_tiny/talker_step_20.pt")
        resave(t / "talker_tiny/talker.pt", t / "talker_tiny/talker_step_100.pt", lambda o: o)
    elif case == "vocoder_hifigan":
        resave(t / "vocoder_tiny/vocoder.pt", t / "vocoder_tiny/hifigan.pt",
               lambda o: {**o, "mpd": {"x": torch.zeros(1)}, "opt_g": {"state": {}}})
    elif case == "vocoder_model.pt":
        resave(t / "vocoder_tiny/vocoder.pt", t / "vocoder_tiny/model.pt", lambda o: o)
    elif case == "vocoder_bare":
        resave(t / "vocoder_tiny/vocoder.pt", t / "vocoder_tiny/vocoder.pt", lambda o: compiled_keys(o["generator"]))
    for ckpt in (t / "omni_sft_tiny", t):
        assert_matches(load_components(ckpt), reference_modules(), FULL)


# ---------------------------------------------------------------- merged exports

@pytest.mark.parametrize("compiled", [False, True], ids=["plain", "orig_mod"])
@pytest.mark.parametrize("name", ["model.safetensors", "muomni.safetensors", "omni.safetensors"])
def test_merged_export(tree, tmp_path, name, compiled):
    out = make_export(tree, tmp_path / "export", name=name, compiled=compiled)
    comps = load_components(out)
    assert Path(comps.sources["thinker"]).name == name
    assert_matches(comps, reference_modules(), FULL)
    assert comps.ctc_chars is not None and comps.generation_defaults.get("max_new_tokens") == 16


def test_export_answers_like_the_omni_dir(tree, tmp_path):
    from omni import OmniModel
    out = make_export(tree, tmp_path / "export")
    img = torch.rand(3, 224, 224, generator=torch.Generator().manual_seed(1))
    answers = []
    for d in (out, tree / "omni_sft_tiny", tree):
        m = OmniModel(load_components(d), torch.device("cpu"))
        answers.append(m.answer("what do you see ?", image=img, audio=WAVE, max_new_tokens=8).token_ids)
    assert answers[0] == answers[1] == answers[2] and len(answers[0]) > 0


# ---------------------------------------------------------------- discovery

def test_checkpoints_root(tree):
    comps = load_components(tree)
    assert_matches(comps, reference_modules(), FULL)
    assert Path(comps.sources["thinker"]).parent.name == "omni_sft_tiny"
    assert Path(comps.sources["vocoder"]).parent.name == "vocoder_tiny"


def test_repo_root_holding_checkpoints(tree):
    """--ckpt_dir at the μOmni repository root (the directory holding checkpoints/)."""
    assert_matches(load_components(tree.parent), reference_modules(), FULL)


def test_omni_pointers_cwd_relative_first_then_basename(tmp_path, monkeypatch):
    """The omni config's `vision_ckpt` is tried relative to the cwd first, then by basename among siblings."""
    root = make_tree(tmp_path / "repo" / "checkpoints")
    alt = make_tree(tmp_path / "alt" / "checkpoints", seed=50)  # a different vision encoder, same shapes
    (tmp_path / "other").mkdir()
    shutil.move(str(alt / "vision_tiny"), str(tmp_path / "other" / "vision_tiny"))
    edit_cfg(root / "configs" / "omni_sft_tiny.json", vision_ckpt="other/vision_tiny")
    monkeypatch.chdir(tmp_path)  # cwd-relative 'other/vision_tiny' exists: it wins over the sibling
    comps = load_components(root / "omni_sft_tiny")
    assert Path(comps.sources["vision"]).resolve().parent == (tmp_path / "other" / "vision_tiny").resolve()
    assert close(outputs(comps)["vision"], outputs(reference_modules(seed=50))["vision"])
    monkeypatch.chdir(tmp_path / "repo")  # not resolvable from here: the sibling with that basename
    comps = load_components(root / "omni_sft_tiny")
    assert Path(comps.sources["vision"]).parent == root / "vision_tiny"
    assert_matches(comps, reference_modules(), FULL)


def test_omni_pointers_follow_renamed_dirs(tmp_path, monkeypatch):
    names = {"thinker": "lm_v2", "omni": "sft_run3", "audio": "ears", "vision": "eyes", "talker": "voice",
             "vocoder": "hifi"}
    root = make_tree(tmp_path / "checkpoints", names=names)
    monkeypatch.chdir(tmp_path / "checkpoints")  # 'checkpoints/…' pointers do not resolve from here
    comps = load_components(root / "sft_run3")
    assert {k: Path(v).parent.name for k, v in comps.sources.items()} == {
        "thinker": "sft_run3", "vision": "eyes", "audio": "ears", "talker": "voice", "vocoder": "hifi"}
    assert_matches(comps, reference_modules(), FULL)


def test_relative_ckpt_dir(tree, monkeypatch):
    """'.', a bare relative name and 'x/..' forms find the same siblings and ../configs, ../../configs."""
    set_thinker_cfg(tree, rope_theta=321.0)
    refs = reference_modules(rope_theta=321.0)
    monkeypatch.chdir(tree / "omni_sft_tiny")
    assert_matches(load_components("."), refs, FULL)
    monkeypatch.chdir(tree)
    assert_matches(load_components("omni_sft_tiny"), refs, FULL)
    assert_matches(load_components("vision_tiny/../omni_sft_tiny"), refs, FULL)
    shutil.move(str(tree / "configs"), str(tree.parent / "configs"))  # now ../../configs of the thinker dir
    monkeypatch.chdir(tree / "thinker_tiny")
    assert load_components(".").thinker.cfg.rope_theta == 321.0


def test_windows_style_pointers(tree, tmp_path, monkeypatch):
    edit_cfg(tree / "configs" / "omni_sft_tiny.json", vision_ckpt="checkpoints\\vision_tiny",
             audio_ckpt="C:\\runs\\checkpoints\\audio_enc_tiny\\")
    monkeypatch.chdir(tmp_path)
    assert_matches(load_components(tree / "omni_sft_tiny"), reference_modules(), FULL)


def test_omni_dir_without_any_config(tmp_path, monkeypatch):
    names = {"thinker": "a1", "omni": "a2", "audio": "a3", "vision": "a4", "talker": "a5", "vocoder": "a6"}
    root = make_tree(tmp_path / "checkpoints", names=names)
    shutil.rmtree(root / "configs")
    monkeypatch.chdir(tmp_path)
    comps = load_components(root / "a2")  # siblings found by their weights files; spec default heads apply
    assert_matches(comps, reference_modules(), FULL)
    assert comps.ctx_len == 512


def test_omni_without_config_and_two_thinkers_is_ambiguous(tree):
    (tree / "configs" / "omni_sft_tiny.json").unlink()
    shutil.copytree(tree / "thinker_tiny", tree / "thinker_other")
    with pytest.raises(OmniError, match="several thinker"):
        load_components(tree / "omni_sft_tiny")


CONFIG_PLACES = ["own config.json", "ckpt/configs", "../configs", "../../configs", "./configs"]


def test_config_lookup_order(tmp_path, monkeypatch):
    """<ckpt>/config.json, <ckpt>/configs/, <ckpt>/../configs/, <ckpt>/../../configs/, ./configs/: the first
    found wins, each matched by its save_dir's basename (the file names are deliberately unrelated)."""
    root = make_tree(tmp_path / "repo" / "checkpoints")
    ckpt = root / "thinker_tiny"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    places = [ckpt / "config.json", ckpt / "configs" / "a.json", root / "configs" / "thinker_tiny.json",
              tmp_path / "repo" / "configs" / "b.json", cwd / "configs" / "c.json"]
    thetas = [100.0, 200.0, 300.0, 400.0, 500.0]
    for place, theta in zip(places, thetas):
        write_cfg(place, {"save_dir": "runs/thinker_tiny", "rope_theta": theta, "n_heads": 2})
    for i, place in enumerate(places):
        thinker = load_components(ckpt).thinker
        assert thinker.cfg.rope_theta == thetas[i], f"{CONFIG_PLACES[i]} should win"
        assert thinker.cfg.block.n_heads == 2
        assert close(thinker_logits(thinker),
                     thinker_logits(reference_modules(thinker_heads=2, rope_theta=thetas[i])["thinker"]))
        place.unlink()
    thinker = load_components(ckpt).thinker  # no config anywhere: spec defaults (4 heads, theta 10000)
    assert thinker.cfg.rope_theta == 10000.0 and thinker.cfg.block.n_heads == 4


def test_config_matched_by_save_dir_not_file_name(tree):
    """A config named like the directory but whose save_dir names another one is not applied."""
    (tree / "configs" / "thinker_tiny.json").rename(tree / "configs" / "lm.json")
    write_cfg(tree / "configs" / "thinker_tiny.json", {"save_dir": "checkpoints/other_dir", "n_heads": 1})
    assert load_components(tree / "thinker_tiny").thinker.cfg.block.n_heads == 4


def test_unrelated_json_in_cwd_configs_is_ignored(tree, tmp_path, monkeypatch):
    (tmp_path / "cwd" / "configs").mkdir(parents=True)
    (tmp_path / "cwd" / "configs" / "list.json").write_text("[1, 2]")
    (tmp_path / "cwd" / "configs" / "broken.json").write_text("{not json")
    (tree / "configs" / "thinker_tiny.json").unlink()
    monkeypatch.chdir(tmp_path / "cwd")
    assert load_components(tree / "thinker_tiny").thinker is not None


def test_vocoder_found_beside_every_layout(tree, tmp_path):
    out = make_export(tree, tmp_path / "export", with_vocoder=False)
    shutil.copy(tree / "vocoder_tiny" / "vocoder.pt", out / "hifigan.pt")
    assert Path(load_components(out).sources["vocoder"]).name == "hifigan.pt"
    for d in (tree / "thinker_tiny", tree / "omni_sft_tiny", tree):
        assert Path(load_components(d).sources["vocoder"]).parent.name == "vocoder_tiny", d
    shutil.rmtree(tree / "vocoder_tiny")
    assert load_components(tree).vocoder is None


# ---------------------------------------------------------------- errors

def corrupt(path: Path, fn) -> None:
    obj = torch.load(path, weights_only=True)
    fn(obj["model"])
    torch.save(obj, path)


@pytest.mark.parametrize("case,pattern", [
    ("missing", r"thinker\.pt.*missing key\(s\) blocks\.1\.norm2\.weight"),
    ("unexpected", r"thinker\.pt.*unexpected key\(s\) blocks\.0\.extra\.weight"),
    ("shape", r"thinker\.pt.*blocks\.1\.mlp\.up_proj\.weight \(expected \(64, 32\), found \(60, 32\)\)"),
    ("truncated", r"thinker\.pt.*(truncated|unreadable)"),
    ("nan", r"thinker\.pt.*NaN"),
    ("tokenizer", r"tokenizer.*thinker_tiny.*tokenizer\.model.*not found"),
    ("heads", r"n_heads 5 does not divide d_model 32"),
    ("heads_too_many", r"n_heads 64 does not divide d_model 32"),
    ("config_contradicts", r"'d_model' is 48 but the weights .* have 32"),
])
def test_thinker_errors(tree, case, pattern):
    pt = tree / "thinker_tiny" / "thinker.pt"
    if case == "missing":
        corrupt(pt, lambda sd: sd.pop("blocks.1.norm2.weight"))
    elif case == "unexpected":
        corrupt(pt, lambda sd: sd.__setitem__("blocks.0.extra.weight", torch.zeros(2)))
    elif case == "shape":
        corrupt(pt, lambda sd: sd.__setitem__("blocks.1.mlp.up_proj.weight", torch.zeros(60, 32)))
    elif case == "truncated":
        data = pt.read_bytes()
        pt.write_bytes(data[:len(data) // 2])
    elif case == "nan":
        corrupt(pt, lambda sd: sd["norm.weight"].fill_(float("nan")))
    elif case == "tokenizer":
        (tree / "thinker_tiny" / "tokenizer.model").unlink()
    elif case == "heads":
        edit_cfg(tree / "configs" / "thinker_tiny.json", n_heads=5)
    elif case == "heads_too_many":
        edit_cfg(tree / "configs" / "thinker_tiny.json", n_heads=64)
    elif case == "config_contradicts":
        edit_cfg(tree / "configs" / "thinker_tiny.json", d_model=48)
    with pytest.raises(OmniError, match=pattern):
        load_components(tree / "thinker_tiny")


BUILDERS = {"thinker": lambda L, sd: L.build_thinker(sd, {}, "SRC"),
            "vision": lambda L, sd: L.build_vision(sd, {}, "SRC"),
            "audio": lambda L, sd: L.build_audio(sd, {}, "SRC"), "talker": lambda L, sd: L.build_talker(sd, {}, "SRC"),
            "rvq": lambda L, sd: L.build_rvq(sd, "SRC"), "vocoder": lambda L, sd: L.build_vocoder(sd, {}, "SRC"),
            "proj_a": lambda L, sd: L.build_linear(sd, "SRC")}


@pytest.mark.parametrize("component", list(BUILDERS))
def test_every_malformed_tensor_is_a_clean_error(component):
    """Each key dropped, grown by one in every dimension, or replaced by a scalar (and each matrix flattened):
    always an OmniError naming the source, never a traceback from deep inside torch, never accepted."""
    import warnings
    from utils.weights import loading as L
    sd0 = reference_modules(moe=component == "thinker")[component].state_dict()
    for key, value in sd0.items():
        variants = {"drop": None, "grow": torch.zeros(*[n + 1 for n in value.shape]), "scalar": torch.tensor(1.0)}
        if value.dim() > 1:
            variants["flat"] = value.reshape(-1)
        for mode, replacement in variants.items():
            sd = {k: v for k, v in sd0.items() if k != key or mode != "drop"}
            if replacement is not None:
                sd[key] = replacement
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with pytest.raises(OmniError, match="SRC"):
                    BUILDERS[component](L, sd)
                    pytest.fail(f"{component}: {key} {mode} was accepted")


@pytest.mark.parametrize("case,pattern", [
    ("no_proj_v", r"omni\.pt: missing 'proj_v'"),
    ("proj_a_mismatch", r"omni\.pt: proj_a expects 20 audio features .*audio_enc\.pt\) has d_model 24"),
    ("no_thinker_dir", r"omni\.pt: no thinker directory with tokenizer\.model found \(searched .*lm_gone"),
    ("evil_sibling", r"vision\.pt: refused"),
])
def test_omni_errors(tree, tmp_path, monkeypatch, case, pattern):
    omni = tree / "omni_sft_tiny" / "omni.pt"
    obj = torch.load(omni, weights_only=True)
    if case == "no_proj_v":
        del obj["proj_v"]
    elif case == "proj_a_mismatch":
        obj["proj_a"] = torch.nn.Linear(20, 32).state_dict()
    elif case == "no_thinker_dir":
        edit_cfg(tree / "configs" / "omni_sft_tiny.json", thinker_ckpt="checkpoints/lm_gone")
        monkeypatch.chdir(tmp_path)
    elif case == "evil_sibling":
        write_malicious(tree / "vision_tiny" / "vision.pt", tmp_path / "marker")
    torch.save(obj, omni)
    with pytest.raises(OmniError, match=pattern):
        load_components(tree / "omni_sft_tiny")
    assert not (tmp_path / "marker").exists()


def test_missing_modality_names_the_search(tree):
    from omni import OmniModel
    shutil.rmtree(tree / "vision_tiny")
    m = OmniModel(load_components(tree / "omni_sft_tiny"), torch.device("cpu"))
    assert m.parts.vision is None  # never random weights
    with pytest.raises(OmniError, match=r"vision.*checkpoint.*searched .*vision_tiny"):
        m.answer("what do you see ?", image=torch.rand(3, 224, 224), max_new_tokens=2)
    assert m.answer("hello", max_new_tokens=2) is not None  # text alone still works


@pytest.mark.parametrize("target", ["nowhere", "vision_tiny", "file"])
def test_unusable_ckpt_dir(tree, target):
    path = {"nowhere": tree / "nope", "vision_tiny": tree / "vision_tiny",
            "file": tree / "thinker_tiny" / "tokenizer.model"}[target]  # a file, but not weights
    with pytest.raises(OmniError, match=str(path.name)):
        load_components(path)


class _Payload:
    """Unpickling this runs `exec`, which writes a marker file: the kind of checkpoint that must be refused."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def write_malicious(path: Path, marker: Path) -> None:
    sd = torch.load(path, weights_only=True)
    sd["optimizer"] = _Payload(marker)
    torch.save(sd, path)


def test_pickle_that_runs_code_is_refused(tree, tmp_path):
    probe, marker = tmp_path / "probe.pt", tmp_path / "marker"
    torch.save({"x": _Payload(tmp_path / "probe_marker")}, probe)
    torch.load(probe, weights_only=False)  # proves the payload really runs when unpickled unsafely
    assert (tmp_path / "probe_marker").exists()
    write_malicious(tree / "thinker_tiny" / "thinker.pt", marker)
    with pytest.raises(OmniError, match=r"thinker\.pt: refused"):
        load_components(tree / "thinker_tiny")
    assert not marker.exists()


# ---------------------------------------------------------------- the CLIs (concurrent subprocesses)

@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess]:
    """Representative CLI runs, launched together (each process mostly waits on imports)."""
    base = tmp_path_factory.mktemp("cli")
    root = make_tree(base / "checkpoints")
    steps = make_tree(base / "steps" / "checkpoints")
    thinker_variant(steps / "thinker_tiny", "steps_900_1200")
    export = make_export(root, base / "export", name="muomni.safetensors", compiled=True)
    evil = make_tree(base / "evil" / "checkpoints")
    write_malicious(evil / "thinker_tiny" / "thinker.pt", base / "marker")
    img = base / "img.png"
    from PIL import Image
    Image.fromarray((np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8)).save(img)
    wav = base / "a.wav"
    import soundfile as sf
    sf.write(str(wav), WAVE, 16000)
    elsewhere = base / "elsewhere"
    elsewhere.mkdir()
    mm = ["--image", str(img), "--audio_in", str(wav), "--text", "what do you see ?", "--max_new_tokens", "8",
          "--json"]
    runs = {
        "root": ("infer_chat.py", ["--ckpt_dir", str(root)] + mm),
        "export": ("infer_safetensors.py", ["--ckpt_dir", str(export)] + mm),
        "steps": ("infer_chat.py", ["--ckpt_dir", str(steps / "thinker_tiny"), "--text", "hello world",
                                    "--max_new_tokens", "8", "--json"]),
        "thinker_image": ("infer_chat.py", ["--ckpt_dir", str(root / "thinker_tiny"), "--image", str(img)]),
        "evil": ("infer_chat.py", ["--ckpt_dir", str(evil / "thinker_tiny"), "--text", "hi"]),
        "transcribe": ("infer_chat.py", ["--ckpt_dir", str(root / "audio_enc_tiny"), "--transcribe", "--audio_in",
                                         str(wav)]),
    }
    procs = {k: forkserver.popen([sys.executable, str(REPO / script), *args], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, cwd=elsewhere,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
             for k, (script, args) in runs.items()}
    results = {}
    for k, p in procs.items():
        out, err = p.communicate(timeout=180)
        results[k] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    results["_paths"] = {"root": root, "steps": steps, "img": img, "wav": wav, "marker": base / "marker"}
    return results


def json_ids(proc: subprocess.CompletedProcess) -> list[int]:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])["token_ids"]


def test_cli_root_and_export_agree_with_the_api(cli):
    from omni import load_model
    p = cli["_paths"]
    want = load_model(p["root"], device="cpu").answer("what do you see ?", image=p["img"], audio=p["wav"],
                                                      max_new_tokens=8).token_ids
    assert json_ids(cli["root"]) == want
    assert json_ids(cli["export"]) == want


def test_cli_step_files(cli):
    from omni import OmniModel
    ref = Components(thinker=reference_modules()["thinker"], tokenizer=load_components(
        cli["_paths"]["steps"] / "thinker_tiny").tokenizer, ctx_len=128)
    want = OmniModel(ref, torch.device("cpu")).answer("hello world", max_new_tokens=8).token_ids
    assert json_ids(cli["steps"]) == want


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one `error:` line a failed run ends with (progress lines may come before it); no traceback."""
    assert proc.returncode == 1 and proc.stdout == "", (proc.returncode, proc.stdout)
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:"), proc.stderr
    return last


def test_cli_image_with_thinker_only_dir(cli):
    line = error_line(cli["thinker_image"])
    assert "vision" in line and "searched" in line and str(cli["_paths"]["root"] / "thinker_tiny") in line


def test_cli_refuses_code_running_pickle(cli):
    line = error_line(cli["evil"])
    assert "thinker.pt" in line and "refused" in line
    assert not cli["_paths"]["marker"].exists()


def test_cli_transcribe_tiny(cli):
    proc = cli["transcribe"]
    assert proc.returncode == 0, proc.stderr
    from omni import load_model
    assert proc.stdout.strip() == load_model(cli["_paths"]["root"] / "audio_enc_tiny").transcribe(cli["_paths"]["wav"]).text
