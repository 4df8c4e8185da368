"""Tokenizer identity and spelling: the fingerprint that keeps records and students aligned, the
exact ids a local model sees for a prompt (``encode_prompt``: harvest, training, the gateway and
forensics agree on them), and the exact bytes of each token, which let token ids cross an
OpenAI-style HTTP API and come back."""

from __future__ import annotations

import hashlib
import json
import re
import weakref
from collections.abc import Sequence
from functools import lru_cache
from typing import Protocol

import numpy as np

#: fingerprints already taken, by tokenizer object, with the vocabulary size they were taken at (a
#: tokenizer that gains tokens is hashed again); hashing serialises the whole vocabulary, 0.5 s
_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of everything that decides token ids: vocab, merges, added and special tokens.

    Two tokenizers with the same fingerprint map every text to the same ids.
    """
    try:
        size, known = _FINGERPRINTS[tokenizer]
    except (KeyError, TypeError):
        size, known = None, None
    if known is not None and size == len(tokenizer):
        return known
    found = _fingerprint(tokenizer)
    try:
        _FINGERPRINTS[tokenizer] = (len(tokenizer), found)
    except TypeError:  # not weakly referenceable: hashed every time
        pass
    return found


def _fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        payload = json.dumps(spec, sort_keys=True)
    else:
        payload = json.dumps(sorted(tokenizer.get_vocab().items()))
    return "sha256:" + hashlib.sha256(payload.encode()).hexdigest()[:16]


def encode_prompt(tokenizer, prompt: str, max_prompt_tokens: int) -> list[int]:
    """The exact ids a local model sees: the text cut to ``max_prompt_tokens``, then templated as
    one user turn (plain text when the tokenizer has no chat template)."""
    text_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if len(text_ids) > max_prompt_tokens:
        prompt = tokenizer.decode(text_ids[:max_prompt_tokens])
    if getattr(tokenizer, "chat_template", None):
        templated = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(templated, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def vocab_size(tokenizer) -> int:
    """The number of ids the tokenizer can emit (base vocab plus added tokens)."""
    return len(tokenizer)


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted: each printable stand-in character -> its byte.

    Byte-level BPE vocabularies (GPT-2, Llama 3, SmolLM2, Qwen) spell every byte as one printable
    character, so a token string read through this map gives the token's exact bytes.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    shift = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + shift)
            shift += 1
    return {chr(code): byte for byte, code in zip(printable, codes, strict=True)}


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return hasattr(tokenizer, "byte_decoder")
    return "ByteLevel" in json.dumps(json.loads(backend.to_str()).get("decoder"))


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _piece_bytes(piece: str, byte_level: bool) -> bytes:
    """The bytes a vocabulary entry stands for (byte-level BPE or SentencePiece spelling)."""
    if byte_level:
        decoder = _byte_decoder()
        if all(char in decoder for char in piece):
            return bytes(decoder[char] for char in piece)
        return piece.encode()
    fallback = _BYTE_FALLBACK.fullmatch(piece)
    if fallback:
        return bytes([int(fallback.group(1), 16)])
    return piece.replace("\u2581", " ").encode()


def token_bytes_table(tokenizer) -> list[bytes]:
    """The exact bytes of every token id, indexable by id.

    Decoding one id at a time loses bytes: a byte-level token that is half of a UTF-8 character
    decodes to U+FFFD. This table keeps them, so a server can report each token's true ``bytes``
    and a client can map them back to the id. Added and special tokens are their literal text
    (``<|im_end|>``); ids the tokenizer leaves unassigned are ``b""``.
    """
    byte_level = _is_byte_level(tokenizer)
    added = {i: token.content for i, token in tokenizer.added_tokens_decoder.items()}
    pieces = tokenizer.convert_ids_to_tokens(list(range(vocab_size(tokenizer))))
    table = []
    for token_id, piece in enumerate(pieces):
        if token_id in added:
            table.append(added[token_id].encode())
        elif piece is None:
            table.append(b"")
        else:
            table.append(_piece_bytes(piece, byte_level))
    return table


class TokenLike(Protocol):
    """One token as OpenAI-compatible APIs report it: its text and, usually, its exact bytes."""

    token: str
    bytes: list[int] | None


class TokenMapper:
    """Maps the tokens an API reports back to the ids of a known tokenizer, by their exact bytes.

    A token's ``bytes`` identify it even when its text is a U+FFFD stand-in for a partial UTF-8
    character; without ``bytes`` such a token is ambiguous and maps to -1, as do tokens the
    tokenizer does not have. When two ids spell the same bytes, the lowest id wins.
    """

    def __init__(self, tokenizer):
        self._ids: dict[bytes, int] = {}
        for token_id, spelled in enumerate(token_bytes_table(tokenizer)):
            if spelled:
                self._ids.setdefault(spelled, token_id)

    def id_for(self, token: TokenLike) -> int:
        """The id of one reported token, or -1 when it cannot be known."""
        if token.bytes is not None:
            return self._ids.get(bytes(token.bytes), -1)
        if "\ufffd" in token.token:
            return -1
        return self._ids.get(token.token.encode(), -1)

    def ids_for(self, tokens: Sequence[TokenLike]) -> list[int]:
        """The ids of reported tokens, -1 for each one that cannot be mapped."""
        return [self.id_for(token) for token in tokens]


def vocab_map(source, target) -> np.ndarray:
    """For every id of ``source``, the id of ``target`` that spells exactly the same bytes, or -1.

    Added and special tokens are matched by role, not spelling: ``source``'s end-of-sequence maps
    to ``target``'s, every other special token to -1 (SmolLM2's ``<|endoftext|>`` is id 0 and not
    an end of answer). When two target ids spell the same bytes, the lowest wins.
    """
    target_special = set(target.added_tokens_decoder)
    ids: dict[bytes, int] = {}
    for token_id, spelled in enumerate(token_bytes_table(target)):
        if spelled and token_id not in target_special:
            ids.setdefault(spelled, token_id)
    source_special = set(source.added_tokens_decoder)
    mapped = np.array(
        [
            -1 if token_id in source_special else ids.get(spelled, -1)
            for token_id, spelled in enumerate(token_bytes_table(source))
        ],
        dtype=np.int64,
    )
    if source.eos_token_id is not None and target.eos_token_id is not None:
        mapped[source.eos_token_id] = target.eos_token_id
    return mapped
