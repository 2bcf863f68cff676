"""metrics.jsonl records, the loss plot, and bytes per token."""

import json

import numpy as np

from jaxrec.data import ByteTokenizer
from jaxrec.train import metrics


def test_byte_lengths_of_the_byte_tokenizer():
  tok = ByteTokenizer()
  lengths = metrics.token_byte_lengths(tok)
  assert lengths.shape == (tok.vocab_size,)
  text = "héllo ☃"
  ids = [tok.bos_id, *tok.encode(text), tok.eos_id, tok.pad_id]
  assert lengths[ids].sum() == len(text.encode("utf-8"))
  assert metrics.token_byte_lengths(object()) is None


def test_jsonl_records_and_plot(tmp_path):
  with metrics.MetricsWriter(str(tmp_path), total_steps=4, progress=False) as writer:
    for step in range(1, 5):
      writer.write(step, "train", {"loss": 5.0 - step, "bits_per_byte": np.float32(7.0 - step)})
      writer.advance()
    writer.write(4, "validation", {"loss": 1.5, "bits_per_byte": 2.5})
  records = metrics.read_metrics(str(tmp_path))
  assert records["validation"][4]["bits_per_byte"] == 2.5
  # A run resumed from its checkpoint at step 2 repeats steps 3 and 4: the records the first run
  # wrote after its checkpoint are dropped, so no step is recorded twice.
  with metrics.MetricsWriter(
    str(tmp_path), total_steps=4, initial_step=2, progress=False
  ) as writer:
    writer.write(3, "train", {"loss": 1.75, "bits_per_byte": 3.0})
  lines = [json.loads(x) for x in (tmp_path / metrics.METRICS_FILE).read_text().splitlines()]
  assert lines[0] == {"step": 1, "split": "train", "loss": 4.0, "bits_per_byte": 6.0}
  assert [(r["step"], r["split"]) for r in lines] == [(1, "train"), (2, "train"), (3, "train")]
  records = metrics.read_metrics(str(tmp_path))
  assert records["train"][3]["loss"] == 1.75 and "validation" not in records
  png = metrics.plot_losses(str(tmp_path))
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
