"""`python -m glancefocus ...`: the same as the `glancefocus` command."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
