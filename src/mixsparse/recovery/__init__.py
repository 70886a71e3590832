"""Recovery after pruning, with the mask held fixed: block-wise reconstruction toward the dense model's
block outputs (:mod:`.blockwise`), and end-to-end masked fine-tuning, full or LoRA (:mod:`.finetune`).

This package's ``__init__`` imports no torch: the typed config reads :mod:`.options` from it.
"""

from .options import MODES, BlockwiseOptions, FinetuneOptions, stage_records, stages_of, trains_whole

__all__ = ["MODES", "BlockwiseOptions", "FinetuneOptions", "stage_records", "stages_of", "trains_whole"]
