"""T5 sentencepiece tokenizer with Unified-IO's 1100 extra ids, without ``transformers``.

The reference runner builds ``transformers.T5Tokenizer.from_pretrained("t5-base",
model_max_length=256, extra_ids=1100)``.  :class:`T5Tokenizer` reproduces that object on top of
``sentencepiece`` alone:

* ids ``0..31999`` are the sentencepiece pieces (``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2);
* ``<extra_id_i>`` has id ``33099 - i`` for ``i`` in ``0..1099`` (location token for quantized
  coordinate ``q`` is ``<extra_id_{100 + q}>``), so ``len(tokenizer) == 33100``;
* encoding matches ``legacy=True`` (identical in transformers 4.20.1 and 4.57.6): the text is split
  on special tokens written literally, whitespace next to them is stripped, and each remaining
  chunk is encoded by sentencepiece with its usual ``'▁'`` dummy prefix; EOS is appended unless
  the ids already end with it;
* decoding matches transformers 4.20.1, the version the reference (and its goldens) used: special
  tokens are each followed by a space, nothing is inserted before them, ``clean_up_tokenization``
  is applied, and ids ``>= 33100`` decode as ``<extra_id_-N>`` with ``N = id - 33099``.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

__all__ = ["T5Tokenizer", "load_tokenizer", "SPIECE_FILENAME"]

SPIECE_FILENAME = "spiece.model"
PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "</s>", "<unk>"
DEFAULT_EXTRA_IDS = 1100
DEFAULT_MODEL_MAX_LENGTH = 256

_EXTRA_ID_RE = re.compile(r"<extra_id_(0|[1-9][0-9]*)>")
# transformers' clean_up_tokenization, in its order.
_CLEANUP_REPLACEMENTS = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
    (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
)

IdsLike = Sequence[int] | np.ndarray


def clean_up_tokenization(text: str) -> str:
    """Remove spaces before punctuation and English contractions, as transformers does."""
    for old, new in _CLEANUP_REPLACEMENTS:
        text = text.replace(old, new)
    return text


def resolve_spiece_path(source: str | os.PathLike) -> Path:
    """Return the ``spiece.model`` file named by ``source`` (the file itself or its folder).

    Raises:
        FileNotFoundError: when ``source`` does not exist or a folder holds no ``spiece.model``.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / SPIECE_FILENAME
    if not path.is_file():
        raise FileNotFoundError(
            f"no sentencepiece model at {str(path)!r}: pass a '{SPIECE_FILENAME}' file "
            f"or a folder that holds one")
    return path


def _load_sentencepiece(path: Path) -> spm.SentencePieceProcessor:
    """Load a sentencepiece model, turning its parse error into a ``ValueError`` with the path."""
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError) as err:
        raise ValueError(f"{str(path)!r} is not a valid sentencepiece model: {err}") from err
    return sp


