"""A recipe's corpus, prepared, and its model in the Hugging Face cache: what a job needs before its GPUs.

    asrlaunch prepare RECIPE [key=value ...]

generates the corpus when the recipe asks for it and `data.dir` is missing, reads it through its format
(sources.py), checks every utterance, normalises, tokenises and caches it as Arrow (corpus.py), and fetches
the model into the Hugging Face cache (on a machine that reaches the hub). The training job's rank 0 does the
same when nothing was prepared, while its other ranks wait; `cluster.prepare_partition` has `asrlaunch submit`
run this as a CPU job first (launcher/submission.py). No torch at import.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asrlaunch.core.paths import JOB_OWN, expand, variables
from asrlaunch.core.recipe import ModelSection, Recipe, RecipeError, load_recipe
from asrlaunch.data.cache import table_file, write_atomic
from asrlaunch.data.corpus import Checks, DataError, PreparedCorpus, prepare, read_layout
from asrlaunch.data.sources import corpus_sources


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "asrlaunch" / "prepared"


def named_variables(recipe: Recipe) -> list[str]:
    return variables(recipe.data.cache_dir or "")


def unset_variables(recipe: Recipe) -> list[str]:
    """The variables `data.cache_dir` names that are not set here (`$SLURM_TMPDIR` on a login node)."""
    return [name for name in named_variables(recipe) if name not in os.environ]


def job_local_variables(recipe: Recipe) -> list[str]:
    """The variables `data.cache_dir` names that make it no other job's: unset here, or a job's own
    (`$SLURM_TMPDIR`, `$TMPDIR`). No preparation job can fill such a cache; the training job's nodes do."""
    return [name for name in named_variables(recipe) if name not in os.environ or JOB_OWN.fullmatch(name)]


def cache_dir(recipe: Recipe) -> Path:
    """`data.cache_dir`, its `~` and `$VARIABLE`s expanded where the corpus is read (`$SLURM_TMPDIR/asr`: each
    node's own disk), else ~/.cache/asrlaunch/prepared."""
    if not recipe.data.cache_dir:
        return default_cache_dir()
    try:
        return Path(expand(recipe.data.cache_dir))
    except ValueError as error:
        raise DataError(f"data.cache_dir: {error}") from None


def ensure_corpus(recipe: Recipe, is_main: bool) -> None:
    """Generate the smoke corpus on first use when the recipe asks for it and `data.dir` is missing."""
    from asrlaunch.data.synth import generate_corpus, resolve_engine

    data_dir, spec = Path(recipe.data.dir), recipe.data.generate
    if spec is not None and is_main and not data_dir.exists():
        engine = resolve_engine(spec.engine)
        print(
            f"generating a {engine} corpus in {data_dir} ({spec.train} train, {spec.test} test)", flush=True
        )
        generate_corpus(
            data_dir,
            spec.train,
            spec.test,
            engine=engine,
            seed=spec.seed,
            layout=spec.layout,
            sample_rate=spec.sample_rate,
        )


CONV_LAYOUT = ("conv_kernel", "conv_stride")  # all of a config that sets its CTC frames


def ctc_frames(model: ModelSection) -> Callable[[int], int]:
    """The model's CTC frames for a number of 16 kHz samples (its conv stack: each layer
    (L - kernel) // stride + 1). The conv layout comes from `model.config`, else the pretrained model's config
    (local, cached or the hub's), else wav2vec2-base's."""
    from transformers import Wav2Vec2Config

    if model.config is not None:
        config = Wav2Vec2Config(**{**model.config, **model.overrides})
    else:
        try:
            config = Wav2Vec2Config.from_pretrained(model.name_or_path)
        except OSError:
            config = Wav2Vec2Config()  # facebook/wav2vec2-base's conv stack: 320x
    layers = list(zip(config.conv_kernel, config.conv_stride, strict=True))

    def frames(samples: int) -> int:
        for kernel, stride in layers:
            if samples < kernel:
                return 0
            samples = (samples - kernel) // stride + 1
        return samples

    return frames


