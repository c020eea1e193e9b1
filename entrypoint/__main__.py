"""`python -m entrypoint` is the `finetune` command."""

from .cli import main

main()
