"""nf4 / int8 of one 576 -> 1536 linear layer (SmolLM2's MLP size) on CPU: relative error of the output vs fp32
and forward + backward time (median of 20, one thread), bitsandbytes and (if installed) torchao side by side.

    python benchmarks/quant_linear.py        (figures in docs/large_models.md)
"""
import importlib.util
import statistics
import time
import warnings

import torch

warnings.filterwarnings("ignore")
torch.manual_seed(0)
torch.set_num_threads(1)
w = torch.randn(1536, 576) * 0.02
x = torch.randn(8 * 128, 576)
ref = x @ w.T
def bench(name, fn, dtype):
    xs = x.to(dtype).requires_grad_(True)
    times = []
    for _ in range(20):
        t = time.perf_counter(); y = fn(xs); y.float().sum().backward(); times.append(time.perf_counter() - t)
    err = ((fn(x.to(dtype)).float() - ref).norm() / ref.norm()).item()
    print(f"| {name} | {err:.4f} | {1e3*statistics.median(times):.1f} |")
print("| variant | rel. error vs fp32 | fwd+bwd ms |\n|---|---|---|")
lin = torch.nn.Linear(576, 1536, bias=False); lin.weight.data = w.clone(); lin.requires_grad_(False)
bench("fp32 nn.Linear", lin, torch.float32)
bench("bf16 nn.Linear", lin.to(torch.bfloat16), torch.bfloat16)
import bitsandbytes as bnb
q4 = bnb.nn.Linear4bit(576, 1536, bias=False, compute_dtype=torch.float32, quant_type="nf4")
q4.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4"); q4 = q4.to("cpu")
bench("bitsandbytes nf4 (fp32 compute)", q4, torch.float32)
q4b = bnb.nn.Linear4bit(576, 1536, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
q4b.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4"); q4b = q4b.to("cpu")
bench("bitsandbytes nf4 (bf16 compute)", q4b, torch.bfloat16)
q8 = bnb.nn.Linear8bitLt(576, 1536, bias=False, has_fp16_weights=False)
q8.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False); q8 = q8.to("cpu")
bench("bitsandbytes int8 (LLM.int8)", q8, torch.float32)
if importlib.util.find_spec("torchao") is None:
    raise SystemExit("torchao rows skipped: pip install --no-deps torchao")
from torchao.quantization import NF4Tensor
from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4
n4 = NF4Tensor.from_tensor(w.to(torch.bfloat16), 64, 256)
bench("torchao NF4Tensor (bf16)", lambda t: linear_nf4(t, n4), torch.bfloat16)
from torchao.quantization import quantize_, Int8WeightOnlyConfig
l8 = torch.nn.Sequential(torch.nn.Linear(576, 1536, bias=False))
l8[0].weight.data = w.clone()
l8.requires_grad_(False)
quantize_(l8, Int8WeightOnlyConfig())
bench("torchao int8 weight-only", l8, torch.float32)
