"""The console script's door (``grass-ft`` in pyproject, ``python -m grass_ft.cli``): :mod:`grass_ft.frontends.cli`."""

import sys

from .frontends import cli

if __name__ == "__main__":
    sys.exit(cli.main())
sys.modules[__name__] = cli  # `import grass_ft.cli` is the CLI module itself, as before it moved
