"""Constrained decoding: an answer held to a grammar (any JSON object, a JSON schema, a GBNF or Lark grammar),
through llguidance (the only module that imports it).

Why llguidance: it computes a row's token mask from the grammar's lexer and parser state on the fly (no
per-vocabulary precompilation, so a new schema costs about a millisecond), takes any tokenizer given as one byte
string per id, reads JSON schemas, Lark and llama.cpp's GBNF, depends on nothing (an abi3 wheel; xgrammar pulls
transformers and triton), and on μOmni's 512-piece SentencePiece vocabulary a mask costs ~15 µs (README,
"Structured output and tools").

`Vocabulary` describes the model's ids once per model: a SentencePiece piece is its text with "▁" as a space, a
byte-fallback piece <0xNN> is that byte; control pieces (<s>, </s>), the unknown piece and ids past the
tokenizer's pieces (a thinker's embedding table may be larger) are never allowed. EOS is allowed exactly where the
grammar accepts. `Constraint` is one row's state: `mask(logits)` sets every id the grammar does not allow next to
-inf before the pick, `advance(id)` feeds the picked id and computes the next mask (into buffers allocated once
per row). A vocabulary without byte fallback may lack the characters a grammar needs: a grammar no id can start
is refused when the row is built, and a row with no id left to continue it fails with an OmniError.
"""
from __future__ import annotations

import collections
import threading
from typing import Any

import llguidance
import numpy as np
import torch

from utils.base.defaults import BOS_ID, EOS_ID
from utils.base.errors import OmniError
from utils.base.options import JSON_STYLE
from utils.media.tokenizer import Tokenizer

GRAMMAR_CACHE = 64  # compiled grammars kept per vocabulary (a server sees the same schema again and again)


def grammar_text(response_format: dict[str, Any]) -> str:
    """llguidance's grammar for a response format the options table accepted (utils.base.options): json_object,
    json_schema (its schema) or grammar (GBNF or Lark text: llguidance tells them apart)."""
    kind = response_format["type"]
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_STYLE)
    if kind == "json_schema":
        return llguidance.LLMatcher.grammar_from_json_schema(response_format["json_schema"]["schema"],
                                                             overrides=JSON_STYLE)
    if kind == "grammar":
        try:
            return llguidance.grammar_from("grammar", response_format["grammar"])
        except ValueError as exc:  # GBNF that does not convert
            raise OmniError(f"response_format grammar: {exc}") from None
    raise ValueError(f"response format {kind!r} has no grammar")


