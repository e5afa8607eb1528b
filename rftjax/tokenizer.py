"""Character-level tokenizer with a fixed, forever-stable vocabulary.

Token ids (checkpoints depend on them; never reorder):

* 0 ``<pad>``, 1 ``<bos>``, 2 ``<eos>``, 3 ``<unk>``, 4 ``<call>``, 5 ``</call>``,
  6 ``<result>``, 7 ``</result>`` (special tokens, never split),
* 8..17 the digits ``0``..``9``,
* 18..29 the characters of ``"+-*/=:,. ()#"`` in that order (26 is the space),
* 30..55 the lowercase letters ``a``..``z``.

Every other character encodes to ``<unk>``. Encoding adds no special tokens; decoding
concatenates the token strings, so ``decode(encode(s)) == s`` for any ``s`` over the vocabulary.
"""

from __future__ import annotations

import string

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS: tuple[str, ...] = (
    "<pad>",
    "<bos>",
    "<eos>",
    "<unk>",
    "<call>",
    "</call>",
    "<result>",
    "</result>",
)
DIGITS = "0123456789"
SYMBOLS = "+-*/=:,. ()#"
LETTERS = string.ascii_lowercase
CHARACTERS: str = DIGITS + SYMBOLS + LETTERS

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
UNK_ID = 3
CALL_ID = 4
END_CALL_ID = 5
RESULT_ID = 6
END_RESULT_ID = 7
DIGIT_IDS: tuple[int, ...] = tuple(range(len(SPECIAL_TOKENS), len(SPECIAL_TOKENS) + len(DIGITS)))
VOCAB: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + tuple(CHARACTERS))}
VOCAB_SIZE: int = len(VOCAB)

assert VOCAB_SIZE <= 64, VOCAB_SIZE
assert len(set(CHARACTERS)) == len(CHARACTERS)


def _backend() -> Tokenizer:
    """Builds the raw ``tokenizers.Tokenizer``: one token per character, specials kept whole."""
    tok = Tokenizer(models.WordLevel(vocab=dict(VOCAB), unk_token="<unk>"))
    # `[\s\S]` (unlike `.`) also matches newlines, so every character is its own piece.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def char_tokenizer() -> PreTrainedTokenizerFast:
    """Returns a fresh character tokenizer (``VOCAB_SIZE`` tokens, ids as in the module doc).

    ``encode``/``__call__`` add no BOS/EOS; callers add them explicitly.
    """
    fast = PreTrainedTokenizerFast(
        tokenizer_object=_backend(),
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        additional_special_tokens=list(SPECIAL_TOKENS[4:]),
        clean_up_tokenization_spaces=False,
    )
    ids = (fast.pad_token_id, fast.bos_token_id, fast.eos_token_id, fast.unk_token_id)
    if ids != (PAD_ID, BOS_ID, EOS_ID, UNK_ID) or len(fast) != VOCAB_SIZE:
        raise RuntimeError(f"char tokenizer ids drifted: specials {ids}, size {len(fast)}")
    return fast


def same_vocab(tokenizer: PreTrainedTokenizerFast) -> bool:
    """True iff ``tokenizer`` has exactly the character vocabulary of this module."""
    return dict(tokenizer.get_vocab()) == VOCAB
