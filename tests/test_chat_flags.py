"""infer_chat.py's flags as users type them, run as they run it (subprocesses on the shipped demo model):
--video_frames' range, --seed -1, dash spellings without prefix matching, the timing figures of --json and
--timings, and --system. Expected answers come from the library (omni.py), never from hard-coded strings."""
from __future__ import annotations

import re
import subprocess

import pytest

from tests.conftest import DEMO, EXAMPLES, QUESTION, REPO, needs_demo, one_json, run_cli, run_demo

pytestmark = [needs_demo, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def timed() -> subprocess.CompletedProcess:
    """One `--text QUESTION --json --timings` run, read by several tests: the JSON answer and its timing object
    on stdout, the --timings summary on stderr."""
    return run_demo("--text", QUESTION, "--json", "--timings")


def test_video_frames_limit_is_a_usage_error_and_seed_minus_one_is_random() -> None:
    from utils.cli import args as cli_args
    from utils.media import image
    assert cli_args.MAX_VIDEO_FRAMES == image.MAX_VIDEO_FRAMES  # the usage check and the decoder agree
    r = run_demo("--video", str(EXAMPLES / "shapes.mp4"), "--video_frames", "300")
    assert r.returncode == 2 and "--video_frames" in r.stderr and "256" in r.stderr
    sampled = ["--text", "Once upon a time", "--temperature", "1.5", "--max_new_tokens", "8", "--json"]
    a = one_json(run_demo(*sampled, "--seed", "-1"))
    assert isinstance(a["seed"], int) and a["seed"] >= 0
    again = one_json(run_demo(*sampled, "--seed", str(a["seed"])))
    assert again["token_ids"] == a["token_ids"]  # the reported seed reproduces the answer


def test_dash_aliases_and_exact_names_only(demo_model) -> None:
    r = run_cli("--ckpt-dir", str(DEMO), "--text", QUESTION, "--max-new-tokens", "1", "--temp", "0", "--json")
    obj = one_json(r)
    assert obj["token_ids"] == demo_model.answer(QUESTION, max_new_tokens=1).token_ids
    for prefix in (["--max_new", "3"], ["--tempera", "0"], ["--ckpt", str(DEMO)]):
        p = run_cli("--ckpt_dir", str(DEMO), "--text", "hi", *prefix)
        assert p.returncode == 2 and "unrecognized arguments" in p.stderr, prefix
    # --help lists the dash spellings: test_first_run.test_help_lists_the_new_flags


def test_decode_rate_counts_every_decode_step(demo_model, timed) -> None:
    """decode_tokens_per_s = decode_steps / decode_s for any length. Checked on the counts and on the formula,
    never on how fast this machine ran: decode_steps exactly, the rate within what rounding decode_s to the
    microsecond allows, and omni.answer_timing on fixed figures."""
    from omni import answer_timing
    ans = demo_model.answer(QUESTION)  # a short answer ended by EOS
    short = one_json(timed)
    t = short["timing"]
    assert short["token_ids"] == ans.token_ids and len(ans.token_ids) < demo_model.sampling_options().max_new_tokens
    assert t["decode_steps"] == short["generated_tokens"] == len(ans.token_ids)  # the tokens after the first, + EOS
    assert t["decode_s"] > 0
    low, high = t["decode_steps"] / (t["decode_s"] + 5e-7), t["decode_steps"] / max(t["decode_s"] - 5e-7, 1e-12)
    assert low - 5e-4 <= t["decode_tokens_per_s"] <= high + 5e-4  # decode_s is reported to 6 decimals
    one = one_json(run_demo("--text", QUESTION, "--json", "--max_new_tokens", "1"))["timing"]
    assert one["decode_steps"] == 0 and one["decode_tokens_per_s"] == 0.0  # no step: no rate

    timing = answer_timing(0.25, 0.004, 9, 0.00019, 2)  # a rate from a duration that rounds badly
    assert timing["decode_steps"] == 2 and timing["decode_tokens_per_s"] == round(2 / 0.00019, 3)
    assert timing["prefill_tokens_per_s"] == round(9 / 0.004, 3) and timing["decode_s"] == 0.00019
    assert answer_timing(0.25, 0.004, 9, 0.0, 0)["decode_tokens_per_s"] == 0.0
    assert answer_timing(0.25, 0.004, 9, 0.001, 0)["decode_tokens_per_s"] == 0.0
    readme = (REPO / "README.md").read_text()
    assert "decode_tokens_per_s" in readme and "decode_steps" in readme


def test_timings_summary_on_stderr(timed) -> None:
    obj = one_json(timed)
    lines = timed.stderr.splitlines()
    assert any(re.search(r"load time =\s+[\d.]+ ms", x) for x in lines)
    prompt = next(x for x in lines if "prompt eval time" in x)
    assert f"/ {obj['prompt_tokens']:5d} tokens" in prompt and "tokens per second" in prompt
    eval_line = next(x for x in lines if re.search(r"\beval time", x) and "prompt" not in x)
    assert f"/ {obj['timing']['decode_steps']:5d} runs" in eval_line


def test_system_prompt_is_prepended_and_absent_by_default(demo_model, timed) -> None:
    model = demo_model
    system = "Answer with digits."
    plain = one_json(timed)
    assert plain["prompt_tokens"] == len(model.parts.tokenizer.prompt_ids(QUESTION))  # format unchanged
    r = run_demo("--text", QUESTION, "--system", system, "--json")
    obj = one_json(r)
    assert obj["prompt_tokens"] == len(model.parts.tokenizer.prompt_ids(f"{system} {QUESTION}"))
    assert obj["text"] == model.chat(f"{system} {QUESTION}") == model.chat(QUESTION, system=system)
    assert "eval time" not in r.stderr  # the --timings summary only when asked (--timings or --verbose)


def test_llama_cpp_spellings(demo_model, tmp_path) -> None:
    want = demo_model.answer(QUESTION)
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(QUESTION + "\n")
    # -m -f -n -t -s --repeat-penalty --temp -c: a 64-position context cuts the 1000-token budget to what is left
    obj = one_json(run_cli("-m", str(DEMO), "-f", str(prompt_file), "-n", "1000", "-t", "1", "-s", "5",
                           "--repeat-penalty", "1.0", "--temp", "0", "-c", "64", "--json"))
    assert obj["token_ids"] == want.token_ids and obj["prompt_tokens"] == want.prompt_tokens
    assert obj["budget_cut"] == {"requested": 1000, "allowed": 64 - 1 - want.prompt_tokens, "context": 64}
    r = run_cli("-m", str(DEMO), "-f", "-", "--quiet", stdin=QUESTION + "\n")  # -f - reads the prompt from stdin
    assert (r.returncode, r.stdout, r.stderr) == (0, want.text + "\n", "")
    r = run_cli("-m", str(DEMO), "-p", QUESTION, "--ctx-size", "4096")  # more than the model has: a usage error
    assert r.returncode == 2 and r.stdout == "" and "the model's context is 512 tokens" in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1


@pytest.mark.parametrize("script", ["infer_chat.py", "infer_safetensors.py", "serve.py", "batch.py"])
def test_other_tools_flags_get_one_line_naming_ours(script: str) -> None:
    for flag, ours in (("-ngl", "--device cuda"), ("--n-gpu-layers=99", "--device cuda"), ("--mlock", "no meaning"),
                       ("-fa", "--decode_kernel")):
        r = run_cli("-m", "x", flag, "1", script=script)
        assert r.returncode == 2 and r.stdout == "", (flag, r.stderr)
        assert r.stderr.count("\n") == 1 and ours in r.stderr and "usage:" not in r.stderr, (flag, r.stderr)


def test_every_script_takes_both_spellings_and_version(tmp_path) -> None:
    for script in ("infer_chat.py", "infer_safetensors.py", "transcribe.py", "serve.py", "batch.py", "export.py"):
        r = run_cli("--version", script=script)
        assert r.returncode == 0 and "μOmni inference suite" in r.stdout, (script, r.stderr)
    r = run_cli("a.wav", "--model", "x", "--fp16", "False", script="transcribe.py")  # whisper's flag: ours named
    assert r.returncode == 2 and r.stderr == "transcribe.py: error: --fp16 is not a flag of transcribe.py: use " \
                                             "--dtype float16\n", r.stderr
    # the model flags (and dashed spellings) reach the parser: the usage error is the next flag's, not --ckpt_dir's
    for script, args in (("serve.py", ["--ckpt-dir", "x", "--max-batch", "0"]),
                         ("serve.py", ["-m", "x", "--max_batch", "-1"]),
                         ("batch.py", ["--model", "x", "in.jsonl", "-o", "out.jsonl", "--max-new-tokens", "0"]),
                         ("batch.py", ["-m", "x", "in.jsonl", "--output", "out.jsonl", "-n", "0"])):
        r = run_cli(*args, script=script)
        assert r.returncode == 2 and "required" not in r.stderr and "must be an integer >= 1" in r.stderr, r.stderr
    for flag in ("--ckpt_dir", "-m"):
        r = run_cli(flag, str(tmp_path / "missing"), "--output-dir", str(tmp_path / "e"), script="export.py")
        assert r.returncode == 1 and "missing" in r.stderr and "usage:" not in r.stderr, r.stderr
