"""The options data preparation reads, as one frozen object: `data/` takes this, never the configuration schema, so
it can be used and tested without the training job's options (and the schema can change without touching it)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from entrypoint.data.objectstore import RemoteDir, is_url

NOT_OPTIONS = ("vocab_size",)  # fields the run decides, not TrainConfig options


@dataclass(frozen=True)
class DataOptions:
    """Every field is the TrainConfig field (or property) of the same name; see `--help` for each one's meaning."""

    data_dir: Path | RemoteDir  # an s3:// or gs:// --data-dir reads as a RemoteDir (objectstore.py)
    train_file: tuple[str, ...]
    valid_file: tuple[str, ...]
    data_cache_dir: Path  # --cache-dir, or <output-dir>/cache
    txt_split: str
    text_field: str
    prompt_field: str
    completion_field: str
    messages_field: str
    chosen_field: str
    rejected_field: str
    validation_split: float
    seed: int
    packing: bool
    train_on_prompt: bool
    isolate_documents: bool | None
    max_eval_tokens: int
    preprocessing_workers: int
    dataset: tuple[str, ...] = ()
    dataset_config: str | None = None
    dataset_split: str = "train"
    dataset_revision: str | None = None
    hub_token: str | None = None
    # Not an option: the model's vocabulary (its embedding rows), which pretokenized ids must stay below. The run
    # passes its model config's; None: the tokenizer's length (pipeline.prepare fills it in).
    vocab_size: int | None = None

    @classmethod
    def of(cls, cfg, **decided) -> DataOptions:
        """The data options of `cfg`, a TrainConfig (untyped here: data/ does not import the schema), with
        `decided` in place of its values (the run plan's `preprocessing_workers`, the model's `vocab_size`)."""
        values = {f.name: getattr(cfg, f.name) for f in fields(cls) if f.name not in NOT_OPTIONS} | decided
        if is_url(values["data_dir"]):
            values["data_dir"] = RemoteDir(values["data_dir"])
        return cls(**values)

