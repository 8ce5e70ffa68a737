"""Generation on decoded media: the hf (reference) and fast engines behind one contract (base.py).

A job gets its engine from `make_engine`, after `check_cache_fits` said the fast engine's cache fits.
"""

from pipeline.engine.factory import check_cache_fits, make_engine

__all__ = ["check_cache_fits", "make_engine"]