class T5Tokenizer:
    """Slow T5 tokenizer (``extra_ids=1100``, ``legacy=True``) reimplemented on sentencepiece.

    Args:
        vocab_file: a ``spiece.model`` file, or a folder holding one.
        extra_ids: number of ``<extra_id_i>`` tokens appended after the sentencepiece vocabulary.
        model_max_length: length used when truncating/padding to max length without
            ``max_length``.
    """

    pad_token, eos_token, unk_token = PAD_TOKEN, EOS_TOKEN, UNK_TOKEN

    def __init__(self, vocab_file: str | os.PathLike, extra_ids: int = DEFAULT_EXTRA_IDS,
                 model_max_length: int = DEFAULT_MODEL_MAX_LENGTH) -> None:
        if extra_ids < 0:
            raise ValueError(f"extra_ids must be >= 0, got {extra_ids}")
        self.vocab_file = resolve_spiece_path(vocab_file)
        self.sp_model = _load_sentencepiece(self.vocab_file)
        self.extra_ids = int(extra_ids)
        self.model_max_length = int(model_max_length)
        self._num_pieces = self.sp_model.GetPieceSize()
        self._check_special_pieces()
        self.additional_special_tokens = [f"<extra_id_{i}>" for i in range(self.extra_ids)]
        self.all_special_tokens = [EOS_TOKEN, UNK_TOKEN, PAD_TOKEN, *self.additional_special_tokens]
        self._special_token_set = frozenset(self.all_special_tokens)
        self.all_special_ids = [self.convert_tokens_to_ids(t) for t in self.all_special_tokens]
        self._special_id_set = frozenset(self.all_special_ids)
        self._split_re = self._build_split_regex()

    # ------------------------------------------------------------------ vocabulary
    def _check_special_pieces(self) -> None:
        """Make sure the model has the T5 layout (``<pad>``=0, ``</s>``=1, ``<unk>``=2)."""
        for index, piece in enumerate((PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)):
            if self._num_pieces <= index or self.sp_model.IdToPiece(index) != piece:
                raise ValueError(
                    f"{str(self.vocab_file)!r} does not have the T5 layout "
                    f"(expected {piece!r} at id {index})")

    def _build_split_regex(self) -> re.Pattern[str]:
        """Regex matching every special token, longest alternatives first."""
        tokens = sorted(self._special_token_set, key=len, reverse=True)
        return re.compile("|".join(re.escape(t) for t in tokens))

    @property
    def vocab_size(self) -> int:
        """Sentencepiece pieces plus extra ids (33100 for t5-base with 1100 extra ids)."""
        return self._num_pieces + self.extra_ids

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def pad_token_id(self) -> int:
        """Id of ``<pad>`` (0)."""
        return 0

    @property
    def eos_token_id(self) -> int:
        """Id of ``</s>`` (1)."""
        return 1

    @property
    def unk_token_id(self) -> int:
        """Id of ``<unk>`` (2)."""
        return 2

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | list[int]:
        """Map token string(s) to id(s); unknown pieces map to ``<unk>``."""
        if isinstance(tokens, str):
            return self._token_to_id(tokens)
        return [self._token_to_id(t) for t in tokens]

    def _token_to_id(self, token: str) -> int:
        match = _EXTRA_ID_RE.fullmatch(token)
        if match is not None and int(match.group(1)) < self.extra_ids:
            return self.vocab_size - 1 - int(match.group(1))
        return self.sp_model.PieceToId(token)

    def convert_ids_to_tokens(self, ids: int | IdsLike,
                              skip_special_tokens: bool = False) -> str | list[str]:
        """Map id(s) to token string(s) (ids past the pieces become ``<extra_id_N>``)."""
        if isinstance(ids, (int, np.integer)):
            return self._id_to_token(int(ids))
        return [self._id_to_token(i) for i in _as_id_list(ids)
                if not (skip_special_tokens and i in self._special_id_set)]

    def _id_to_token(self, index: int) -> str:
        """Piece for ``index``; like transformers 4.20.1, ids >= vocab_size give negative N."""
        if index < 0:
            raise ValueError(f"token id must be >= 0, got {index}")
        if index < self._num_pieces:
            return self.sp_model.IdToPiece(index)
        return f"<extra_id_{self.vocab_size - 1 - index}>"

    # ------------------------------------------------------------------ encoding
    def tokenize(self, text: str) -> list[str]:
        """Split ``text`` into pieces, keeping literal special tokens whole (``legacy=True``)."""
        pieces: list[str] = []
        for chunk, is_special in self._split_on_special_tokens(text):
            if is_special:
                pieces.append(chunk)
            else:
                pieces.extend(self.sp_model.EncodeAsPieces(chunk))
        return pieces

    def _split_on_special_tokens(self, text: str) -> list[tuple[str, bool]]:
        """Chunks of ``text`` as ``(chunk, is_special)``, whitespace next to specials stripped."""
        chunks: list[tuple[str, bool]] = []
        start = 0
        for match in self._split_re.finditer(text):
            chunks.append((text[start:match.start()], False))
            chunks.append((match.group(), True))
            start = match.end()
        chunks.append((text[start:], False))
        return [(c, s) for c, s in _strip_around_specials(chunks) if c]

    def encode(self, text: str, max_length: int | None = None,
               truncation: bool = False) -> list[int]:
        """Ids of ``text`` followed by EOS (``tokenizer(text)['input_ids']``).

        With ``truncation`` the ids are cut to ``max_length`` (default ``model_max_length``)
        while keeping the final EOS.
        """
        ids = self.convert_tokens_to_ids(self.tokenize(text))
        if truncation:
            limit = self.model_max_length if max_length is None else max_length
            ids = ids[:max(limit - 1, 0)]
        return self._add_eos_if_not_present(ids)

    def _add_eos_if_not_present(self, ids: list[int]) -> list[int]:
        """Append EOS unless the ids already end with it (as transformers' T5 does)."""
        if ids and ids[-1] == self.eos_token_id:
            return ids
        return ids + [self.eos_token_id]

    def batch_encode(self, texts: str | Sequence[str], max_length: int | None = None,
                     truncation: bool = False, padding: bool | str = "longest") -> np.ndarray:
        """Encode a batch into an int32 ``(B, T)`` array padded with ``<pad>`` = 0.

        Matches ``tokenizer(texts, max_length=..., truncation=..., padding=...)['input_ids']``.
        ``padding`` is ``'longest'``/``True`` (pad to the longest row) or ``'max_length'``
        (pad to ``max_length``, default ``model_max_length``); ``False``/``'do_not_pad'`` only
        works when every row has the same length.
        """
        if isinstance(texts, str):
            texts = [texts]
        rows = [self.encode(t, max_length=max_length, truncation=truncation) for t in texts]
        width = self._padded_width(rows, max_length, padding)
        out = np.full((len(rows), width), self.pad_token_id, dtype=np.int32)
        for i, row in enumerate(rows):
            out[i, :len(row)] = row
        return out

    def _padded_width(self, rows: list[list[int]], max_length: int | None,
                      padding: bool | str) -> int:
        """Width of the padded batch for the given padding strategy."""
        longest = max((len(r) for r in rows), default=0)
        if padding is True or padding == "longest":
            return longest
        if padding == "max_length":
            return max(longest, self.model_max_length if max_length is None else max_length)
        if padding is False or padding == "do_not_pad":
            if any(len(r) != longest for r in rows):
                raise ValueError("rows differ in length: use padding='longest' or 'max_length'")
            return longest
        raise ValueError(f"unknown padding strategy {padding!r}")

    __call__ = batch_encode

    # ------------------------------------------------------------------ decoding
    def decode(self, ids: IdsLike, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool = True) -> str:
        """Text of ``ids`` exactly as transformers 4.20.1's ``T5Tokenizer.decode`` gives it.

        Each special token is emitted verbatim and followed by a space (the result is stripped),
        runs of ordinary pieces are decoded by sentencepiece, then ``clean_up_tokenization``
        (``' ?' -> '?'`` ...) is applied unless ``clean_up_tokenization_spaces`` is False.
        """
        tokens = self.convert_ids_to_tokens(_as_id_list(ids), skip_special_tokens)
        text = self._tokens_to_string(tokens)
        return clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    def _tokens_to_string(self, tokens: list[str]) -> str:
        """Join tokens: specials verbatim + ' ', other runs through sentencepiece."""
        out, run = "", []
        for token in tokens:
            if token in self._special_token_set:
                out += self.sp_model.DecodePieces(run) + token + " "
                run = []
            else:
                run.append(token)
        out += self.sp_model.DecodePieces(run)
        return out.strip()

    def batch_decode(self, sequences: Iterable[IdsLike], skip_special_tokens: bool = False,
                     clean_up_tokenization_spaces: bool = True) -> list[str]:
        """:meth:`decode` applied to each row of ``sequences``."""
        return [self.decode(row, skip_special_tokens, clean_up_tokenization_spaces)
                for row in sequences]

    def __repr__(self) -> str:
        return (f"T5Tokenizer(vocab_file={str(self.vocab_file)!r}, extra_ids={self.extra_ids}, "
                f"model_max_length={self.model_max_length})")


