"""`python -m sectorllm`: the same as the `sectorllm` command."""

from .cli import main

raise SystemExit(main())
