"""Recovery keeps the mask: block-wise reconstruction and masked fine-tuning (full and LoRA) on tiny random
models. Every mode leaves the zeros bit-identical, lowers what it optimises, and resumes exactly."""

import copy
import json

import pytest
import torch
from torch import nn

from mixsparse.cli import main
from mixsparse.engine import prune_layerwise
from mixsparse.errors import DataError, NumericalError, SparsityError
from mixsparse.modeling import param_counts, prunable_linears
from mixsparse.recovery import BlockwiseOptions, FinetuneOptions
from mixsparse.recovery.blockwise import reconstruct_blockwise
from mixsparse.recovery.common import DenseStore, check_pruned, check_zeros_match, zero_masks
from mixsparse.recovery.finetune import batch_at, check_windows, finetune
from mixsparse.sparsity import SparsityMap

from .tiny import tiny_ids, tiny_model


@pytest.fixture
def pruned(tmp_path):
    """A tiny Llama pruned to 60% with Wanda, its dense snapshot, and calibration ids."""
    model = tiny_model("llama", num_hidden_layers=3)
    ids = tiny_ids(8, 16)
    dense = DenseStore.snapshot(model, tmp_path / "dense", "fp")
    prune_layerwise(model, ids, SparsityMap.uniform(0.6, param_counts(model)), "wanda", progress=False)
    return model, dense, ids


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def same_zeros(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


BW = BlockwiseOptions(epochs=3, lr=1e-3, batch_size=2, dtype="float32")
FT = FinetuneOptions(steps=6, lr=1e-3, warmup=1, batch_size=2, seqlen=16, eval_every=3, val_windows=2,
                     checkpoint_every=2, dtype="float32", gradient_checkpointing=True)


# block-wise ------------------------------------------------------------------------------------
def test_blockwise_keeps_the_mask_and_lowers_every_blocks_error(pruned):
    model, dense, ids = pruned
    zeros = zero_masks(model)
    before = params_of(model)
    rec = reconstruct_blockwise(model, ids, dense, BW, device="cpu", progress=False)
    assert same_zeros(zeros, zero_masks(model))
    assert len(rec["blocks"]) == 3
    for b in rec["blocks"]:
        assert b["kept"] and b["mse_after"] < b["mse_before"], b
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all("proj" in n for n in changed)  # only the linears move (params: linears)


def test_blockwise_error_is_measured_against_the_dense_blocks(pruned):
    """mse_before of block 0 is the pruned block's error against the dense block on the same inputs."""
    model, dense, ids = pruned
    dense_model = tiny_model("llama", num_hidden_layers=3)
    rec = reconstruct_blockwise(copy.deepcopy(model), ids, dense, BW, device="cpu", progress=False)
    from mixsparse.engine import LayerwiseRunner
    from mixsparse.data import batches

    runner = LayerwiseRunner(model, device="cpu")
    state = runner.catch(batches(ids, 2))
    pruned_out = runner.run_block(0, state)
    dense_out = runner.run_block(0, state, block=dense_model.model.layers[0])
    mse = sum(float(((a - b) ** 2).sum()) for a, b in zip(pruned_out, dense_out)) / sum(t.numel() for t in dense_out)
    assert rec["blocks"][0]["mse_before"] == pytest.approx(mse, rel=1e-5)


def test_blockwise_norms_and_dense_inputs(pruned):
    model, dense, ids = pruned
    zeros = zero_masks(model)
    norm_before = model.model.layers[0].input_layernorm.weight.detach().clone()
    opts = BlockwiseOptions(epochs=2, lr=1e-3, batch_size=2, dtype="float32", params="linears+norms", inputs="dense")
    rec = reconstruct_blockwise(model, ids, dense, opts, device="cpu", progress=False)
    assert same_zeros(zeros, zero_masks(model))
    assert not torch.equal(norm_before, model.model.layers[0].input_layernorm.weight)
    assert all(b["kept"] and b["mse_after"] < b["mse_before"] for b in rec["blocks"])


def test_blockwise_resume_after_interruption_equals_an_uninterrupted_run(pruned, tmp_path, monkeypatch):
    model, dense, ids = pruned
    whole = copy.deepcopy(model)
    reconstruct_blockwise(whole, ids, dense, BW, device="cpu", progress=False)

    import mixsparse.recovery.blockwise as bw

    real, calls = bw._tune_block, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    first = copy.deepcopy(model)
    with monkeypatch.context() as m:
        m.setattr(bw, "_tune_block", interrupted)
        with pytest.raises(KeyboardInterrupt):
            reconstruct_blockwise(first, ids, dense, BW, device="cpu", state_dir=tmp_path / "st", fingerprint="a",
                                  progress=False)
    assert json.loads((tmp_path / "st" / "progress.json").read_text())["blocks"][0]["block"] == 0
    resumed = copy.deepcopy(model)  # a fresh process: the pruned model again, the state on disk
    rec = reconstruct_blockwise(resumed, ids, dense, BW, device="cpu", state_dir=tmp_path / "st", fingerprint="a",
                                progress=False)
    assert len(rec["blocks"]) == 3
    for (n, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), n


# fine-tuning -----------------------------------------------------------------------------------
def windows():
    """Random tokens: nothing generalises, so validation is on training windows (the loss must fall there)."""
    train = tiny_ids(8, 16, seed=1)
    return train, train[:2]


@pytest.mark.parametrize("lora", [False, True])
def test_finetune_keeps_the_mask_and_lowers_the_loss(pruned, lora):
    model, _, _ = pruned
    zeros = zero_masks(model)
    model.model.embed_tokens.weight.requires_grad_(False)  # a caller's own flags come back as they were
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    train, val = windows()
    opts = FinetuneOptions(**{**FT.__dict__, "steps": 12, "lr": 1e-3, "lora_lr": 3e-3})
    rec = finetune(model, train, val, opts, lora=lora, device="cpu", progress=False)
    assert same_zeros(zeros, zero_masks(model))
    assert all(type(m) is nn.Linear for m in prunable_linears(model).values())  # merged and unloaded
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert rec["val_ppl"][-1][1] < rec["val_ppl"][0][1]
    assert [s for s, _ in rec["loss"]] == list(range(1, 13))
    # nothing of the training is left on the model: no grad flags, no input-grad hook, eval mode
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not getattr(model, "_require_grads_hooks", None) and not model.training
    with torch.no_grad():
        model(input_ids=train[:1])


def test_lora_merge_is_exactly_the_masked_model_that_was_trained(pruned):
    """The merged weights give the outputs the adapters gave while training (delta masked in both)."""
    from peft import LoraConfig, get_peft_model

    from mixsparse.recovery.finetune import _masked_lora_linear

    model, _, _ = pruned
    zeros = zero_masks(model)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=list(prunable_linears(model)))
    cfg._register_custom_module({nn.Linear: _masked_lora_linear()})
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_()  # B starts at zero: give the adapters a non-zero delta
    ids = tiny_ids(2, 16)
    with torch.no_grad():
        unmerged = peft_model(input_ids=ids).logits
    merged = peft_model.merge_and_unload()
    with torch.no_grad():
        after = merged(input_ids=ids).logits
    torch.testing.assert_close(after, unmerged, rtol=1e-5, atol=1e-5)
    assert same_zeros(zeros, zero_masks(merged))

    # the same adapters with peft's plain LoRA layer fill the zeros on merge: what this test would catch
    plain_model = copy.deepcopy(merged)
    plain = get_peft_model(plain_model, LoraConfig(r=4, lora_alpha=8, target_modules=list(prunable_linears(plain_model))))
    with torch.no_grad():
        for n, p in plain.named_parameters():
            if "lora_B" in n:
                p.normal_()
    assert not same_zeros(zeros, zero_masks(plain.merge_and_unload()))


