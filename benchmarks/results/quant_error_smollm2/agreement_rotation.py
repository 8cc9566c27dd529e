"""Does rotating K before int4 (``+int4sr``) bring LeanK 70% + int4 closer to the full cache? (issue 14)

Decode agreement (leank.eval.agreement: KL(p_full || p_method) and top-1 agreement over teacher-forced
decode steps after a 4032-token prefill of the bundled prose) on the real SmolLM2-135M on the CPU (fp32),
for the bundled 70% mask alone, with int8, with int4s (symmetric, group 32) and with int4sr (the same
with rotated K). Each text window is one observation (mean ± standard error over windows).

    python benchmarks/results/quant_error_smollm2/agreement_rotation.py \\
        | tee benchmarks/results/quant_error_smollm2/agreement_rotation_output.txt
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from _env import environment  # noqa: E402

import leank  # noqa: E402
from leank.eval.agreement import AgreementConfig, run_agreement  # noqa: E402
from leank.eval.methods import parse_methods, prepare_methods  # noqa: E402

torch.manual_seed(0)
out = Path(__file__).resolve().parent / "agreement_rotation"
model, tok = leank.load_model("smollm2-135m", device="cpu")
mask = str(leank.bundled_mask_path("smollm2-135m", 0.7))
names = ["full", f"leank:{mask}", f"leank:{mask}+int8", f"leank:{mask}+int4s", f"leank:{mask}+int4sr"]
methods = prepare_methods(parse_methods(names), model, tok, model_name="smollm2-135m", mask_dir=out / "masks")
cfg = AgreementConfig(length=4032, steps=32, windows=8, batch_size=4)
result = run_agreement(model, tok, methods, cfg, model_name="smollm2-135m", out=out)
for row in result["methods"]:
    print(f"{row['method']:<48} KL {row['kl_mean']:.5f} ± {row['kl_stderr']:.5f}  top-1 {row['top1_mean']:.3f}")
print(environment())
