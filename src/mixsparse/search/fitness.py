"""Fitness of a candidate allocation: KL(dense || candidate) (or NLL) on held-out windows.

A candidate is never written into the model. :class:`CandidateForward` calls each decoder block with
device copies of its tensors (``torch.func.functional_call``) in which the prunable linears carry the
candidate's level weights from the :class:`~mixsparse.search.database.LevelDatabase`:

* ``whole`` placement: a *replica* of every block's tensors stays on the device in the fitness dtype;
  a candidate rewrites only the layers whose level changed since the last one.
* ``blockwise`` placement (a model larger than the device): each block's tensors are built on the device
  when the block runs and dropped after it; device memory is one block plus activations.

Cost cutters, each a setting (``search.*``):

* ``incremental`` (exact): the inputs of every block are kept for recently scored candidates (the
  population); a candidate starts at the first block whose levels differ from the best-matching kept
  one. Bounded by ``state_cache_mb``; per candidate and window ``(blocks+1) x seqlen x hidden x bytes``
  (shared prefixes are stored once).
* ``kl_topk`` (approximate unless 0): the dense reference keeps the top-k log-probabilities per token
  plus the log of the remaining mass (``8k + 4`` bytes per token: float32 values, int32 indices, instead
  of ``2 x vocab`` for the exact fp16 reference); the KL is the exact KL of the (top-k + rest)
  coarse-graining, a lower bound of the full KL.
* ``fitness_dtype`` (approximate unless the model's own): dense reference and candidates are both
  computed in this dtype (bf16 runs on AMX/tensor cores).

Scores are memoised per (candidate, window) so a later selection stage only adds windows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..runner import LayerwiseRunner
from ..errors import ConfigError, NumericalError
from ..evaluation import mean_kl, nll_sum
from ..experts import ExpertMatrix, weight_owner
from ..modeling import block_linears
from ..placement import Placement, fast_bf16
from .database import LevelDatabase
from .space import Offsets, offsets_key


def resolve_dtype(name: str | torch.dtype | None, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "model"):
        return model_dtype
    if name == "auto":
        if fast_bf16(device):
            return torch.bfloat16
        if model_dtype == torch.float16 and device.type != "cpu":  # fp16 is native on every GPU
            return model_dtype
        # emulated 16-bit matmuls (bf16 without AVX512-BF16/AMX, fp16 on a CPU) are far slower than float32
        return torch.float32 if model_dtype in (torch.bfloat16, torch.float16) else model_dtype
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise ConfigError(f"search.fitness_dtype must be auto, model, float32, bfloat16 or float16, got {name!r}")
    return dt


# ---------------------------------------------------------------------------------------------
# KL against a stored dense reference
# ---------------------------------------------------------------------------------------------
@dataclass
class TopK:
    """Top-k log-probabilities of the dense model per token, and the log of the mass outside them."""

    logp: torch.Tensor  # (tokens, k) float32
    idx: torch.Tensor  # (tokens, k) int32 (vocabularies are far below 2**31)
    log_rest: torch.Tensor  # (tokens,) float32

    @classmethod
    def from_logits(cls, logits: torch.Tensor, k: int) -> "TopK":
        logp = F.log_softmax(logits.float(), dim=-1)
        k = min(k, logp.shape[-1])
        top, idx = torch.topk(logp, k, dim=-1)
        rest = torch.logsumexp(logp.scatter(-1, idx, float("-inf")), dim=-1) if k < logp.shape[-1] \
            else torch.full(logp.shape[:-1], float("-inf"))
        return cls(top.cpu(), idx.to(torch.int32).cpu(), rest.cpu())

    def bytes_per_token(self) -> int:
        return self.logp.shape[-1] * (self.logp.element_size() + self.idx.element_size()) + self.log_rest.element_size()


def topk_kl(ref: TopK, logits: torch.Tensor) -> tuple[float, int]:
    """Summed per-token KL between the (top-k, rest) coarse-grainings of the dense and candidate
    distributions, and the number of tokens."""
    # One fused pass over the vocabulary (log_softmax upcasts inside: no fp32 copy of bf16 logits); the
    # rest mass is 1 - sum(top-k q) in float64, exact to ~1e-7 absolute. Rows where that is not enough
    # (the candidate puts almost all its mass on the dense top-k) get the masked sum over the vocabulary.
    idx = ref.idx.to(logits.device).long()
    logq_all = F.log_softmax(logits, dim=-1, dtype=torch.float32)
    logq = logq_all.gather(-1, idx)
    q_rest = 1.0 - logq.double().exp().sum(-1)
    logq_rest = q_rest.clamp_min(1e-300).log().float()
    tight = q_rest < 1e-4
    if bool(tight.any()):
        logq_rest[tight] = torch.logsumexp(logq_all[tight].scatter(-1, idx[tight], float("-inf")), dim=-1)
    logp, logp_rest = ref.logp.to(logits.device), ref.log_rest.to(logits.device)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    p_rest = logp_rest.exp()
    kl = kl + torch.where(p_rest > 0, p_rest * (logp_rest - logq_rest), torch.zeros_like(p_rest))
    return float(kl.sum()), kl.numel()


# ---------------------------------------------------------------------------------------------
# Candidate forward, block by block, without touching the model
# ---------------------------------------------------------------------------------------------
class CandidateForward:
    def __init__(self, db: LevelDatabase, placement: Placement, dtype: torch.dtype):
        self.db, self.placement, self.dtype = db, placement, dtype
        model = db.model
        self.runner = LayerwiseRunner(model, device=placement)
        self.blocks = self.runner.blocks
        dev = placement.device
        inside = {id(t) for t in list(self.blocks.parameters()) + list(self.blocks.buffers())}
        converted: dict[int, torch.Tensor] = {}  # tied tensors (embeddings = head) convert once

        def conv(t: torch.Tensor, param: bool) -> torch.Tensor:
            if id(t) not in converted:
                cast = param and t.is_floating_point()
                converted[id(t)] = t.detach().to(device=dev, dtype=self.dtype if cast else t.dtype)
            return converted[id(t)]

        self.head_tensors = {n: conv(t, True) for n, t in model.named_parameters(remove_duplicate=False)
                             if id(t) not in inside}
        self.head_tensors.update({n: conv(t, False) for n, t in model.named_buffers(remove_duplicate=False)
                                  if id(t) not in inside})
        prefix = self.runner.blocks_name
        # per block: qualified layer -> (local name of the tensor its weight lives in, the layer); an expert's
        # matrix is a slice of a fused 3-D tensor, which the block's tensors then hold assembled
        self.units_of: list[dict[str, tuple[str, nn.Module]]] = []
        for i, b in enumerate(self.blocks):
            owners = {id(p): n for n, p in b.named_parameters()}
            self.units_of.append({f"{prefix}.{i}.{short}": (owners[id(weight_owner(lin))], lin)
                                  for short, lin in block_linears(b).items() if f"{prefix}.{i}.{short}" in db.layers})
        self.replica: list[dict[str, torch.Tensor] | None] = [None] * len(self.blocks)
        self.replica_levels: list[dict[str, int | None]] = [{} for _ in self.blocks]
        self.keep_replica = placement.mode == "whole"

    def loaded(self, i: int):
        """Block ``i``'s dense weights readable for the duration (a streamed model's are read from its checkpoint
        and dropped after; the tensors :meth:`block_tensors` built from them stay valid)."""
        return self.runner.readable(i)

    def _dense_block(self, i: int, skip: frozenset = frozenset()) -> dict[str, torch.Tensor]:
        b, dev = self.blocks[i], self.placement.device
        fused = {local for local, lin in self.units_of[i].values() if isinstance(lin, ExpertMatrix)}
        out = {n: p.detach().to(device=dev, dtype=self.dtype if p.is_floating_point() else p.dtype,
                                copy=n in fused)  # fused tensors are written slice by slice: never the model's own
               for n, p in b.named_parameters() if n not in skip}
        out.update({n: t.to(dev) for n, t in b.named_buffers()})
        return out

    def block_tensors(self, i: int, offsets: Offsets | None) -> dict[str, torch.Tensor]:
        """Block ``i``'s tensors on the device for a candidate (``None``: the dense model)."""
        units = self.units_of[i]
        want = {full: (None if offsets is None else offsets.get(full)) for full in units}
        if self.keep_replica:
            if self.replica[i] is None:
                self.replica[i] = self._dense_block(i)
                self.replica_levels[i] = {full: None for full in want}
            t, have = self.replica[i], self.replica_levels[i]
        else:
            # streamed: the prunable weights are built from the database below, not converted twice
            locals_ = frozenset(local for local, _ in units.values())
            t, have = self._dense_block(i, locals_), {full: "absent" for full in want}
            owners = dict(self.blocks[i].named_parameters())
            for local in locals_:
                if owners[local].dim() == 3:  # a fused experts tensor: every slice is filled below
                    t[local] = torch.empty(owners[local].shape, dtype=self.dtype, device=self.placement.device)
        for full, k in want.items():
            if have[full] != k:  # only layers whose level changed are rebuilt
                local, lin = units[full]
                w = (lin.weight.detach().to(self.placement.device, self.dtype) if k is None
                     else self.db.weight(full, k, self.placement.device, self.dtype))
                if isinstance(lin, ExpertMatrix):
                    lin.slot(t[local]).copy_(w)
                else:
                    t[local] = w
                have[full] = k
        return t

    @torch.no_grad()
    def embed(self, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
        state = self.runner.catch([ids], params=self.head_tensors)
        return state.hidden[0], state.kwargs[0]

    @torch.no_grad()
    def run_block(self, i: int, tensors: dict, hidden: torch.Tensor, kwargs: list[dict]) -> torch.Tensor:
        """Block ``i`` with a candidate's ``tensors`` on one window; ``kwargs``: that window's per-block arguments."""
        return self.runner.call(i, hidden, kwargs[i], params=tensors).to(self.placement.store)

    @torch.no_grad()
    def logits(self, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return self.runner.head_logits(ids, hidden, params=self.head_tensors)[0]


# ---------------------------------------------------------------------------------------------
# Fitness
# ---------------------------------------------------------------------------------------------
class Fitness:
    """Mean per-window KL(dense || candidate) (or NLL for ``ppl``) on held-out windows; per-window
    results are memoised per candidate so a later stage only evaluates the windows it adds."""

    def __init__(self, db: LevelDatabase, windows: torch.Tensor, kind: str = "kl", device=None, group=None, *,
                 placement: str = "auto", dtype: str | torch.dtype | None = "model", kl_topk: int = 0,
                 incremental: bool = False, state_cache_mb: float = 256.0):
        """``group``: a ``torch.distributed`` process group whose ranks share the evaluations (see
        :meth:`prefetch`); every rank must run the same search with the same seed. ``dtype="model"``,
        ``kl_topk=0`` give exactly the full-forward fitness of the model's dtype."""
        if kind not in ("kl", "ppl"):
            raise ConfigError(f"fitness must be 'kl' or 'ppl', got {kind!r}")
        if kl_topk < 0:
            raise ConfigError(f"search.kl_topk must be >= 0 (0 = exact full-vocabulary KL), got {kl_topk}")
        self.db, self.windows, self.kind, self.group = db, windows, kind, group
        model = db.model
        pl = Placement.resolve(device, placement, model)
        if pl.mode == "whole":  # the replica lives on the device: block outputs stay there too
            pl = Placement(pl.device, "whole", offload=False)
        model_dtype = next(model.parameters()).dtype
        self.dtype = resolve_dtype(dtype, model_dtype, pl.device)
        self.forward = CandidateForward(db, pl, self.dtype)
        self.kl_topk, self.incremental = kl_topk, incremental
        self.state_cache_bytes = int(state_cache_mb * 2**20)
        self.local_evaluations = 0  # windows this process forwarded itself (a share of ``evaluations``)
        self.blocks_run = 0  # block forwards done (incremental evaluation skips some)
        self.memo: dict[tuple, list[float]] = {}  # whole windows; keyed (tokens, candidate) for cheap stages
        self.evaluations = 0  # windows scored
        self._short_inputs: dict[tuple[int, int], tuple] = {}
        self.blocks_of = [set(units) for units in self.forward.units_of]
        # no Placement.stage here or in prefetch: the fitness works on device copies and never moves a module
        self.inputs = [self.forward.embed(windows[i : i + 1]) for i in range(windows.shape[0])]
        self.states: dict[tuple, dict[int, list[torch.Tensor]]] = {}
        self._protected: set[tuple] = set()  # the population's keys: their states are evicted last
        self.reference: list | None = None
        if kind == "kl":
            self.reference = []
            # one pass over the blocks for every window (a streamed model is read once, not once per window)
            (hidden,) = self._final_hidden_many([(None, list(range(windows.shape[0])))], store=False)
            for i in range(windows.shape[0]):
                logits = self.forward.logits(windows[i : i + 1], hidden.pop(i))
                if not torch.isfinite(logits).all():
                    raise NumericalError(
                        f"the dense model's logits on fitness window {i} are not finite in {self.dtype} "
                        "(fp16 overflow?); set search.fitness_dtype to bfloat16 or float32")
                # exact: the full distribution in fp16 (half the memory of fp32), KL computed in fp32
                self.reference.append(TopK.from_logits(logits, kl_topk) if kl_topk else
                                      F.log_softmax(logits.float(), dim=-1).to(torch.float16).cpu().unsqueeze(0))

    @staticmethod
    def key(offsets: Offsets) -> tuple:
        return offsets_key(offsets)

    def reference_bytes_per_token(self) -> int:
        if self.reference is None:
            return 0
        r = self.reference[0]
        return r.bytes_per_token() if isinstance(r, TopK) else r.shape[-1] * r.element_size()

    # --- incremental state cache ------------------------------------------------------------
    def _signature(self, offsets: Offsets | None) -> list[tuple]:
        if offsets is None:
            return [tuple() for _ in self.blocks_of]
        return [tuple(sorted((n, offsets[n]) for n in names)) for names in self.blocks_of]

    def _start(self, sig: list[tuple], w: int) -> tuple[int, list[torch.Tensor] | None]:
        """First block to compute for window ``w`` and the kept states it continues from."""
        best, states = 0, None
        if not self.incremental:
            return 0, None
        for key, per_window in self.states.items():
            if w not in per_window:
                continue
            ref_sig = per_window["sig"] if "sig" in per_window else None
            same = 0
            while same < len(sig) and ref_sig[same] == sig[same]:
                same += 1
            if same > best:
                best, states = same, per_window[w]
        return best, states

    def _state_bytes(self) -> int:
        """Bytes of kept block states; a prefix shared by candidates is the same tensor object, counted once
        (index 0, the embedding output, lives in ``self.inputs`` anyway)."""
        seen, total = set(), 0
        for per_window in self.states.values():
            for w, hs in per_window.items():
                if w == "sig":
                    continue
                for h in hs[1:]:
                    if id(h) not in seen:
                        seen.add(id(h))
                        total += h.numel() * h.element_size()
        return total

    def retain(self, candidates: list[Offsets]) -> None:
        """Keep block states only for these candidates (the population); they keep them until the next call."""
        keep = {self.key(o) for o in candidates}
        self.states = {k: v for k, v in self.states.items() if k in keep}
        self._protected = keep

    def _evict_one(self, besides: tuple) -> bool:
        """Drop the oldest kept window of a candidate outside the population; False when there is none."""
        for key, per_window in self.states.items():
            if key == besides or key in self._protected:
                continue
            w = next((w for w in per_window if w != "sig"), None)
            if w is None:
                continue
            per_window.pop(w)
            if len(per_window) == 1:
                self.states.pop(key)
            return True
        return False

    # --- scoring ----------------------------------------------------------------------------
    def _final_hidden_many(self, jobs: list[tuple[Offsets | None, list[int]]], tokens: int | None = None,
                           store: bool = True) -> list[dict[int, torch.Tensor]]:
        """Final hidden states of each job's candidate on its windows (their first ``tokens`` tokens when
        given). Blocks are the outer loop: a block's dense weights are read once for all the jobs (a streamed
        model is read from disk once per call) and each candidate's tensors are built once for all its
        windows (in blockwise placement, a candidate crosses to the device once, not once per window); windows
        continue from kept states where incremental evaluation allows."""
        short = tokens is not None and tokens < self.windows.shape[1]
        runs = []
        for offsets, ws in jobs:
            sig = self._signature(offsets)
            keep = store and self.incremental and offsets is not None and not short
            start, hs, h, kw = {}, {}, {}, {}
            for w in ws:
                if short:
                    if (w, tokens) not in self._short_inputs:
                        self._short_inputs[(w, tokens)] = self.forward.embed(self.windows[w : w + 1, :tokens])
                    h[w], kw[w] = self._short_inputs[(w, tokens)]
                    start[w] = 0
                    continue
                start[w], kept = self._start(sig, w)
                h0, kw[w] = self.inputs[w]
                hs[w] = list(kept[: start[w] + 1]) if kept is not None else [h0]
                h[w] = hs[w][-1]
            runs.append((offsets, ws, sig, keep, start, hs, h, kw))
        first = min((min(r[4].values()) for r in runs if r[1]), default=len(self.forward.blocks))
        for i in range(first, len(self.forward.blocks)):
            with self.forward.loaded(i):
                for offsets, ws, _, keep, start, hs, h, kw in runs:
                    todo = [w for w in ws if start[w] <= i]
                    if not todo:
                        continue
                    tensors = self.forward.block_tensors(i, offsets)
                    for w in todo:
                        h[w] = self.forward.run_block(i, tensors, h[w], kw[w])
                        if keep:
                            hs[w].append(h[w])
                        self.blocks_run += 1
                    del tensors
        for offsets, ws, sig, keep, _, hs, _, _ in runs:
            if keep:
                key = self.key(offsets)
                entry = self.states.setdefault(key, {"sig": sig})
                for w in ws:
                    entry[w] = hs[w]
                    # over the bound: candidates outside the population (the last retain) make room first,
                    # oldest first, since children continue from the population; else this one is not kept
                    while self._state_bytes() > self.state_cache_bytes and self._evict_one(besides=key):
                        pass
                    if self._state_bytes() > self.state_cache_bytes:
                        entry.pop(w)
                if len(entry) == 1:
                    self.states.pop(key)
        return [r[6] for r in runs]

    def _window_scores_many(self, jobs: list[tuple[Offsets, list[int]]], tokens: int | None = None) -> list[list[float]]:
        if tokens is None or tokens >= self.windows.shape[1]:
            tokens = None
        hiddens = self._final_hidden_many(jobs, tokens)
        out = []
        for (_, ws), hidden in zip(jobs, hiddens):
            scores = []
            for w in ws:
                ids = self.windows[w : w + 1, :tokens] if tokens else self.windows[w : w + 1]
                logits = self.forward.logits(ids, hidden.pop(w)).unsqueeze(0)
                n_tok = ids.shape[1]
                if self.kind == "ppl":
                    s, n = nll_sum(logits, ids)
                elif isinstance(self.reference[w], TopK):  # causal: the prefix's reference is the reference's prefix
                    r = self.reference[w]
                    s, n = topk_kl(TopK(r.logp[:n_tok], r.idx[:n_tok], r.log_rest[:n_tok]), logits[0])
                else:
                    s, n = mean_kl(self.reference[w][:, :n_tok], logits)
                scores.append(s / n)
            out.append(scores)
        return out

    def _memo_key(self, offsets: Offsets, tokens: int | None) -> tuple:
        return self.key(offsets) if tokens is None else (("tokens", tokens),) + self.key(offsets)

    def prefetch(self, candidates: list[Offsets], n_windows: int, tokens: int | None = None) -> None:
        """Score every (candidate, window) pair the memo lacks. In a process group the pairs are dealt
        out round-robin over the ranks and the scores all-gathered, so every rank ends with the same
        memo and therefore takes the same search path (data-parallel fitness, no extra protocol)."""
        todo, queued = [], set()
        for offsets in candidates:
            key = self._memo_key(offsets, tokens)
            if key in queued:
                continue
            queued.add(key)
            todo += [(key, offsets, i) for i in range(len(self.memo.get(key, [])), n_windows)]
        if not todo:
            return
        rank, world = 0, 1
        if self.group is not None:
            import torch.distributed as dist

            rank, world = dist.get_rank(self.group), dist.get_world_size(self.group)
        mine = {}
        by_candidate: dict[tuple, tuple[Offsets, list[int]]] = {}  # this rank's pairs, grouped per candidate
        for j in range(rank, len(todo), world):
            key, offsets, _ = todo[j]
            by_candidate.setdefault(key, (offsets, []))[1].append(j)
        groups = list(by_candidate.values())
        # a streamed model: every candidate in one pass over the blocks (one read of the checkpoint); in memory,
        # one candidate at a time (the block states of a whole population need not fit on the device at once)
        batches = [groups] if self.forward.runner.stream is not None else [[g] for g in groups]
        for batch in batches:
            scores = self._window_scores_many([(offsets, [todo[j][2] for j in js]) for offsets, js in batch], tokens)
            for (_, js), got in zip(batch, scores):
                for j, s in zip(js, got):
                    mine[j] = s if math.isfinite(s) else math.inf
                self.local_evaluations += len(js)
        if world > 1:
            import torch.distributed as dist

            parts: list = [None] * world
            dist.all_gather_object(parts, mine, group=self.group)
            for p in parts:
                mine.update(p)
        for j, (key, _, i) in enumerate(todo):  # windows of one key are queued in order
            scores = self.memo.setdefault(key, [])
            assert len(scores) == i
            scores.append(mine[j])
        self.evaluations += len(todo)

    def __call__(self, offsets: Offsets, n_windows: int, tokens: int | None = None) -> float:
        # the memo is filled by prefetch alone (in a process group every rank makes the same calls)
        self.prefetch([offsets], n_windows, tokens)
        vals = self.memo[self._memo_key(offsets, tokens)][:n_windows]
        return sum(vals) / len(vals)
