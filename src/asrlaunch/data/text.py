"""Transcripts -> CTC targets and the character vocabulary. Pure functions: no torch, no transformers.

Two normalisations (`data.text_normalization`):
- `reference`: what transformers' `run_speech_recognition_ctc.py` did for the reference card. Its
  `remove_special_characters` strips `[,?.!-;:"“%‘”�]`, a class built from the characters to ignore
  without escaping, so `!-;` is the range U+0021..U+003B: it also deletes the apostrophe, the digits and
  `#$&()*+/`. It lower-cases and appends one space, so every target ends with the word delimiter `|`.
  Kept on purpose: it is what the card's numbers were measured with.
- `clean`: lower-case, strip `, ? . ! - ; : "` (escaped: apostrophes and digits stay), collapse spaces.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

Normalization = Literal["reference", "clean"]
NORMALIZATIONS: tuple[Normalization, ...] = ("reference", "clean")
WORD_DELIMITER, UNK, PAD = "|", "[UNK]", "[PAD]"
BOS, EOS = "<s>", "</s>"  # the tokenizer's added special tokens, after [UNK] and [PAD]

# The reference run's `--chars_to_ignore`, joined into a character class exactly as the script joins them.
REFERENCE_CHARS_TO_IGNORE = (",", "?", ".", "!", "-", ";", ":", '"', "“", "%", "‘", "”", "�")
REFERENCE_PATTERN = re.compile(f"[{''.join(REFERENCE_CHARS_TO_IGNORE)}]")
CLEAN_PATTERN = re.compile(r"[,?.!\-;:\"]")


@dataclass(frozen=True)
class Transcript:
    """`target`: what the tokenizer turns into labels. `reference`: the words WER is scored against (the
    target as the tokenizer decodes it back: delimiters as spaces, stripped)."""

    target: str
    reference: str


def normalize_text(text: str) -> str:
    """The `clean` normalisation."""
    return " ".join(CLEAN_PATTERN.sub("", text.lower()).split())


def reference_target(text: str) -> str:
    """The reference script's `remove_special_characters`, character for character."""
    return REFERENCE_PATTERN.sub("", text).lower() + " "


def transcript(text: str, mode: Normalization) -> Transcript:
    text = text.replace(WORD_DELIMITER, " ")  # a literal `|` would share the word delimiter's label
    if mode == "reference":
        target = reference_target(text)
        return Transcript(target, target.strip())
    if mode == "clean":
        clean = normalize_text(text)
        return Transcript(clean, clean)
    raise ValueError(f"text normalisation {mode!r} is not one of {', '.join(NORMALIZATIONS)}")


def build_vocab(texts: Iterable[str], mode: Normalization = "clean") -> dict[str, int]:
    """The character vocabulary of every target (train and test, as the reference script builds it).

    `reference`: the sorted characters of all targets, the space's id given to `|` (the space sorts first,
    so `|` usually gets id 0), then `[UNK]`, `[PAD]`; `clean`: sorted characters, then `|`, `[UNK]`, `[PAD]`.
    """
    chars = {c for text in texts for c in text}
    if mode == "reference":
        vocab = {c: i for i, c in enumerate(sorted(chars | {" "}))}
        vocab[WORD_DELIMITER] = vocab.pop(" ")
    else:
        vocab = {c: i for i, c in enumerate([*sorted(chars - {" "}), WORD_DELIMITER])}
    vocab[UNK] = len(vocab)
    vocab[PAD] = len(vocab)
    return vocab


def ctc_min_frames(labels: Sequence[int]) -> int:
    """The fewest output frames a CTC path can emit `labels` in: one per label, plus a blank between two
    equal neighbours. With fewer frames the loss is infinite (then zeroed by `ctc_zero_infinity`)."""
    return len(labels) + sum(1 for a, b in itertools.pairwise(labels) if a == b)
