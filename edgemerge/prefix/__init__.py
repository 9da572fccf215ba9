"""Prefix reuse: saved KV states by block, and prefixes shared between live sequences.

- :mod:`~edgemerge.prefix.blocktable`: block hashes and the table of a sequence's blocks.
- :mod:`~edgemerge.prefix.blockcache`: a block-granular prompt cache (``Llama.set_cache``).
- :mod:`~edgemerge.prefix.sequences`: ``SharedPrefixPool``, sequences sharing one prefix's
  cells in one context.
- :mod:`~edgemerge.prefix.conversations`: the server's per-conversation caches.

See ``docs/blockcache.md``.
"""

from edgemerge._lazy import lazy_submodules

__getattr__, __dir__ = lazy_submodules(globals())
