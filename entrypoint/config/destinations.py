"""What an object-storage option may name: s3://bucket/prefix, gs://bucket/prefix, and for --export-to also
hf://namespace/repo, parsed into a Destination, and the package each scheme needs. Checked with the other option
values (options.check_values) before anything runs; publish/export.py copies the model there. `option` names the
option in every message (--export-to unless told otherwise)."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass

from entrypoint.errors import ExportError

# scheme -> (the package it needs, the fsspec protocol or None for the Hub)
SCHEMES = {"s3": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "hf": ("huggingface_hub", None)}


@dataclass(frozen=True)
class Destination:
    scheme: str
    bucket: str  # the bucket, or for hf:// the repository id namespace/repo
    prefix: str  # a key prefix without slashes at either end; "" for the bucket's root (always "" for hf://)

    def key(self, relative: str) -> str:
        return "/".join(p for p in (self.bucket, self.prefix, relative) if p)

    def __str__(self) -> str:
        return f"{self.scheme}://{self.key('')}"


def url_problems(url: str | None, option: str = "--export-to") -> list[str]:
    """What is wrong with the option's value, one line each, naming the fix; [] when usable (or unset)."""
    if not url:
        return []
    try:
        dest = parse(url, option)
    except ExportError as exc:
        return exc.problems
    package = SCHEMES[dest.scheme][0]
    if importlib.util.find_spec(package) is None:
        return [f"{option} {dest.scheme}:// needs the {package} package, which is not installed; "
                f"pip install {package} (for gs://: pip install 'finetune-gpt2[gcs]')."]
    return []


def parse(url: str, option: str = "--export-to") -> Destination:
    """The Destination a URL names; ExportError naming `option` and the fix when it names none. Only --export-to
    takes hf:// (a model repository is not a checkpoint store nor a data source)."""
    match = re.fullmatch(r"([a-z0-9]+)://([^/]*)(/.*)?", url.strip())
    hub = option == "--export-to"
    if not match or match[1] not in SCHEMES or (match[1] == "hf" and not hub):
        forms = "s3://bucket/prefix, gs://bucket/prefix or hf://namespace/repo" if hub else \
            "s3://bucket/prefix or gs://bucket/prefix"
        raise ExportError(f"{option} {url!r} is not {forms}; use one of those forms.")
    scheme, bucket, rest = match[1], match[2], (match[3] or "").strip("/")
    if "@" in bucket or ":" in bucket:
        raise ExportError(f"{option} must not carry credentials or a port; pass credentials in the environment "
                          "(AWS_*, GOOGLE_APPLICATION_CREDENTIALS, HF_TOKEN) and an S3 endpoint in AWS_ENDPOINT_URL.")
    if scheme == "hf":
        if not bucket or not re.fullmatch(r"[\w.\-]+", rest or "-/"):
            raise ExportError(f"{option} {url!r}: a Hub destination is hf://namespace/repo (e.g. "
                              "hf://acme/gpt2-support); use that form.")
        return Destination(scheme, f"{bucket}/{rest}", "")
    if not re.fullmatch(r"[a-z0-9][a-z0-9.\-_]{1,221}[a-z0-9]", bucket):
        raise ExportError(f"{option} {url!r}: {bucket!r} is not a bucket name (3-63 lower-case letters, "
                          "digits, dots and dashes); use s3://bucket/prefix or gs://bucket/prefix.")
    return Destination(scheme, bucket, rest)
