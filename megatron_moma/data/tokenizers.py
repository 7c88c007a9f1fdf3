"""Text tokenizers for preprocessing: a built-in byte-level one and Hugging Face ones.

Both expose `vocab_size`, the special ids `eod`, `pad`, `begin_of_image`, `end_of_image` (None
when the tokenizer has no such token), `tokenize(text) -> list of ids` and `detokenize(ids)`.
Names follow Megatron-LM's `--tokenizer-type` values where one exists.
"""

from typing import List, Optional, Sequence

BYTE_LEVEL = "ByteLevel"
HUGGING_FACE = "HuggingFaceTokenizer"
TOKENIZER_TYPES = (BYTE_LEVEL, HUGGING_FACE)


class ByteLevelTokenizer:
    """UTF-8 bytes as ids 0-255, then end-of-document 256, pad 257, begin/end-of-image 258/259.

    Needs no files and no package, so the sample corpus and the tests run anywhere.
    """

    vocab_size = 260
    eod = 256
    pad = 257
    begin_of_image = 258
    end_of_image = 259

    def tokenize(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids: Sequence[int]) -> str:
        """Bytes back to text; special ids are dropped."""
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def describe(self) -> dict:
        return {"type": BYTE_LEVEL}


class HuggingFaceTokenizer:
    """A Hugging Face tokenizer read from a local folder (no download); needs `transformers`.

    `eod` is the tokenizer's end-of-sequence id. It has no image sentinels of its own: give their
    ids with `--begin-of-image-id`/`--end-of-image-id` or let the tool append them.
    """

    begin_of_image = None
    end_of_image = None

    def __init__(self, path: str):
        try:
            from transformers import AutoTokenizer
        except ImportError as error:
            raise ImportError(
                f"--tokenizer-type {HUGGING_FACE} needs transformers: pip install 'megatron-moma[hf]'"
            ) from error
        self.path = path
        self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if self._tokenizer.eos_token_id is None:
            raise ValueError(
                f"the tokenizer at {path!r} has no end-of-sequence token to end documents"
            )

    @property
    def vocab_size(self) -> int:
        return len(self._tokenizer)

    @property
    def eod(self) -> int:
        return self._tokenizer.eos_token_id

    @property
    def pad(self) -> Optional[int]:
        return self._tokenizer.pad_token_id

    def tokenize(self, text: str) -> List[int]:
        return self._tokenizer(text, add_special_tokens=False)["input_ids"]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids))

    def describe(self) -> dict:
        return {"type": HUGGING_FACE, "model": self.path}


def build_tokenizer(tokenizer_type: str, tokenizer_model: Optional[str] = None):
    """The tokenizer named by Megatron-style `--tokenizer-type` / `--tokenizer-model`."""
    if tokenizer_type == BYTE_LEVEL:
        return ByteLevelTokenizer()
    if tokenizer_type == HUGGING_FACE:
        if not tokenizer_model:
            raise ValueError(
                f"--tokenizer-type {HUGGING_FACE} needs --tokenizer-model (a local folder)"
            )
        return HuggingFaceTokenizer(tokenizer_model)
    raise ValueError(
        f"unknown tokenizer type {tokenizer_type!r}; expected one of {TOKENIZER_TYPES}"
    )