def test_finetune_resume_after_interruption_equals_an_uninterrupted_run(pruned, tmp_path):
    model, dense, _ = pruned
    train, val = windows()
    opts = FinetuneOptions(**{**FT.__dict__, "kl_weight": 0.5})
    whole = copy.deepcopy(model)
    ref = finetune(whole, train, val, opts, device="cpu", dense=dense, progress=False)

    def stop(step):
        if step == 3:
            raise KeyboardInterrupt

    first = copy.deepcopy(model)
    with pytest.raises(KeyboardInterrupt):
        finetune(first, train, val, opts, device="cpu", dense=dense, state_dir=tmp_path / "ft", fingerprint="f",
                 progress=False, on_step=stop)
    assert json.loads((tmp_path / "ft" / "state.json").read_text())["step"] == 2
    resumed = copy.deepcopy(model)
    rec = finetune(resumed, train, val, opts, device="cpu", dense=dense, state_dir=tmp_path / "ft", fingerprint="f",
                   progress=False)
    assert rec["resumed_from"] == 2 and rec["loss"] == ref["loss"]
    for (n, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), n


def test_nan_loss_stops_and_restores_the_last_good_checkpoint(pruned, tmp_path):
    model, _, _ = pruned
    train, val = windows()
    q = prunable_linears(model)["model.layers.0.self_attn.q_proj"]
    saved = {}

    def poison(step):
        if step == 2:
            saved.update(params_of(model))  # what the step-2 checkpoint holds
        if step == 3:
            with torch.no_grad():
                q.weight.fill_(float("nan"))

    with pytest.raises(NumericalError, match=r"step 3.*last good checkpoint \(step 2"):
        finetune(model, train, val, FT, device="cpu", state_dir=tmp_path / "ft", fingerprint="f", progress=False,
                 on_step=poison)
    for n, p in model.named_parameters():
        assert torch.equal(p, saved[n]), n


