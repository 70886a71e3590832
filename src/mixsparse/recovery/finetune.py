"""End-to-end masked fine-tuning: next-token loss (plus, optionally, KL to the dense model's logits) on a
training corpus, with the mask held exactly. Full mode tunes the kept weights (gradients at pruned
positions zeroed, weights re-masked after each step); ``lora`` trains peft adapters whose delta is masked
in the forward *and* in the merge, so what is trained is what is saved and every zero survives the merge.

Checkpoints (tuned tensors, optimiser state, step, history) are written atomically every
``checkpoint_every`` steps; a call with the same settings resumes from the last one and reaches the same
weights as an uninterrupted run (the batch order and learning rate are functions of the step).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import DataError, NumericalError
from ..io import atomic_dir
from ..modeling import prunable_linears
from ..placement import Placement
from .common import DenseStore, FixedMask, MasterWeights, autocast, autocast_dtype, tuned_parameters
from .options import FinetuneOptions

log = logging.getLogger(__name__)


def _masked_lora_linear():
    """peft's LoRA ``Linear`` with its delta multiplied by the base weight's mask (defined lazily: peft is
    imported only when LoRA is used). peft has no masked adapter; this subclass changes two methods and
    leaves the rest (init, scaling, saving, merging) to peft."""
    from peft.tuners.lora.layer import Linear

    class MaskedLoraLinear(Linear):
        def get_delta_weight(self, adapter) -> torch.Tensor:
            delta = super().get_delta_weight(adapter)
            # the base weight is frozen, so its zeros are the mask; merging adds exactly this
            return torch.where(self.get_base_layer().weight != 0, delta, torch.zeros((), dtype=delta.dtype,
                                                                                     device=delta.device))

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            if self.disable_adapters or self.merged:
                return super().forward(x, *args, **kwargs)
            result = self.base_layer(x, *args, **kwargs)
            for name in self.active_adapters:
                if name in self.lora_A:
                    xa = self._cast_input_dtype(self.lora_dropout[name](x), self.lora_A[name].weight.dtype)
                    result = result + F.linear(xa, self.get_delta_weight(name)).to(result.dtype)
            return result

    return MaskedLoraLinear


def check_windows(windows: torch.Tensor, batch_size: int, what: str) -> torch.Tensor:
    """At least one batch of training windows, or an error naming the fix."""
    if windows.shape[0] < batch_size:
        raise DataError(f"{what} gives {windows.shape[0]} windows of {windows.shape[1]} tokens, fewer than one batch "
                        f"({batch_size}); give a larger corpus (recover.finetune.corpus) or lower "
                        "recover.finetune.seqlen/batch_size")
    return windows


def lr_at(step: int, opts: FinetuneOptions, peak: float) -> float:
    if step < opts.warmup:
        return peak * (step + 1) / opts.warmup
    span = max(1, opts.steps - opts.warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - opts.warmup) / span)))


def batch_at(windows: torch.Tensor, step: int, batch_size: int, seed: int) -> torch.Tensor:
    """The batch of ``step``: epochs are seeded permutations, so a resumed run draws the same batches."""
    per_epoch = windows.shape[0] // batch_size
    epoch, k = divmod(step, per_epoch)
    order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    return windows[order[k * batch_size:(k + 1) * batch_size]]


class _Checkpoint:
    """The last good state: on disk (atomic directory swap) when a directory is given, else in memory."""

    def __init__(self, path: Path | None, fingerprint: str):
        self.path, self.fingerprint = path, fingerprint
        self.memory: dict | None = None

    def save(self, step: int, params: dict[str, torch.Tensor], opt: torch.optim.Optimizer, history: dict) -> None:
        tensors = {n: p.detach().cpu().clone().contiguous() for n, p in params.items()}
        if self.path is None:
            self.memory = {"step": step, "tensors": tensors, "opt": opt.state_dict(), "history": json.loads(json.dumps(history))}
            return
        from safetensors.torch import save_file

        with atomic_dir(self.path, overwrite=True) as tmp:
            save_file(tensors, str(tmp / "tuned.safetensors"))
            torch.save(opt.state_dict(), tmp / "optimizer.pt")
            (tmp / "state.json").write_text(json.dumps({"fingerprint": self.fingerprint, "step": step,
                                                        "history": history}))

    def load(self) -> dict | None:
        if self.path is None:
            return self.memory
        meta = self.path / "state.json"
        if not meta.is_file():
            return None
        state = json.loads(meta.read_text())
        if state.get("fingerprint") != self.fingerprint:
            log.warning("fine-tuning checkpoint in %s is for other settings or another model; starting over", self.path)
            return None
        from safetensors.torch import load_file

        return {"step": state["step"], "history": state["history"],
                "tensors": load_file(str(self.path / "tuned.safetensors")),
                "opt": torch.load(self.path / "optimizer.pt", weights_only=True)}


def _restore(params: dict[str, torch.Tensor], opt: torch.optim.Optimizer | None, saved: dict) -> None:
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved["tensors"][n])
    if opt is not None:
        opt.load_state_dict(saved["opt"])


def _dense_names(model: nn.Module, dense: DenseStore, blocks_name: str, device) -> dict[str, torch.Tensor]:
    """The dense block tensors under the names the (possibly peft-wrapped) model uses for them."""
    own = {n: t.dtype for n, t in [*model.named_parameters(), *model.named_buffers()]}
    out = {}
    for name, t in dense.params(blocks_name, device):
        if name not in own:
            head, _, leaf = name.rpartition(".")
            name = f"{head}.base_layer.{leaf}"  # a linear wrapped by peft
        if name in own:
            out[name] = t.to(own[name])  # the placed model's dtype (float32 when upcast for the stage)
    return out


@torch.no_grad()
def _val_ppl(model: nn.Module, windows: torch.Tensor, device, batch_size: int) -> float:
    total, count = 0.0, 0
    for k in range(0, windows.shape[0], batch_size):
        ids = windows[k:k + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
        count += ids[:, 1:].numel()
    return math.exp(total / count)


def finetune(model: nn.Module, train: torch.Tensor, val: torch.Tensor, options: FinetuneOptions, *, lora: bool = False,
             device: Placement | torch.device | str | None = None, dense: DenseStore | None = None, seed: int = 0,
             state_dir: str | Path | None = None, fingerprint: str = "", progress: bool = True,
             on_step: Callable[[int], None] | None = None) -> dict:
    """Fine-tune ``model`` in place on ``train`` windows ``(n, seqlen)``, validating on ``val`` windows.

    ``dense``: the dense snapshot, needed when ``kl_weight > 0``. ``on_step(step)`` is called after every
    finished step (tests use it to interrupt). Returns losses, validation perplexities and timings."""
    from ..modeling import find_decoder_blocks

    opts = options
    placement = Placement.resolve(device, "whole", model)
    if placement.mode != "whole":
        raise ValueError("fine-tuning needs the whole model on one device")
    if opts.kl_weight > 0 and dense is None:
        raise ValueError("kl_weight > 0 needs the dense snapshot")
    check_windows(train, opts.batch_size, "the training data")
    blocks_name, _ = find_decoder_blocks(model)
    t0 = time.perf_counter()
    linears = prunable_linears(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    for p in model.parameters():
        p.requires_grad_(False)
    peft_model = None
    with placement.whole(model) as dev:
        try:
            if lora:
                from peft import LoraConfig, get_peft_model

                # adapters go on nn.Linear layers; fused MoE experts (3-D tensors) get none and stay as pruned
                targets = [n for n, lin in linears.items() if isinstance(lin, nn.Linear)]
                not_adapted = len(linears) - len(targets)
                if not_adapted:
                    log.warning("lora: %d expert matrices (fused MoE tensors) get no adapter and stay as pruned; "
                                "recover.mode=finetune or blockwise tunes them", not_adapted)
                cfg = LoraConfig(r=opts.lora_r, lora_alpha=opts.lora_alpha, lora_dropout=opts.lora_dropout,
                                 target_modules=targets, bias="none")
                cfg._register_custom_module({nn.Linear: _masked_lora_linear()})
                with torch.random.fork_rng(devices=[]):  # seeded adapter init (a resumed run builds the same ones),
                    torch.manual_seed(seed)  # without reseeding the caller's generator
                    peft_model = get_peft_model(model, cfg)
                net, mask = peft_model, None
                tuned = {n: p for n, p in net.named_parameters() if p.requires_grad}
            else:
                net, mask = model, FixedMask(linears)
                ids_ = {id(p) for p in tuned_parameters(model, linears, opts.params)}
                tuned = {n: p for n, p in model.named_parameters() if id(p) in ids_}
                for p in tuned.values():
                    p.requires_grad_(True)
            teacher = None
            if opts.kl_weight > 0:
                dense_params = _dense_names(model, dense, blocks_name, dev)

                def dense_logits(ids: torch.Tensor) -> torch.Tensor:
                    # the dense model = this one with the dense block tensors swapped in (adapters off)
                    off = peft_model.disable_adapter() if peft_model is not None else contextlib.nullcontext()
                    with off:
                        return torch.func.functional_call(model, dense_params, (), {"input_ids": ids, "use_cache": False},
                                                          strict=False).logits

                teacher = dense_logits
            result = _train(net, tuned, mask, train, val, opts, opts.lora_lr if lora else opts.lr, dev, teacher, seed,
                            _Checkpoint(Path(state_dir) if state_dir is not None else None, fingerprint), progress, on_step)
        finally:
            if peft_model is not None:
                peft_model.merge_and_unload()  # masked delta (MaskedLoraLinear.get_delta_weight): zeros stay
            for n, p in model.named_parameters():
                p.requires_grad_(flags.get(n, False))
            model.train(was_training)
    if lora:
        result["not_adapted"] = not_adapted
    result.update({"mode": "lora" if lora else "finetune", "settings": dataclasses.asdict(opts),
                   "seconds": round(time.perf_counter() - t0, 3)})
    return result


def _train(net, tuned, mask, train, val, opts: FinetuneOptions, peak_lr: float, dev, teacher, seed, ckpt: _Checkpoint,
           progress, on_step) -> dict:
    amp = autocast_dtype(opts.dtype, dev)
    mp = MasterWeights(tuned, mask)  # float32 masters of bf16/fp16 tensors; checkpoints hold the masters
    opt = torch.optim.AdamW(list(mp.masters.values()), lr=peak_lr, weight_decay=opts.weight_decay)
    history: dict = {"loss": [], "val_ppl": []}
    start, resumed = 0, None
    saved = ckpt.load()
    if saved is not None:
        _restore(mp.masters, opt, saved)
        mp.to_model()
        start, history, resumed = saved["step"], saved["history"], saved["step"]
    # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_* (the old names warn)
    prefix = "activation" if hasattr(net, "activation_checkpointing_enable") else "gradient"
    gc = opts.gradient_checkpointing and hasattr(net, f"{prefix}_checkpointing_enable")
    base = net.get_base_model() if hasattr(net, "get_base_model") else net
    had_hooks = bool(getattr(base, "_require_grads_hooks", None))
    if gc:
        getattr(net, f"{prefix}_checkpointing_enable")(**{f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}})
    try:
        if saved is None:
            net.eval()
            history["val_ppl"].append([0, _val_ppl(net, val, dev, opts.batch_size)])
            ckpt.save(0, mp.masters, opt, history)
        bar = tqdm(range(start, opts.steps), desc="recover[finetune]", disable=not progress, initial=start,
                   total=opts.steps)
        for step in bar:
            net.train()
            ids = batch_at(train, step, opts.batch_size, seed).to(dev)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, opts, peak_lr)
            with autocast(dev, amp):
                logits = net(input_ids=ids, use_cache=False).logits[:, :-1]
            logits = logits.float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            if teacher is not None:
                with torch.no_grad(), autocast(dev, amp):
                    ref = teacher(ids)[:, :-1]
                ref = F.log_softmax(ref.float(), dim=-1)
                kl = F.kl_div(F.log_softmax(logits, dim=-1), ref, log_target=True, reduction="batchmean")
                loss = loss + opts.kl_weight * kl / ids.shape[1]
            value = float(loss.detach())
            if not math.isfinite(value):
                last = ckpt.load()
                _restore(mp.masters, None, last)
                mp.to_model()
                raise NumericalError(f"fine-tuning loss became {value} at step {step}; the model is back at the last "
                                     f"good checkpoint (step {last['step']}"
                                     f"{', ' + str(ckpt.path) if ckpt.path else ''}). Lower recover.finetune."
                                     f"{'lora_lr' if mask is None else 'lr'}")
            mp.backward(loss)
            mp.step(opt)  # gradients masked and weights re-masked on the float32 masters
            history["loss"].append([step + 1, value])
            bar.set_postfix(loss=f"{value:.3f}")
            done = step + 1
            if (opts.eval_every and done % opts.eval_every == 0) or done == opts.steps:
                net.eval()
                history["val_ppl"].append([done, _val_ppl(net, val, dev, opts.batch_size)])
                bar.set_postfix(loss=f"{value:.3f}", val_ppl=f"{history['val_ppl'][-1][1]:.1f}")
            if opts.checkpoint_every and done % opts.checkpoint_every == 0 and done < opts.steps:
                ckpt.save(done, mp.masters, opt, history)
            if on_step is not None:
                on_step(done)
        bad = [n for n, p in tuned.items() if not bool(torch.isfinite(p).all())]
        if bad:  # the last step's update can be non-finite even when its loss was not
            last = ckpt.load()
            _restore(mp.masters, None, last)
            mp.to_model()
            raise NumericalError(f"fine-tuning left non-finite weights in {bad[0]}; the model is back at the last good "
                                 f"checkpoint (step {last['step']}). Lower the learning rate")
    finally:
        if gc:
            getattr(net, f"{prefix}_checkpointing_disable")()
            # enabling also hooked the input embeddings to require grads; disabling leaves that hook on
            if not had_hooks and getattr(base, "_require_grads_hooks", None):
                base.disable_input_require_grads()
        net.eval()
    return {"steps": opts.steps, "resumed_from": resumed, "trainable_params": sum(p.numel() for p in tuned.values()),
            "loss": history["loss"], "val_ppl": history["val_ppl"], "master_weights": mp.active,
            "skipped_steps": mp.skipped, "autocast": None if amp is None else str(amp).replace("torch.", "")}
