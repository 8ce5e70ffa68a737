"""Generation on decoded media: the hf (reference) and fast engines behind one contract (base.py).

A job gets its engine from `make_engine`, with the cache plan (cache_plan.py) made for its device.
"""

from pipeline.engine.factory import make_engine

__all__ = ["make_engine"]