def checks_key(model: ModelSection) -> str:
    """What the checks of a prepared table depend on, without transformers or torch: the conv stack (from
    `model.config`, a local checkpoint's config.json, else the hub name that fixes it) and whether a
    transcript must fit its frames. A local checkpoint is keyed by its layout, not its folder, so a moved or
    copied checkpoint finds the corpus it prepared."""
    stored = model.config if model.config is not None else local_checkpoint_config(model.name_or_path)
    given = {**(stored or {}), **model.overrides}
    conv = {key: given[key] for key in CONV_LAYOUT if key in given}
    source = "config" if stored is not None else model.name_or_path
    return json.dumps([source, conv, not model.ctc_zero_infinity])


def local_checkpoint_config(name_or_path: str) -> dict[str, Any] | None:
    """A local checkpoint's config.json; None for a hub name, or a file the model's own load will report."""
    try:
        stored = json.loads(Path(name_or_path, "config.json").read_text())
    except (OSError, ValueError):
        return None
    return stored if isinstance(stored, dict) else None


def prepare_corpus(recipe: Recipe, on_progress: Callable[[], None] | None = None) -> PreparedCorpus:
    """The recipe's corpus from the cache, or prepared now (`on_progress` is called per utterance)."""
    data = recipe.data
    checks = Checks(
        ctc_frames(recipe.model),
        transcript_fits=not recipe.model.ctc_zero_infinity,
        key=checks_key(recipe.model),
    )
    return prepare(
        corpus_sources(data),
        cache_dir(recipe),
        data.text_normalization,
        on_progress,
        checks,
        data.skip_bad,
        data.dir,
    )


@dataclass(frozen=True)
class CorpusPeers:
    """Where a rank stands among those that load the corpus (every rank's node, gathered at the start, so
    that no launcher's variables have to be trusted). Rank 0 prepares the corpus; a node that does not see
    rank 0's cache (a node-local `data.cache_dir`) prepares it once more, by its first rank."""

    rank: int
    node_of_rank: tuple[str, ...]  # every rank's node, in rank order
    deadline: float = float("inf")  # time.time() at which waiting for a peer is given up

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def node(self) -> str:
        return self.node_of_rank[self.rank]

    @property
    def is_node_main(self) -> bool:
        return self.node_of_rank.index(self.node) == self.rank

    @property
    def nodes(self) -> list[str]:
        return sorted(set(self.node_of_rank))

    def wait_for(self, condition: Callable[[], bool], what: str, on_progress: Callable[[], None]) -> None:
        """Until `condition` holds, beating the heartbeat; TimeoutError at the deadline (the start-up budget:
        a beating rank never looks hung to the supervisor)."""
        while not condition():
            if time.time() > self.deadline:
                raise TimeoutError(f"corpus: gave up waiting for {what} (train.startup_timeout_s)")
            on_progress()
            time.sleep(0.1)


def corpus_for_rank(
    recipe: Recipe,
    peers: CorpusPeers,
    ready: Path,
    on_progress: Callable[[], None],
    before_prepare: Callable[[], None],
) -> PreparedCorpus:
    """Rank 0 prepares the corpus (up to train.startup_timeout_s) and then writes `ready`; the others wait for
    files, not for a collective, which would time out after train.collective_timeout_s. For the same reason
    every rank then waits until every node has the corpus before its first collective."""
    if not peers.is_main:
        peers.wait_for(ready.exists, "rank 0's corpus", on_progress)
        wait_for_node(recipe, peers, ready, on_progress)
    if peers.is_main or not sees_cache(recipe, ready):
        before_prepare()
    ensure_corpus(recipe, peers.is_main)
    corpus = prepare_corpus(recipe, on_progress=on_progress)
    if peers.is_main:
        ready.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(ready, json.dumps(corpus.keys))
        how = "cache hit" if corpus.cache_hit else "prepared now (cached for the next start)"
        skipped = f", {corpus.skipped} bad utterance(s) left out" if corpus.skipped else ""
        print(f"corpus: {how}: {len(corpus.train)} train / {len(corpus.test)} test{skipped}", flush=True)
    if peers.is_node_main:
        node_file(ready, peers).touch()
    every_node = [node_file(ready, peers, node) for node in peers.nodes]
    what = f"the corpus on every node ({', '.join(peers.nodes)})"
    peers.wait_for(lambda: all(file.exists() for file in every_node), what, on_progress)
    return corpus


