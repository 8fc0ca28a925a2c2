"""The PyTorch-free early-exit runtime under its older name: `glancefocus.runtime` is
`glancefocus_runtime` (the package of the `glancefocus-runtime` distribution, which this
distribution ships too), re-exported so that code written against either name works."""
from glancefocus_runtime import *  # noqa: F401,F403
from glancefocus_runtime import __all__  # noqa: F401