def test_batches_depend_on_the_step_only():
    w = tiny_ids(7, 4)
    assert torch.equal(batch_at(w, 5, 2, seed=0), batch_at(w, 5, 2, seed=0))
    epoch0 = torch.cat([batch_at(w, s, 2, seed=0) for s in range(3)])
    assert len({tuple(r.tolist()) for r in epoch0}) == 6  # no window twice within an epoch


# refusals ---------------------------------------------------------------------------------------
def test_a_dense_model_is_refused():
    """By design recovery is refused on a model with no zero (no mask to keep), not a silent no-op."""
    with pytest.raises(SparsityError, match="prune it first"):
        check_pruned(tiny_model("llama"))


def test_zeros_that_do_not_match_the_recorded_map_are_refused(pruned):
    model, _, _ = pruned
    achieved = {n: float((l.weight == 0).float().mean()) for n, l in prunable_linears(model).items()}
    check_zeros_match(model, achieved, "run.json")
    achieved["model.layers.1.mlp.up_proj"] = 0.3
    with pytest.raises(SparsityError, match=r"up_proj has 0.59\d+ zeros but run.json recorded 0.3000"):
        check_zeros_match(model, achieved, "run.json")


def test_a_too_small_corpus_is_refused():
    with pytest.raises(DataError, match="fewer than one batch"):
        check_windows(tiny_ids(1, 16), 2, "recover.finetune.corpus 'x.txt'")


# the stage in a run ------------------------------------------------------------------------------
@pytest.fixture
def quick(quick_cli):
    return quick_cli(sparsity=0.6)


