from .checkpoints import MemoryCheckpoints, MmapCheckpoints, make_checkpoints
from .loop import Batch, BlockEngine, StepStats
from .loss import chunked_cross_entropy
from .streaming import WeightStreamer
