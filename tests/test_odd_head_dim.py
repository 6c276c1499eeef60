"""A thinker whose head dimension is odd (d_model 30 over 2 heads: 15) cannot take rotary positions on either
decode step: loading refuses it with one `error:` line naming the shapes, under every decode_kernel, instead of
the torch step failing on the rotary table's shape (`unexpected RuntimeError`)."""
from __future__ import annotations

import functools
from pathlib import Path

import pytest

from tests import factory
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def odd_heads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A make_tree tree whose thinker has d_model 30 and 2 heads."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(factory, "thinker_config", functools.partial(factory.thinker_config, d_model=30))
        return factory.make_tree(tmp_path_factory.mktemp("odd") / "checkpoints", thinker_heads=2)


@pytest.mark.parametrize("kernel", ["auto", "c", "torch"])
def test_an_odd_head_dimension_is_refused_at_load(odd_heads: Path, kernel: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MUOMNI_CACHE_DIR", str(tmp_path / "cache"))
    done = run_cli("--ckpt_dir", str(odd_heads), "--text", "hi", "--decode_kernel", kernel)
    assert done.returncode == 1 and done.stdout == ""
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "unexpected" not in last
    assert "heads of 15 dimensions; rotary positions need an even head dimension" in last