def _strip_around_specials(chunks: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """Strip whitespace of text chunks on the sides touching a special token."""
    out = list(chunks)
    for i, (chunk, is_special) in enumerate(out):
        if is_special:
            continue
        if i > 0:
            chunk = chunk.lstrip()
        if i < len(out) - 1:
            chunk = chunk.rstrip()
        out[i] = (chunk, False)
    return out


def _as_id_list(ids: IdsLike) -> list[int]:
    """Flat list of Python ints from a sequence, numpy array or CPU tensor of ids."""
    array = np.asarray(ids)
    if array.ndim != 1:
        raise ValueError(f"expected a 1-D sequence of ids, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"expected integer ids, got dtype {array.dtype}")
    return [int(i) for i in array]


def load_tokenizer(source: str | os.PathLike | None = None, **kwargs) -> T5Tokenizer:
    """Build the Unified-IO tokenizer from a ``spiece.model`` file or folder.

    With ``source=None`` the default t5-base vocabulary from :func:`uio.hub.tokenizer_path`
    is used. Extra keyword arguments go to :class:`T5Tokenizer`.
    """
    if source is None:
        from uio import hub  # lazy: hub is optional for users who pass a path

        path = hub.tokenizer_path()
        try:
            return T5Tokenizer(path, **kwargs)
        except ValueError as err:  # a damaged file of the right size
            raise ValueError(f"{err}; {hub.damaged_file_advice(path)}") from err
    return T5Tokenizer(source, **kwargs)
