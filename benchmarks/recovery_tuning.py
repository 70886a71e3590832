"""Tuning runs that chose the block-wise recovery defaults: uniform 70% Wanda on the embedded model (32x512
wiki calibration windows, 20,480 test tokens), block-wise reconstruction with the settings given as JSON
arguments; prints seconds, test perplexity and a few blocks' output MSE before/after. Results (copied by hand
from its output) are in benchmarks/results/recovery_tuning.md.

    python benchmarks/recovery_tuning.py '{"epochs": 4, "n": 32, "lr": 3e-3}'
"""
import sys, time, torch
from mixsparse.loading import load_model
from mixsparse.config import RunConfig
from mixsparse.data import Calibration
from mixsparse.data import eval_windows, load_corpus
from mixsparse.engine import prune_layerwise
from mixsparse.sparsity import SparsityMap
from mixsparse.modeling import param_counts
from mixsparse.evaluation import perplexity
from mixsparse.recovery.common import DenseStore
from mixsparse.recovery.blockwise import reconstruct_blockwise
from mixsparse.recovery.options import BlockwiseOptions
import json
torch.manual_seed(0)
model, tok = load_model("embedded")
cfg = RunConfig()
calib = Calibration(tok, cfg)
ids = calib.ids(32, 512)
test = eval_windows(tok, load_corpus("wiki", "test"), 512, 20480)
store = DenseStore.snapshot(model, "benchmarks/results/recovery_tuning_work/dense", "x")
prune_layerwise(model, ids, SparsityMap.uniform(0.7, param_counts(model)), "wanda", progress=False)
sd = {k: v.clone() for k, v in model.state_dict().items()}
print("pruned ppl", perplexity(model, test, progress=False), flush=True)
for kw in [json.loads(a) for a in sys.argv[1:]]:
    model.load_state_dict(sd)
    n = kw.pop("n", 32)
    t = time.time()
    rep = reconstruct_blockwise(model, ids[:n], store, BlockwiseOptions(**kw), progress=False)
    el = time.time() - t
    print(kw, n, "secs", round(el, 1), "ppl", round(perplexity(model, test, progress=False), 2),
          "mse0", [round(b["mse_before"], 4) for b in rep["blocks"][::6]], "mse1", [round(b["mse_after"], 4) for b in rep["blocks"][::6]], flush=True)
