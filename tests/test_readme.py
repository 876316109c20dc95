"""The README's quick start runs as written (with a few random batches)."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
LOOP_COMMENT = "# for images, labels in batches: params, opt_state = train_step(params, opt_state, images, labels)"


def _quick_start_code() -> str:
  text = README.read_text()
  section = text[text.index("## Quick start") :]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_starts_with_the_main_job_and_the_test_command():
  first_block = re.search(r"```bash\n(.*?)```", README.read_text(), re.S).group(1)
  commands = [line.split("#")[0].strip() for line in first_block.splitlines()]
  assert commands == ["bash scripts/main.sh", "bash scripts/test.sh"]
  ci = (README.parent / ".ci" / "run").read_text()
  assert "bash scripts/test.sh" in ci


def test_quick_start_trains_and_prunes_to_the_requested_compression(capsys):
  code = _quick_start_code()
  assert LOOP_COMMENT in code
  rng = np.random.default_rng(0)
  batches = [
    (
      rng.standard_normal((32, 28, 28, 1)).astype(np.float32),
      rng.integers(0, 10, 32).astype(np.int32),
    )
    for _ in range(3)
  ]
  code = code.replace(
    LOOP_COMMENT,
    "for images, labels in batches: params, opt_state = train_step(params, opt_state, images, labels)",
  )
  namespace = {"batches": batches}
  exec(compile(code, str(README), "exec"), namespace)  # pylint: disable=exec-used
  report = namespace["gsm_optax"].sparsity_report(namespace["pruned"])
  assert report.total_size == 266_200
  assert report.total_nonzeros == 266_200 // 60
  out = capsys.readouterr().out
  assert "'step': Array(3" in out and "compression 60." in out
