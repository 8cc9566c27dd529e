import sys, time, torch
from leank.train.config import TrainConfig
from leank.train.trainer import Trainer, load_alpha
torch.set_num_threads(2)
a = load_alpha('benchmarks/results/train_smollm2/alpha.safetensors')
cfg = TrainConfig(model='smollm2-135m', sparsities=[0.85], alignment=8, device='cpu', dtype='float32',
                  out='/tmp/val/run', validation_samples=int(sys.argv[1]), sink=32, recent=64)
t = Trainer(cfg, progress=False)
print('memcheck', t.memory_check, flush=True)
for s in map(float, sys.argv[2:]):
    t0 = time.time()
    print(s, t.validation_loss(a, s), round(time.time() - t0, 1), flush=True)
