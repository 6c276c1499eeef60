"""SentencePiece tokenizer with the μOmni special ids (unk 0, bos 1, eos 2, padding with 0)."""
from __future__ import annotations

from pathlib import Path

import sentencepiece as spm

from utils.base.defaults import BOS_ID
from utils.base.errors import OmniError



def valid_unicode(text: str) -> str:
    """Undecodable bytes (argv/stdin that is not UTF-8 arrives as lone surrogates) become U+FFFD."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


class Tokenizer:
    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise OmniError(f"tokenizer {path}: not found")
        self.path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(path.read_bytes())  # bytes: any file name, UTF-8 or not
        except Exception as exc:  # sentencepiece raises OSError/RuntimeError for corrupt models
            raise OmniError(f"tokenizer {path}: not a valid SentencePiece model ({exc})") from exc
        self.pieces = self.sp.GetPieceSize()  # fixed once loaded; decode reads it for every streamed token
        self.alone: dict[int, str] = {}  # id -> its text decoded alone (IncrementalDecoder asks once per token)

    @property
    def vocab_size(self) -> int:
        return self.pieces

    def encode(self, text: str) -> list[int]:
        return self.sp.EncodeAsIds(valid_unicode(text))

    def prompt_ids(self, text: str) -> list[int]:
        """`[bos] + encode(text)`, the layout every μOmni trainer used."""
        return [BOS_ID] + self.encode(text)

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`. Ids the tokenizer does not have (a thinker's embedding table may be larger than the
        SentencePiece vocabulary, so a model can emit them) carry no text and are skipped."""
        n = self.pieces
        return self.sp.DecodeIds([int(i) for i in ids if 0 <= int(i) < n])

    def decode_alone(self, token_id: int) -> str:
        """decode([token_id]), remembered per id: a streamed answer asks it of every token."""
        text = self.alone.get(token_id)
        if text is None:
            text = self.alone[token_id] = self.decode([token_id])
        return text


    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one id stands for, as it appears inside a text: its piece with "▁" as a space, a byte-fallback
        piece's byte, a control piece's own name (`</s>`); nothing for an id the tokenizer does not have."""
        if not 0 <= token_id < self.vocab_size:
            return b""
        piece = self.sp.IdToPiece(token_id)
        if self.sp.IsByte(token_id):
            return bytes([int(piece[3:5], 16)])
        if self.sp.IsControl(token_id) or self.sp.IsUnknown(token_id):
            return piece.encode("utf-8")
        return piece.replace("\u2581", " ").encode("utf-8")


class IncrementalDecoder:
    """Streaming detokenisation: `push(id)` returns the text that id adds to the answer so far.

    SentencePiece renders a piece differently depending on what precedes it (leading spaces of the text are
    dropped, byte-fallback pieces only form a character together), so decoding ids one by one loses spaces and
    splits multi-byte characters. Instead a window of the last ids is decoded and its new suffix emitted, held
    back while the text ends in U+FFFD (an incomplete UTF-8 sequence). Once the window holds WINDOW ids it moves
    to start at the last one if that id renders alone as non-empty text (already out): what follows such an id
    renders as it does in the whole answer (SentencePiece drops only the leading spaces of a text, and a
    character's last byte alone is one U+FFFD, as long as the character it completed), so each push decodes a
    few ids rather than the answer so far. Until one comes the window starts at the answer's first id. The
    concatenated pieces equal `decode(ids)` once `flush()` has been called."""

    WINDOW = 8

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.start = 0  # the window: ids[start:]
        self.shown = 0  # characters of the window's text already emitted

    def push(self, token_id: int) -> str:
        tid = int(token_id)
        self.ids.append(tid)
        text = self.tokenizer.decode(self.ids[self.start:])
        if text.endswith("\ufffd"):
            return ""  # wait for the rest of the character
        new = self._emit(text)
        if len(self.ids) - self.start >= self.WINDOW:
            alone = self.tokenizer.decode_alone(tid)
            if alone:
                self.start, self.shown = len(self.ids) - 1, len(alone)  # the next window starts at this id
        return new

    def flush(self) -> str:
        """Whatever is still held back (e.g. a byte sequence that never completed)."""
        return self._emit(self.tokenizer.decode(self.ids[self.start:])) if self.ids else ""

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.ids)

    def _emit(self, text: str) -> str:
        # By length, not by prefix: if a later piece ever re-renders earlier text (rare), what was already
        # printed cannot be retracted, and the stream still advances by the right number of characters.
        if len(text) <= self.shown:
            return ""
        new, self.shown = text[self.shown:], len(text)
        return new
