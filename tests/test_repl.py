"""The interactive chat, driven through a pseudo-terminal as a user would type it."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pexpect
import pytest

from tests.conftest import REPO

TIMEOUT = 60


@pytest.fixture(scope="module")
def long_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny tree with a 2048-token context, so an answer can run long enough to be interrupted."""
    from tests.factory import make_tree
    return make_tree(tmp_path_factory.mktemp("long") / "checkpoints", ctx_len=2048)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image
    path = tmp_path_factory.mktemp("img") / "red.png"
    Image.fromarray(np.full((40, 60, 3), (220, 20, 20), np.uint8)).save(path)
    return path


def spawn(*args: str) -> pexpect.spawn:
    child = pexpect.spawn(sys.executable, [str(REPO / "infer_chat.py"), *args], cwd=str(REPO), encoding="utf-8",
                          timeout=TIMEOUT, dimensions=(50, 400))
    child.expect("You: ")
    return child


def ask(child: pexpect.spawn, text: str) -> str:
    """Send a line and return what the chat printed before the next prompt."""
    child.sendline(text)
    child.expect("You: ")
    return child.before.replace("\r\n", "\n").split("\n", 1)[1] if "\n" in child.before else ""


def test_repl_session(long_tree: Path, image: Path) -> None:
    from omni import load_model
    model = load_model(long_tree, device="cpu")
    child = spawn("--ckpt_dir", str(long_tree), "--max_new_tokens", "8", "--quiet", "--device", "cpu")
    try:
        help_text = ask(child, "/help")
        assert "/image PATH" in help_text and "/exit" in help_text and "independent" in help_text

        assert "attached image" in ask(child, f"/image {image}")
        answer = ask(child, "what do you see ?")  # streamed after the "μOmni: " prefix
        assert answer.startswith("μOmni: ")
        assert answer[len("μOmni: "):].rstrip("\n") == model.chat("what do you see ?", image=str(image),
                                                                   max_new_tokens=8)

        # the image was for that turn only; /reset drops anything attached
        assert "attached image" in ask(child, f"/image {image}")
        assert "dropped" in ask(child, "/reset")
        plain = ask(child, "what do you see ?")
        assert plain[len("μOmni: "):].rstrip("\n") == model.chat("what do you see ?", max_new_tokens=8)

        assert "error:" in ask(child, "/image /no/such/file.png")  # bad path: message, still running
        assert "unknown command" in ask(child, "/frobnicate")

        # Ollama's commands: /show info|parameters, /clear, /bye
        assert "context" in ask(child, "/show info") and "thinker" in ask(child, "/show info")
        assert "max_new_tokens 8" in ask(child, "/show parameters")
        assert "error:" in ask(child, "/show license")
        assert "attached image" in ask(child, f"/image {image}")
        assert "dropped: image" in ask(child, "/clear")

        child.sendline("/bye")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_repl_ctrl_c_stops_an_answer_and_ctrl_d_leaves(long_tree: Path) -> None:
    child = spawn("--ckpt_dir", str(long_tree), "--max_new_tokens", "2000", "--ignore_eos", "--quiet")
    try:
        child.sendintr()  # Ctrl-C at the prompt: a fresh prompt, not an exit
        child.expect("You: ")
        child.sendline("")  # an empty line is ignored
        child.expect("You: ")
        child.sendline("once upon a time")
        child.expect("μOmni: ")
        child.expect(r"\S")  # some text has been streamed
        child.sendintr()  # Ctrl-C during the answer: stop it, back to the prompt
        child.expect(r"\[stopped\]")
        # "[stopped]" is printed only for an interrupted answer (2000 tokens would take far longer than the
        # expect timeout), so reaching it is the event that shows Ctrl-C stopped the answer
        child.expect("You: ")
        child.sendcontrol("d")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_repl_set_system_and_multiline(long_tree: Path) -> None:
    from omni import load_model
    model = load_model(long_tree, device="cpu")
    child = spawn("--ckpt_dir", str(long_tree), "--max_new_tokens", "6", "--quiet", "--device", "cpu")

    def answer(text: str) -> str:
        out = ask(child, text)
        assert out.startswith("μOmni: "), out
        return out[len("μOmni: "):].rstrip("\n")

    try:
        shown = ask(child, "/set")
        assert "max_new_tokens 6" in shown and "temperature 0.0" in shown and "system (none)" in shown
        assert "set temperature to 0.7" in ask(child, "/set temperature 0.7")
        assert "set seed to 5" in ask(child, "/set parameter seed 5")  # Ollama's spelling too
        shown = ask(child, "/set")
        assert "temperature 0.7" in shown and "seed 5" in shown
        assert answer("hello there") == model.chat("hello there", max_new_tokens=6, temperature=0.7, seed=5)
        assert "error:" in ask(child, "/set top_p 2")  # a bad value: message, nothing changed, still running
        assert "temperature 0.7" in ask(child, "/set")
        ask(child, "/set temperature default")
        assert "temperature 0.0" in ask(child, "/set")

        assert "system prompt set" in ask(child, "/system be brief")
        assert answer("hello") == model.chat("hello", system="be brief", max_new_tokens=6)
        assert "cleared" in ask(child, "/system")
        assert answer("hello") == model.chat("hello", max_new_tokens=6)

        child.sendline('"""first line')  # a multi-line message, as in Ollama
        child.expect(r"\.\.\. ")
        child.sendline("/image is text here")
        child.expect(r"\.\.\. ")
        child.sendline('last"""')
        child.expect("You: ")
        out = child.before.replace("\r\n", "\n")
        said = out[out.index("μOmni: ") + len("μOmni: "):].rstrip("\n")
        assert said == model.chat("first line\n/image is text here\nlast", max_new_tokens=6)

        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
