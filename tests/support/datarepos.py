"""Local dataset repositories, laid out as a Hub dataset repository is: data files named by split, optionally a
README.md dataset card with `configs:` YAML. Written into a test's tmp dir; read by --dataset with no network."""

from __future__ import annotations

import json
from pathlib import Path


def write_split(path: Path, records: list[dict]) -> Path:
    """`records` as JSON Lines, or as Parquet when `path` ends in .parquet."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        import datasets

        datasets.Dataset.from_list(records).to_parquet(str(path))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def plain_repo(directory: Path, splits: dict[str, list[dict]], suffix: str = ".jsonl") -> Path:
    """A repository without a card: one file per split (train.jsonl, validation.jsonl, ...), found by name."""
    for split, records in splits.items():
        write_split(directory / f"{split}{suffix}", records)
    return directory


def carded_repo(directory: Path, configs: dict[str, dict[str, list[dict]]], default: str | None = None) -> Path:
    """A repository whose README.md card names configs ({config: {split: records}}), their files under data/ as
    Parquet, the way the Hub's own converter writes them."""
    lines = ["---", "configs:"]
    for config, splits in configs.items():
        lines += [f"- config_name: {config}", "  data_files:"]
        for split, records in splits.items():
            name = f"data/{config}/{split}-00000-of-00001.parquet"
            write_split(directory / name, records)
            lines += [f"  - split: {split}", f"    path: {name}"]
        if config == default:
            lines.append("  default: true")
    lines += ["---", "", "# A test dataset", ""]
    (directory / "README.md").write_text("\n".join(lines))
    return directory


def texts(prefix: str, count: int, words: int = 12) -> list[dict]:
    """`count` text records of about `words` words each, distinct per prefix."""
    return [{"text": " ".join(f"{prefix}{(i * 7 + j) % 23}" for j in range(words)) + "."} for i in range(count)]
