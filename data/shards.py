"""The shard format, re-exported: it lives in :mod:`ddm.shards` (the bottom layer) because train/ and
ddm.evaluate read what data/ writes, and ddm must not import data/."""
from ddm.shards import *  # noqa: F401,F403
