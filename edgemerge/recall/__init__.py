"""Recallable merging: originals of merged or evicted cells in a block store, brought back
exact when a turn's queries attend to them (``MergeSettings.recall``).

Layers: :mod:`~edgemerge.recall.store` (the store, RAM then a spill file),
:mod:`~edgemerge.recall.scoring` (pure numpy scoring of stored blocks and cells),
:mod:`~edgemerge.recall.engine` (query capture and the restore on a live context).
"""

from edgemerge.recall.engine import QueryCapture, RecallEngine, RecallError, RecallResult
from edgemerge.recall.scoring import attention_shares, choose_blocks
from edgemerge.recall.store import (
    BlockStore,
    RowFormat,
    StoredBlock,
    StoreFileError,
    StoreSnapshot,
    StoreStats,
    StoreWarning,
)

__all__ = [
    "BlockStore",
    "QueryCapture",
    "RecallEngine",
    "RecallError",
    "RecallResult",
    "RowFormat",
    "StoreStats",
    "StoreWarning",
    "StoreFileError",
    "StoreSnapshot",
    "StoredBlock",
    "attention_shares",
    "choose_blocks",
]
