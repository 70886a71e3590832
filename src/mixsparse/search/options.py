"""Settings of MSP's search (the ``search`` section of a run config). Imports no torch, so the typed
config can be read and checked without it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..errors import ConfigError


@dataclass
class SearchConfig:
    """Knobs of the search; every field is a YAML key of the ``search`` section."""

    # upper bound; ~4.3 s each on the embedded model on 2 CPU cores with the defaults (bf16 fitness, top-64 KL;
    # 8 children: 17 windows of 512 tokens), so 200 generations fit the 15-minute budget of the main job
    generations: int = 200
    population: int = 4  # parents kept (elitism: the best always survive)
    offspring: int = 8  # children per generation
    # [[windows, survivors], ...]; a stage may add a third number, tokens: score on each window's first
    # ``tokens`` tokens only (a cheaper first stage, EvoPress's "super-fast" idea); the last stage uses whole windows
    stages: list = field(default_factory=lambda: [[1, 3], [4, 1]])
    max_mutations: int = 3  # level moves per child: 1..max_mutations
    crossover_rate: float = 0.5  # share of children made by crossover of two parents before mutation
    init_perturbations: int = 4  # level moves applied to the sensitivity allocation for other initial parents
    patience: int = 30  # stop after this many generations without improvement
    seed: int = 0
    # wall seconds of search (time before a resume counted), checked between generations: the next generation
    # starts only if it is expected to end within the budget. Its result depends on the machine's speed; a
    # run is reproduced exactly by setting generations to the count its run.json records and no budget.
    time_budget: float | None = None

    def __post_init__(self) -> None:
        if self.time_budget is not None and not self.time_budget > 0:
            raise ConfigError(f"search.time_budget must be > 0 seconds (or null for none), got {self.time_budget}")
        if self.generations < 0 or self.population < 1 or self.offspring < 1:
            raise ConfigError("search: generations >= 0, population >= 1 and offspring >= 1 are required")
        stages = [list(s) for s in self.stages]
        if not stages or any(len(s) not in (2, 3) or any(not isinstance(v, int) or v < 1 for v in s) for s in stages):
            raise ConfigError(f"search.stages must be a list of [windows, survivors] (or [windows, survivors, tokens]) "
                              f"with integers >= 1, got {self.stages!r}")
        if len(stages[-1]) == 3:
            raise ConfigError("search.stages: the last stage scores whole windows (no tokens entry)")
        if any(b[0] < a[0] for a, b in zip(stages, stages[1:])):
            raise ConfigError("search.stages: windows must not decrease from one stage to the next")
        self.stages = stages
        if not 0 <= self.crossover_rate <= 1:
            raise ConfigError(f"search.crossover_rate must be in [0, 1], got {self.crossover_rate}")

    @property
    def final_windows(self) -> int:
        return self.stages[-1][0]


@dataclass
class SearchSection(SearchConfig):
    step: float = 0.05  # level step of the unstructured grid
    max_shift: float = 0.25  # levels reach target +/- max_shift
    patterns: list | None = None  # mixed N:M, e.g. ["1:4", "2:4", "3:4"] around a 2:4 target
    fitness: str = "kl"  # "kl" to the dense model, or "ppl"
    fitness_windows: int = 4  # held-out validation windows (>= the last stage's windows)
    fitness_seqlen: int = 512
    calibration_samples: int | None = None  # samples for the level cache (default: data.calibration_samples)
    # "stitched": the final model is the searched candidate itself (layers from the level cache, pruned on
    # dense activations), i.e. exactly what the fitness scored; "sequential": prune again layer by layer on
    # the pruned model's activations. Stitched measured better with older code (benchmarks/final_mode.py; its result
    # file is in git history, to be measured again).
    final: str = "stitched"
    # fitness cost cutters (benchmarks/results/search_speed.md measures each)
    fitness_dtype: str = "auto"  # "auto": bfloat16 where bf16 matmuls are native (AMX CPUs, GPUs), else float32
    kl_topk: int = 64  # dense reference keeps the top-k log-probs + rest mass per token; 0 = exact full-vocabulary KL
    # start at the first block whose levels differ from a kept candidate (exact). Measured on the embedded model, 70%,
    # AVX2 forced, state_cache_mb 1024: 13% fewer block forwards, 1.13x per generation, +1.8 GB peak RSS
    # (benchmarks/results/search_speed.md); off by default for that memory
    incremental: bool = False
    state_cache_mb: float = 256.0  # bound on the block inputs kept for incremental evaluation (population's kept last)
    db_ram_mb: float = 0.0  # RAM for recently read SparseGPT level weights (the rest stays on disk, memory-mapped)
    # allocation joint: per-layer (sparsity, bits) under a budget of bits per prunable weight (mask, codes, scales)
    bits_per_weight: float | None = None
    bits: list = field(default_factory=lambda: [2, 3, 4, 8])  # bit widths a layer may take
    bits_step: float = 0.25  # cost levels: bits_per_weight + k * bits_step, |k * bits_step| <= bits_shift
    bits_shift: float = 1.0
    max_joint_sparsity: float = 0.9  # no variant prunes a layer further

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kl_topk < 0:
            raise ConfigError(f"search.kl_topk must be >= 0 (0 = exact KL), got {self.kl_topk}")
        if self.fitness_dtype not in ("auto", "model", "float32", "bfloat16", "float16"):
            raise ConfigError(f"search.fitness_dtype must be auto, model, float32, bfloat16 or float16, got {self.fitness_dtype!r}")
        if self.state_cache_mb < 0 or self.db_ram_mb < 0:
            raise ConfigError("search.state_cache_mb and search.db_ram_mb must be >= 0")
        if self.fitness not in ("kl", "ppl"):
            raise ConfigError(f"search.fitness must be 'kl' or 'ppl', got {self.fitness!r}")
        if self.fitness_windows < self.final_windows:
            raise ConfigError(
                f"search.fitness_windows ({self.fitness_windows}) must cover the last stage's windows ({self.final_windows})"
            )
        if self.bits_per_weight is not None and not self.bits_per_weight > 0:
            raise ConfigError(f"search.bits_per_weight must be > 0, got {self.bits_per_weight}")
        if not self.bits or any(b not in (2, 3, 4, 8) for b in self.bits):
            raise ConfigError(f"search.bits must be a non-empty list of 2, 3, 4 or 8, got {self.bits!r}")
        if not 0 < self.bits_step <= self.bits_shift:
            raise ConfigError(f"need 0 < search.bits_step <= search.bits_shift, got {self.bits_step} and {self.bits_shift}")
        if not 0 < self.max_joint_sparsity < 1:
            raise ConfigError(f"search.max_joint_sparsity must be in (0, 1), got {self.max_joint_sparsity}")
        if self.final not in ("sequential", "stitched"):
            raise ConfigError(f"search.final must be 'sequential' or 'stitched', got {self.final!r}")

    def core(self) -> SearchConfig:
        names = {f.name for f in dataclasses.fields(SearchConfig)}
        return SearchConfig(**{k: getattr(self, k) for k in names})