def wait_for_node(recipe: Recipe, peers: CorpusPeers, ready: Path, on_progress: Callable[[], None]) -> None:
    """A rank other than 0 whose cache lacks the tables rank 0 prepared (their keys are in `ready`): its
    node's first rank says it prepares them once for the node; the node's other ranks wait for that."""
    if not peers.is_node_main:
        node_ready = node_file(ready, peers)
        what = f"the first rank of node {peers.node}"
        peers.wait_for(lambda: node_ready.exists() or sees_cache(recipe, ready), what, on_progress)
    elif not sees_cache(recipe, ready):
        print(
            f"corpus: node {peers.node} does not see the cache rank 0 prepared ({cache_dir(recipe)} here): "
            "preparing it again on this node; a data.cache_dir that every node shares prepares it once",
            flush=True,
        )


def sees_cache(recipe: Recipe, ready: Path) -> bool:
    """This rank finds the tables rank 0 prepared (their keys are in `ready`) in its own cache."""
    keys = json.loads(ready.read_text())
    return all(table_file(cache_dir(recipe), key).exists() for key in keys.values())


def node_file(ready: Path, peers: CorpusPeers, node: str | None = None) -> Path:
    """A node's first rank has the corpus (named by the node's place among the ranks' nodes)."""
    return ready.with_name(f"{ready.stem}.node{peers.nodes.index(node or peers.node)}")


def is_prepared(recipe: Recipe) -> bool:
    """Both tables of the recipe's corpus are in its cache (reads transcripts and file stamps, no audio)."""
    if not Path(recipe.data.dir).exists() or unset_variables(recipe):
        return False
    data = recipe.data
    try:
        splits = corpus_sources(data)
    except DataError:
        return False
    keys = read_layout(splits, data.text_normalization, checks_key(recipe.model)).keys.values()
    return all(table_file(cache_dir(recipe), key).exists() for key in keys)


def fetch_model(model: ModelSection) -> str:
    """Put the pretrained model in the Hugging Face cache (where the hub is reachable); what was done."""
    if model.config is not None:
        return "built from model.config: nothing to fetch"
    if Path(model.name_or_path).exists():
        return f"{model.name_or_path}: a local folder"
    from huggingface_hub import snapshot_download

    folder = snapshot_download(model.name_or_path)
    return f"{model.name_or_path} is in the Hugging Face cache ({folder})"


def main(argv: Sequence[str] | None = None) -> int:
    from asrlaunch.core.console import clean_warnings, error
    from asrlaunch.core.exits import ExitCode

    parser = argparse.ArgumentParser(
        prog="asrlaunch prepare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. data.dir=/data/TIMIT")
    parser.add_argument("--report", type=Path, help="also write what was prepared to this JSON file")
    args = parser.parse_intermixed_args(argv)
    clean_warnings()
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        ensure_corpus(recipe, is_main=True)
        corpus = prepare_corpus(recipe)
        model = fetch_model(recipe.model)
    except (RecipeError, DataError) as problem:
        error(problem)
        if args.report:
            args.report.write_text(json.dumps({"ok": False, "error": str(problem)}))
        return ExitCode.USAGE
    except OSError as problem:  # the hub unreachable, a full disk
        error(f"model.name_or_path: {problem}")
        return ExitCode.FAILED
    summary = {
        "ok": True,
        "cache": "hit" if corpus.cache_hit else "built",
        "train": len(corpus.train),
        "test": len(corpus.test),
        "skipped": corpus.skipped,
        "model": model,
    }
    print(
        f"prepared {recipe.data.dir}: cache {summary['cache']} in {cache_dir(recipe)}, {summary['train']} "
        f"train / {summary['test']} test utterances, {corpus.skipped} skipped; {model}",
        flush=True,
    )
    if args.report:
        args.report.write_text(json.dumps(summary))
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
