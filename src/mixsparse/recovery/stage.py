"""Recovery as a stage of a run: picks the method of ``recover.mode``, prepares its data, checks that the
zeros are exactly the same afterwards."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, SparsityError
from ..modeling import prunable_linears
from ..placement import Placement
from .common import DenseStore, check_pruned
from .options import stages_of, trains_whole


def needs_dense(recover) -> bool:
    """Whether a recovery needs the dense snapshot (taken before pruning)."""
    stages = stages_of(recover.mode)
    return "blockwise" in stages or (trains_whole(recover.mode) and recover.finetune.kl_weight > 0)


def check_placement(recover, placement: Placement) -> None:
    if trains_whole(recover.mode) and placement.mode != "whole":
        raise ConfigError(f"recover.mode={recover.mode} trains the whole model on {placement.device}, but this run places "
                          "it block by block (model.placement blockwise, chosen or because it does not fit); use "
                          "recover.mode=blockwise, which holds one block at a time")


def mask_digest(model: nn.Module) -> dict[str, str]:
    """A hash of every prunable weight's zero pattern (a few bytes per layer, whatever the model's size)."""
    from ..modeling import stream_of

    stream = stream_of(model)
    weights = (stream.layer_weights(model) if stream is not None
               else ((n, lin.weight.detach()) for n, lin in prunable_linears(model).items()))
    out = {}
    for name, w in weights:
        zeros = (w == 0).cpu().contiguous().view(torch.uint8).numpy()
        out[name] = hashlib.sha256(zeros.tobytes()).hexdigest()[:16]
    return out


def dense_snapshot(model: nn.Module, cache_dir: Path) -> DenseStore:
    from ..sensitivity import model_fingerprint

    fp = model_fingerprint(model)
    return DenseStore.snapshot(model, Path(cache_dir) / f"dense-{fp}", fp)


def recover(model: nn.Module, tokenizer, cfg, *, dense: DenseStore | None, device: Placement,
            run_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Run ``cfg.recover`` on the pruned ``model`` in place; returns its record. The zero pattern of every
    prunable weight is the same afterwards (checked; an error otherwise)."""
    r = cfg.recover
    if r.mode == "none":
        return {"mode": "none"}
    check_pruned(model)
    check_placement(r, device)
    if needs_dense(r) and dense is None:
        raise ConfigError(f"recover.mode={r.mode} needs the dense model's snapshot (DenseStore.snapshot before pruning)")
    before = mask_digest(model)
    stages = stages_of(r.mode)
    records = [_recover_stage(model, tokenizer, cfg, stage, dense, device, run_dir, progress) for stage in stages]
    rec = records[0] if len(records) == 1 else {
        "mode": r.mode, "stages": records, "seconds": round(sum(x.get("seconds", 0.0) for x in records), 3)}
    changed = [n for n, h in mask_digest(model).items() if before.get(n) != h]
    if changed:  # an invariant of every method: reaching here is a bug, not a user error
        raise SparsityError(f"recovery changed the zeros of {len(changed)} layer(s), e.g. {changed[0]}")
    rec["zeros_unchanged"] = True
    return json.loads(json.dumps(rec, default=str))


def _recover_stage(model, tokenizer, cfg, stage: str, dense, device, run_dir, progress) -> dict:
    from ..data import Calibration, eval_windows, load_corpus, tokenize, window_prefix
    from ..io import fingerprint as _fingerprint
    from ..sensitivity import model_fingerprint

    r = cfg.recover
    options = r.blockwise if stage == "blockwise" else r.finetune
    prefix = window_prefix(tokenizer, cfg.data.bos)
    state_dir = Path(run_dir) / "recovery" / stage if run_dir is not None else None
    if stage == "blockwise":
        from .blockwise import reconstruct_blockwise

        n = options.samples or cfg.data.calibration_samples
        data_fp = [cfg.data.calibration, n, cfg.data.seqlen, cfg.data.seed, prefix]
        fp = _fingerprint({"model": model_fingerprint(model), "dense": dense.meta, "options": options, "data": data_fp})
        ids = Calibration(tokenizer, cfg).ids(n, cfg.data.seqlen)
        return reconstruct_blockwise(model, ids, dense, options, device=device, seed=cfg.data.seed, state_dir=state_dir,
                                     fingerprint=fp, progress=progress)
    from .finetune import check_windows, finetune

    train = eval_windows(tokenizer, tokenize(tokenizer, load_corpus(options.corpus, "calibration")), options.seqlen,
                         None, prefix=prefix)
    check_windows(train, options.batch_size, f"recover.finetune.corpus {options.corpus!r}")
    val = eval_windows(tokenizer, load_corpus(cfg.data.validation, "validation"), options.seqlen,
                       options.val_windows * options.seqlen, prefix=prefix)
    check_windows(val, 1, f"the validation corpus data.validation {cfg.data.validation!r}")
    # the model fingerprint is taken after the stages before this one, so their settings are part of it
    fp = _fingerprint({"model": model_fingerprint(model), "options": options, "mode": stage,
                       "dense": dense.meta if dense is not None else None,
                       "data": [options.corpus, cfg.data.validation, cfg.data.seed, prefix]})
    rec = finetune(model, train, val, options, lora=stage == "lora", device=device, dense=dense,
                   seed=cfg.data.seed, state_dir=state_dir, fingerprint=fp, progress=progress)
    rec["train_windows"] = int(train.shape[0])
    return rec
