"""`python -m entrypoint` is the `finetune` command."""

from entrypoint.cli import main

main()
