"""Which files make up a checkpoint (re-exported from `engine.checkpoint_files`).

The engine's CLI and the loader must choose the same files, so the logic lives in one
place, in the engine (it needs neither torch nor safetensors).
"""

from engine.checkpoint_files import CheckpointFiles, expand_checkpoint_files

__all__ = ["CheckpointFiles", "expand_checkpoint_files"]