class Vocabulary:
    """The model's ids as llguidance sees them (module docstring), and the grammars compiled against them."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        sp = tokenizer.sp
        pieces = min(tokenizer.vocab_size, vocab_size)
        self.size = vocab_size
        self.tokens: list[bytes] = []
        self.special: list[int] = []
        for i in range(pieces):
            piece = sp.IdToPiece(i)
            if sp.IsControl(i) or sp.IsUnknown(i) or sp.IsUnused(i):
                self.tokens.append(b"\xff" + piece.encode())  # llguidance's mark of a special token
                self.special.append(i)
            elif sp.IsByte(i):
                self.tokens.append(bytes([int(piece[3:5], 16)]))
            else:
                self.tokens.append(piece.replace("\u2581", " ").encode())
        self.tokens += [b""] * (vocab_size - pieces)  # no text: never allowed
        self.by_bytes: dict[bytes, int] = {}
        for i, tok in enumerate(self.tokens):
            if tok and i not in self.special:
                self.by_bytes.setdefault(tok, i)
        self.longest = max(map(len, self.by_bytes), default=1)
        self.eos_token_id, self.bos_token_id, self.special_token_ids = EOS_ID, BOS_ID, self.special
        self.lltokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(self), n_vocab=vocab_size)
        self.compiled: collections.OrderedDict[str, llguidance.LLMatcher] = collections.OrderedDict()
        self.lock = threading.Lock()  # the server builds rows on its engine thread and checks them on others

    def __call__(self, text: bytes | str) -> list[int]:
        """The ids spelling `text` byte for byte, longest piece first (what llguidance tokenizes forced text
        with; SentencePiece's own encoding normalises and adds a leading space). Stops before a byte no piece
        has (a vocabulary without byte fallback)."""
        data = text.encode() if isinstance(text, str) else text
        ids, at = [], 0
        while at < len(data):
            for k in range(min(self.longest, len(data) - at), 0, -1):
                tid = self.by_bytes.get(data[at:at + k])
                if tid is not None:
                    ids.append(tid)
                    at += k
                    break
            else:
                return ids
        return ids

    def constraint(self, response_format: dict[str, Any], device: torch.device | str = "cpu") -> "Constraint":
        """A fresh row state for `response_format`; OmniError when the grammar does not compile or no id of
        this vocabulary can start it."""
        text = grammar_text(response_format)
        with self.lock:
            template = self.compiled.get(text)
            if template is None:
                template = llguidance.LLMatcher(self.lltokenizer, text, log_level=0)
                if template.is_error():
                    raise OmniError(f"response_format: {template.get_error()}")
                self.compiled[text] = template
                while len(self.compiled) > GRAMMAR_CACHE:
                    self.compiled.popitem(last=False)
            else:
                self.compiled.move_to_end(text)
            matcher = template.deep_copy()
        row = Constraint(matcher, response_format, self.size, device)
        if row.banned_cpu.all():
            raise OmniError(f"response_format: no token of this model's vocabulary ({self.size} ids) can start the "
                            "required output (its tokenizer lacks the characters, and has no byte fallback)")
        return row


# BANNED_BITS[b] = the 8 ids of a mask byte b that are NOT allowed (bit k of the byte: id 8 * byte + k allowed).
BANNED_BITS = (np.arange(256)[:, None] >> np.arange(8) & 1) == 0


class Constraint:
    """One row's grammar state (module docstring). Per token: the mask written into buffers allocated here."""

    def __init__(self, matcher: llguidance.LLMatcher, response_format: dict[str, Any], vocab_size: int,
                 device: torch.device | str) -> None:
        self.matcher, self.format, self.size = matcher, response_format, vocab_size
        words = (vocab_size + 31) // 32
        self.bits = np.zeros(words, dtype=np.uint32)  # llguidance's bitmask, little-endian words
        self.unpacked = np.zeros((words * 4, 8), dtype=bool)  # True: banned, one row per mask byte
        self.banned_cpu = self.unpacked.reshape(-1)[:vocab_size]
        cpu = torch.from_numpy(self.banned_cpu)  # shares the numpy buffer
        self.banned = cpu if torch.device(device).type == "cpu" else torch.zeros_like(cpu, device=device)
        self._compute()

    def _compute(self) -> None:
        """The next mask: llguidance's bitmask unpacked (a table lookup into the buffer, no allocation) into
        `banned`. EOS only where the output is complete (llguidance also offers it where nothing can follow)."""
        self.matcher.unsafe_compute_mask_ptr(self.bits.ctypes.data, self.bits.nbytes)
        np.take(BANNED_BITS, self.bits.view(np.uint8), axis=0, out=self.unpacked, mode="clip")
        if not self.matcher.is_accepting():
            self.banned_cpu[EOS_ID] = True
        if self.banned.device.type != "cpu":
            self.banned.copy_(torch.from_numpy(self.banned_cpu))

    def copy(self) -> "Constraint":
        """An independent state at the same point of the grammar (another choice of the same prompt)."""
        return Constraint(self.matcher.deep_copy(), self.format, self.size, self.banned.device)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` (1, V) with every id the grammar does not allow next set to -inf, in place."""
        return logits.masked_fill_(self.banned, float("-inf"))

    def advance(self, token_id: int) -> None:
        """Feed the picked id and compute the next mask. OmniError when the grammar refuses it (a pick that
        skipped the mask) or no id can continue the output (a vocabulary lacking the characters it needs)."""
        if not self.matcher.consume_token(token_id):
            raise OmniError(f"the constrained answer cannot continue with token {token_id}: "
                            f"{self.matcher.get_error() or 'not allowed by the grammar'}")
        self._compute()
        if self.banned_cpu.all():
            raise OmniError("the constrained answer is stuck: no token of this model's vocabulary continues it "
                            "(its tokenizer lacks the characters the grammar needs next)")

    @property
    def accepting(self) -> bool:
        """Whether the output so far is complete (EOS allowed)."""
        return self.matcher.is_accepting()
