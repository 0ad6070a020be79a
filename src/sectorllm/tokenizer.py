"""llama2.c tokenizer files: byte-pair encoding exactly as run.c does it, and decoding to printable bytes."""

from __future__ import annotations

import heapq
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import TokenizerError, UsageError

BOS = 1
EOS = 2
BYTE_TOKEN_OFFSET = 3  # byte b falls back to token b + 3 (<0x00> is token 3)
_BYTE_PIECE = re.compile(rb"^<0x([0-9A-Fa-f]{2})>$")
_NO_MERGE = float(np.float32(-1e10))  # run.c's starting best score: pairs scoring no higher never merge


def is_printable(byte: int) -> bool:
    """C-locale isprint or isspace: the single bytes run.c's safe_printf lets through."""
    return 0x20 <= byte <= 0x7E or 0x09 <= byte <= 0x0D


@dataclass(frozen=True)
class Tokenizer:
    pieces: list[bytes]  # token id -> its piece as stored (may be "<0xNN>")
    scores: np.ndarray  # (vocab_size,) float32 merge scores
    max_token_length: int
    ids: dict[bytes, int] = field(repr=False)  # piece -> token id

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, max_token_length={self.max_token_length})"

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """run.c's encode(): dummy-prefix space, code points as pieces, byte fallback, best-score merges."""
        data = text.encode("utf-8", errors="surrogateescape")
        if b"\0" in data:
            raise UsageError("the prompt contains a NUL character: remove it")
        tokens = [BOS] if bos else []
        if data:
            tokens.append(self._lookup(b" "))
        tokens += self._code_point_tokens(data)
        tokens = self._merge(tokens)
        if eos:
            tokens.append(EOS)
        return tokens

    def _lookup(self, piece: bytes) -> int:
        try:
            return self.ids[piece]
        except KeyError:
            raise TokenizerError(f"tokenizer has no piece {piece!r}: not a Llama 2 sentencepiece vocabulary") from None

    def _code_point_tokens(self, data: bytes) -> list[int]:
        """Split into UTF-8 sequences (at most 4 bytes, as run.c cuts them) and look each up whole."""
        tokens: list[int] = []
        start = 0
        for i in range(len(data)):
            next_continues = i + 1 < len(data) and data[i + 1] & 0xC0 == 0x80
            if next_continues and i + 1 - start < 4:
                continue
            chunk = data[start:i + 1]
            token = self.ids.get(chunk)
            tokens += [token] if token is not None else [b + BYTE_TOKEN_OFFSET for b in chunk]
            start = i + 1
        return tokens

    def _merge(self, tokens: list[int]) -> list[int]:
        """Repeatedly merge the best-scoring adjacent pair, leftmost on ties, as run.c's O(n^2) loop would.

        A heap of candidate pairs keyed by (-score, position) finds the same pair in O(log n); stale
        entries (a side already merged away) are skipped when popped.
        """
        n = len(tokens)
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        alive = [True] * n
        heap: list[tuple[float, int, int, int]] = []

        def push(left: int) -> None:
            right = nxt[left]
            if right >= n:
                return
            merged = self.ids.get(self.pieces[tokens[left]] + self.pieces[tokens[right]])
            if merged is not None and self.scores[merged] > _NO_MERGE:
                heapq.heappush(heap, (-float(self.scores[merged]), left, tokens[right], merged))

        for i in range(n - 1):
            push(i)
        while heap:
            _, left, right_token, merged = heapq.heappop(heap)
            right = nxt[left]
            if not alive[left] or right >= n or tokens[right] != right_token or \
                    self.pieces[tokens[left]] + self.pieces[right_token] != self.pieces[merged]:
                continue
            tokens[left] = merged
            alive[right] = False
            nxt[left] = nxt[right]
            if nxt[right] < n:
                prv[nxt[right]] = left
            if prv[left] >= 0:
                push(prv[left])
            push(left)
        return [t for t, a in zip(tokens, alive) if a]

    def piece_bytes(self, prev_token: int, token: int) -> bytes:
        """The bytes run.c prints for `token` after `prev_token` ("" when safe_printf would skip it)."""
        piece = self.pieces[token]
        if prev_token == BOS and piece.startswith(b" "):
            piece = piece[1:]
        byte = _BYTE_PIECE.match(piece)
        if byte:
            piece = bytes([int(byte.group(1), 16)])
        if len(piece) == 1 and not is_printable(piece[0]):
            return b""
        return piece

    def decode(self, tokens: list[int], prev_token: int = BOS) -> bytes:
        """Bytes printed for a token sequence, each piece decoded after its predecessor."""
        out = bytearray()
        for token in tokens:
            out += self.piece_bytes(prev_token, token)
            prev_token = token
        return bytes(out)


def piece_ids(pieces: list[bytes]) -> dict[bytes, int]:
    """Each piece's id; a piece listed twice keeps its first id, as run.c's sorted-vocab lookup finds it."""
    ids: dict[bytes, int] = {}
    for i, piece in enumerate(pieces):
        ids.setdefault(piece, i)
    return ids


def load_tokenizer(path: str | os.PathLike, vocab_size: int | None = None) -> Tokenizer:
    """Read a llama2.c tokenizer .bin; with vocab_size, refuse a tokenizer made for another model."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TokenizerError(f"cannot read tokenizer {path}: {e.strerror}") from None
    if len(data) < 4:
        raise TokenizerError(f"{path} is {len(data)} bytes: not a llama2.c tokenizer file")
    (max_token_length,) = struct.unpack_from("<i", data, 0)
    if not 0 < max_token_length <= 1024:
        raise TokenizerError(f"{path}: max token length {max_token_length} is impossible: not a tokenizer file")
    pieces: list[bytes] = []
    scores: list[float] = []
    offset = 4
    while offset < len(data):
        if offset + 8 > len(data):
            raise TokenizerError(f"{path} is truncated inside entry {len(pieces)}: the file is damaged")
        score, length = struct.unpack_from("<fi", data, offset)
        offset += 8
        if not 0 < length <= max_token_length or offset + length > len(data) or not np.isfinite(score):
            raise TokenizerError(f"{path}: entry {len(pieces)} is malformed (length {length}): the file is damaged")
        pieces.append(data[offset:offset + length])
        scores.append(score)
        offset += length
    if len(pieces) <= BYTE_TOKEN_OFFSET + 255 or b" " not in pieces:
        raise TokenizerError(f"{path} holds {len(pieces)} pieces without the byte fallback: not a Llama 2 tokenizer")
    if vocab_size is not None and len(pieces) != vocab_size:
        hint = "tok512.bin" if vocab_size == 512 else "tokenizer.bin" if vocab_size == 32000 else "its own tokenizer"
        raise TokenizerError(
            f"{path} has {len(pieces)} tokens but the model has a vocabulary of {vocab_size}: use {hint} (-z)"
        )
    return Tokenizer(pieces, np.array(scores, dtype=np.float32), max_token_length, piece_ids(pieces))
