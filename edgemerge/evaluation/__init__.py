"""Evaluation of KV compression on real models: texts, tasks, scoring and the suite.

``texts``: long real documents found offline (licences, Debian docs, stdlib sources).
``scoring``: restore a (compressed) sequence state into llama.cpp and score or
generate after it. ``tasks``: the long-context tasks of ``edgemerge bench``.
"""

from edgemerge._lazy import lazy_submodules

__getattr__, __dir__ = lazy_submodules(globals())
