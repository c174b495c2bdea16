import sys, time; sys.path.insert(0, "python_tests")
import torch, nbl_ext
from hf_tiny import tiny_model, token_data
from nbl_ext.crossval import DEFAULT_RIDGES
m = tiny_model("llama", 4, dtype=torch.float64)
data = token_data(6, 40)
r = nbl_ext.calibrate(m, data, batch_size=4, progress=False, folds=3, ridges=DEFAULT_RIDGES)
t=time.time()
print(nbl_ext.score_criteria(m, r, ["direct_nll"], heldout=token_data(4, 32, seed=9)), time.time()-t)
t=time.time()
g = nbl_ext.greedy_selection(m, data, steps=3, heldout=token_data(4, 32, seed=9), folds=3, ridges=DEFAULT_RIDGES)
print(g.order, g.chosen, g.calibration_passes, g.heldout_passes, time.time()-t)
print(nbl_ext.score_criteria(m, r, "greedy", data=data, heldout=token_data(4, 32, seed=9), steps=2))
print(r.select(2, "greedy"), r.select(2, "direct_nll"), r.select(2,"cv_nmse"), r.select(2,"nbl"))
