"""Offline word-level tokenizers, so tiny models need no hub download.

A word-level vocabulary trained on the exact corpus a tiny model sees keeps
sequences short (one token per word) and makes every token readable in an
attribution plot.  Text is lower-cased; punctuation is split into its own
tokens; decoding re-attaches punctuation so outputs read naturally.
"""
from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

# Special tokens per chat format.  Order matters: it fixes the ids.
LLAVA_SPECIALS = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>", "extra": ["<image>"]}
QWEN_SPECIALS = {
    "pad": "<|endoftext|>",
    "unk": "<unk>",
    "bos": None,
    "eos": "<|im_end|>",
    "extra": ["<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
}

# A small general vocabulary for random-weight models that were never trained on a corpus.
BASIC_WORDS = (
    "the a an of in on at to is was were be this that these those person people image picture photo "
    "what who where when which how why name named born city year job work hobby likes color colour "
    "user assistant answer question please give one letter only just directly correct should replace "
    "blank based your trained knowledge sentence english describe tell me about his her their he she "
    "it and or not no yes i cannot help with can you do does did has have had from for by as "
    "a b c d e f g h i j k l m n o p q r s t u v w x y z "
    "0 1 2 3 4 5 6 7 8 9 10 11 12 red green blue yellow black white brown grey orange purple pink . , : ; ? ! ' - ( ) [ ] _ __"
).split()


def _specials_list(specials: dict) -> list[str]:
    out = [specials["pad"], specials["unk"]]
    out += [t for t in (specials["bos"], specials["eos"]) if t is not None]
    return out + list(specials["extra"])


def build_tokenizer(corpus: Iterable[str], specials: dict = LLAVA_SPECIALS) -> PreTrainedTokenizerFast:
    """Train a word-level tokenizer on ``corpus`` and wrap it for transformers.

    The result round-trips through ``save_pretrained``/``AutoTokenizer.from_pretrained``.
    """
    special_tokens = _specials_list(specials)
    tok = Tokenizer(models.WordLevel(unk_token=specials["unk"]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    trainer = trainers.WordLevelTrainer(special_tokens=special_tokens, min_frequency=1)
    tok.train_from_iterator(list(corpus) + [" ".join(BASIC_WORDS)], trainer=trainer)
    if specials["bos"] is not None:
        bos = specials["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    # WordPiece's decoder joins words with spaces and cleans " ." -> "." (no "##" pieces occur).
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=specials["pad"],
        unk_token=specials["unk"],
        bos_token=specials["bos"],
        eos_token=specials["eos"],
        additional_special_tokens=list(specials["extra"]),
        padding_side="left",
    )
    return fast
