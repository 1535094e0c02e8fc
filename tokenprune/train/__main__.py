"""``python -m tokenprune.train --recipe FILE [key=value ...]``; works under torchrun too."""

from .api import cli_main

raise SystemExit(cli_main())
