from .checkpoints import MemoryCheckpoints, MmapCheckpoints, make_checkpoints
from .loop import Batch, BlockEngine, NonFiniteError, StepStats
from .loss import chunked_cross_entropy
from .streaming import WeightStreamer
