"""SentencePiece tokenizer with the μOmni special ids (unk 0, bos 1, eos 2, padding with 0)."""
from __future__ import annotations

from pathlib import Path

import sentencepiece as spm

from utils.errors import OmniError

BOS_ID, EOS_ID, PAD_ID = 1, 2, 0


class Tokenizer:
    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise OmniError(f"tokenizer {path}: not found")
        self.path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except Exception as exc:  # sentencepiece raises OSError/RuntimeError for corrupt models
            raise OmniError(f"tokenizer {path}: not a valid SentencePiece model ({exc})") from exc

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

    def encode(self, text: str) -> list[int]:
        return self.sp.EncodeAsIds(text)

    def prompt_ids(self, text: str) -> list[int]:
        """`[bos] + encode(text)`, the layout every μOmni trainer used."""
        return [BOS_ID] + self.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.DecodeIds(list(ids))
