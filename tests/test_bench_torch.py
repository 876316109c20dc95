"""benchmarks/bench_torch.py's PyTorch models are ours (where PyTorch is installed: the bench extra)."""

import pytest

torch = pytest.importorskip("torch")

from benchmarks import bench_torch  # noqa: E402
import models  # noqa: E402


@pytest.mark.parametrize("name", list(bench_torch.MODELS))
def test_the_torch_model_has_exactly_our_models_parameters(name):
  from flax import nnx

  ours = models.count_params(models.create_model(name, num_classes=10, rngs=nnx.Rngs(0)))
  theirs = sum(p.numel() for p in bench_torch.TORCH_MODELS[name]().parameters())
  assert theirs == ours


def test_the_reference_gsm_step_keeps_q_gradients_of_the_resnet56_pool():
  torch.manual_seed(0)
  model = bench_torch.TORCH_MODELS["resnet56"]()
  optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.0)  # lr 0: weights stay
  pool = [w for w in model.parameters() if w.ndim in (2, 4)]
  keep = int(sum(w.numel() for w in pool) / 10.0)
  images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
  bench_torch.torch_gsm_step(model, optimizer, pool, keep, images, labels)
  decay = [bench_torch.WEIGHT_DECAY * w for w in pool]
  kept = sum(int(((w.grad - d).abs() > 0).sum()) for w, d in zip(pool, decay))
  assert keep <= kept <= keep + 8  # ties at the threshold may keep a few more