@pytest.mark.parametrize("mode", ["blockwise", "lora", "blockwise+lora"])
def test_prune_with_recovery_records_it_and_saves_the_same_zeros(quick, tmp_path, word_corpus, mode):
    out = tmp_path / "run"
    extra = []
    if "blockwise" in mode:
        extra += ["--set", "recover.blockwise.dtype=float32", "--set", "recover.blockwise.schedule=cosine"]
    if "lora" in mode:
        extra += ["--set", f"recover.finetune.corpus={word_corpus}", "--set", "recover.finetune.steps=4",
                  "--set", "recover.finetune.seqlen=32", "--set", "recover.finetune.batch_size=2",
                  "--set", "recover.finetune.val_windows=2", "--set", "recover.finetune.kl_weight=1.0"]
    assert main(["prune", *quick, "--recover", mode, *extra, "--out", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["recovery"]["mode"] == mode and run["recovery"]["zeros_unchanged"]
    if "+" in mode:  # each stage recorded in order, and its own section and plot in the report
        stages = run["recovery"]["stages"]
        assert [s["mode"] for s in stages] == mode.split("+") and stages[0]["blocks"] and stages[1]["loss"]
        assert run["recovery"]["seconds"] == pytest.approx(sum(s["seconds"] for s in stages), abs=0.01)
        report = (out / "report.md").read_text()
        assert "### blockwise" in report and "### lora" in report and "recovery-lora.png" in report
        from mixsparse.report import PLOTS_DIR

        assert all((out / PLOTS_DIR / f"recovery-{m}.png").is_file() for m in ("blockwise", "lora"))
    assert run["perplexity"]["recovered"] > 0 and "recover" in run["timings"]
    from mixsparse.export import load_compressed
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out / "model")
    comp = load_compressed(out / "compressed")
    for name, frac in run["pruning"]["achieved"].items():  # the saved zeros are the pruned ones
        for m in (hf, comp):
            w = prunable_linears(m)[name].weight
            assert abs(float((w == 0).sum()) - frac * w.numel()) <= 1, name
    report = (out / "report.md").read_text()
    assert "## Recovery" in report and "after recovery" in report


def test_recover_command_recovers_an_existing_run(quick, tmp_path):
    out = tmp_path / "run"
    assert main(["prune", *quick, "--out", str(out)]) == 0
    rec_out = tmp_path / "rec"
    assert main(["recover", str(out), "--mode", "blockwise", "--set", "recover.blockwise.epochs=1", "--quiet",
                 "--out", str(rec_out)]) == 0
    run = json.loads((rec_out / "run.json").read_text())
    assert run["status"] == "finished" and run["recovery"]["mode"] == "blockwise"
    assert run["perplexity"]["recovered"] <= run["perplexity"]["pruned"] * 1.5
    assert (rec_out / "model" / "config.json").is_file()


def test_recover_reads_a_run_recorded_before_per_method_allocation_options(quick, tmp_path):
    """run.json schema 1 held one flat allocation section; recover migrates it instead of refusing the run."""
    from mixsparse.config import LEGACY_ALLOCATION_KEYS

    out = tmp_path / "run"
    assert main(["prune", *quick, "--allocation", "owl", "--set", "allocation.owl.lam=0.05", "--out", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["schema"] == 2
    del run["schema"]
    run["config"]["allocation"] = {"owl_lambda": 0.05, "sensitivity_samples": 3, "min_sparsity": 0.1}
    assert set(run["config"]["allocation"]) <= set(LEGACY_ALLOCATION_KEYS)
    (out / "run.json").write_text(json.dumps(run))
    rec_out = tmp_path / "rec"
    assert main(["recover", str(out), "--mode", "blockwise", "--set", "recover.blockwise.epochs=1", "--quiet",
                 "--out", str(rec_out)]) == 0
    config = json.loads((rec_out / "run.json").read_text())["config"]["allocation"]
    assert config["owl"]["lam"] == 0.05 and config["msp"]["samples"] == 3 and config["hessian"]["min_sparsity"] == 0.1


def test_recover_never_writes_into_the_source_run(quick, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["prune", *quick, "--out", str(out)]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for target in (out, out / "inside"):
        assert main(["recover", str(out), "--out", str(target), "--overwrite", "--quiet"]) == 2
        assert "source run" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("mode", ["finetune", "blockwise+finetune", "blockwise+lora"])
def test_finetune_needs_the_model_whole_on_the_device(mode):
    from mixsparse.errors import ConfigError
    from mixsparse.placement import Placement
    from mixsparse.recovery.stage import check_placement, needs_dense
    from mixsparse.config import load_config

    cfg = load_config(None, {"recover.mode": mode})
    with pytest.raises(ConfigError, match="recover.mode=blockwise"):
        check_placement(cfg.recover, Placement(torch.device("cpu"), "blockwise"))
    check_placement(cfg.recover, Placement(torch.device("cpu"), "whole"))
    assert needs_dense(cfg.recover) == mode.startswith("blockwise")  # finetune alone: only with a KL weight
    check_placement(load_config(None, {"recover.mode": "blockwise"}).recover, Placement(torch.device("cpu"), "blockwise"))


def test_unknown_recovery_modes_and_schedules_are_one_line_errors():
    from mixsparse.config import load_config
    from mixsparse.errors import ConfigError

    with pytest.raises(ConfigError, match="recover.mode must be one of"):
        load_config(None, {"recover.mode": "lora+blockwise"})
    with pytest.raises(ConfigError, match="schedule must be 'constant' or 'cosine'"):
        load_config(None, {"recover.blockwise.schedule": "linear"})


def test_blockwise_cosine_schedule_decays_to_zero_over_each_block(pruned, monkeypatch):
    from mixsparse.recovery import common

    model, dense, ids = pruned
    seen = []
    step = common.MasterWeights.step

    def record(self, opt):
        seen.append(opt.param_groups[0]["lr"])
        return step(self, opt)

    monkeypatch.setattr(common.MasterWeights, "step", record)
    opts = BlockwiseOptions(epochs=3, lr=1e-3, batch_size=2, dtype="float32", schedule="cosine")
    zeros = zero_masks(model)
    rec = reconstruct_blockwise(model, ids, dense, opts, device="cpu", progress=False)
    per_block = 3 * 4  # epochs x batches (8 windows in batches of 2)
    assert len(seen) == 3 * per_block and same_zeros(zeros, zero_masks(model))
    for b in range(3):
        lrs = seen[b * per_block:(b + 1) * per_block]
        assert lrs[0] == pytest.approx(1e-3) and all(x > y for x, y in zip(lrs, lrs[1:])) and lrs[-1] < 0.05e-3
    assert all(b["mse_after"] < b["mse_before"] for b in rec["blocks"])


def test_blockwise_leaves_skipped_linears_untouched(pruned, monkeypatch):
    """ArchSpec.skip: a linear the engine never prunes is not tuned by block-wise recovery either."""
    from mixsparse import modeling

    model, dense, ids = pruned
    monkeypatch.setitem(modeling.ARCHITECTURES, "llama", modeling.ArchSpec(skip=("o_proj",)))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("o_proj.weight")}
    rec = reconstruct_blockwise(model, ids, dense, BW, device="cpu", progress=False)
    assert any(b["kept"] for b in rec["blocks"])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
