"""A recipe's corpus, prepared: generated on first use when the recipe asks for it, then read through its
format (sources.py), normalised, tokenised and cached as Arrow (corpus.py). No torch at import.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from asrlaunch.core.recipe import Recipe
from asrlaunch.data.corpus import PreparedCorpus, prepare
from asrlaunch.data.sources import corpus_sources


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "asrlaunch" / "prepared"


def ensure_corpus(recipe: Recipe, is_main: bool) -> None:
    """Generate the smoke corpus on first use when the recipe asks for it and `data.dir` is missing."""
    from asrlaunch.data.synth import generate_corpus, resolve_engine

    data_dir, spec = Path(recipe.data.dir), recipe.data.generate
    if spec is not None and is_main and not data_dir.exists():
        engine = resolve_engine(spec.engine)
        print(f"generating a {engine} corpus in {data_dir} ({spec.train} train, {spec.test} test)", flush=True)
        generate_corpus(
            data_dir, spec.train, spec.test, engine=engine, seed=spec.seed, layout=spec.layout,
            sample_rate=spec.sample_rate,
        )


def prepare_corpus(recipe: Recipe, on_progress: Callable[[], None] | None = None) -> PreparedCorpus:
    """The recipe's corpus from the cache, or prepared now (`on_progress` is called per utterance)."""
    data = recipe.data
    cache = data.cache_dir or default_cache_dir()
    return prepare(corpus_sources(data), cache, data.text_normalization, on_progress)


