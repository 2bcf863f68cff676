"""``train_and_evaluate(config, workdir)``: the language-model training loop.

Sections, in order: the run's config (from its record when resuming or continuing) → devices and
mesh → tokenizer and data → model and optimizer → initialize or restore → train (log, evaluate,
checkpoint every N steps) → final evaluation, checkpoint, plot and a sample. ``config`` is the
``ConfigDict`` of ``experiments/configs/default.py``.

The work directory holds ``run.json`` (the run record, see ``run_record``; with ``tokenizer.json``
when the run has its own), ``checkpoints/`` (orbax: train state + data iterator),
``metrics.jsonl``, ``loss.png`` and ``sample.txt``. Nothing is written before every check that
can fail has passed (the config, the record, the checkpoint step).
"""

import contextlib
import math
import os
import re
import signal
import threading
import time
from collections.abc import Collection, Iterator
from typing import Any

import jax
import ml_collections
from absl import logging
from jax.experimental import multihost_utils

import jaxrec
from jaxrec import data as data_lib
from jaxrec import sharding
from jaxrec.models import LM
from jaxrec.train import checkpoint, config_checks, distributed, metrics, optim, run_record
from jaxrec.train.trainer import Trainer


class TrainingInterrupted(Exception):
  """A run stopped by SIGINT or SIGTERM after finishing a step and checkpointing it.

  Attributes:
    step: the step reached and saved.
    signal_number: the signal that stopped it.
  """

  def __init__(self, step: int, signal_number: int, workdir: str):
    self.step, self.signal_number = step, signal_number
    name = signal.Signals(signal_number).name
    super().__init__(
      f"{name}: stopped after step {step}, saved in {workdir}; continue with "
      f"--workdir={workdir} --config.resume=True"
    )


@contextlib.contextmanager
def _stop_on_signals():
  """Yields a dict whose ``"signal"`` a SIGINT or SIGTERM sets, so that the loop finishes its step
  and checkpoints; a second SIGINT interrupts at once. Only in the main thread (Python delivers
  signals there); elsewhere the signals keep their handlers."""
  stop = {"signal": None}
  if threading.current_thread() is not threading.main_thread():
    yield stop
    return

  def request(signum, frame):
    if stop["signal"] is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    stop["signal"] = signum
    logging.warning(
      "%s: finishing this step and checkpointing it (Ctrl-C again to stop at once)",
      signal.Signals(signum).name,
    )

  previous = {s: signal.signal(s, request) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    yield stop
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


PROFILE_DIR = "profile"


@contextlib.contextmanager
def _profiled(steps: int, start: int, workdir: str | None):
  """Yields ``profile(done, state)``, to call after each step: a ``jax.profiler`` trace of
  ``steps`` steps from the third after ``start`` (the first two compile) into
  ``<workdir>/profile``; nothing when ``steps`` is 0 or ``workdir`` is ``None``."""
  first, last = start + 2, start + 2 + steps
  tracing = False

  def profile(done, state):
    nonlocal tracing
    if not steps or workdir is None:
      return
    if done == first:
      jax.block_until_ready(state)
      jax.profiler.start_trace(os.path.join(workdir, PROFILE_DIR))
      tracing = True
    elif done == last and tracing:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      tracing = False
      logging.info("profile of steps %d-%d in %s", first + 1, last, workdir)

  try:
    yield profile
  finally:
    if tracing:
      jax.profiler.stop_trace()


def _warn_if_schedule_stretched(config, workdir: str, step: int) -> None:
  """Warns when ``config.steps`` lengthens the schedule a resumed run followed so that its
  learning rate at ``step`` rises (a finished cosine run trained further)."""
  record = run_record.read(workdir)
  planned = (record or {}).get("config", {}).get("steps")
  if not isinstance(planned, int) or planned >= config.steps:
    return
  opt = optim.OptimConfig(**config.optim)
  before = float(opt.make_schedule(planned)(step))
  after = float(opt.make_schedule(config.steps)(step))
  if after > before * (1 + 1e-6):
    logging.warning(
      "--config.steps=%d stretches the %s schedule this run followed over %d steps: the learning "
      "rate at step %d rises from %.3g to %.3g and decays again to step %d. To continue a "
      "finished run with a schedule of its own, start a new one from it "
      "(--config.init_from=%s).",
      config.steps,
      opt.schedule,
      planned,
      step,
      before,
      after,
      config.steps,
      workdir,
    )


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, given: Collection[str] | None = None
) -> dict[str, Any]:
  """Trains the configured LM, evaluates it, checkpoints it and samples from it.

  Args:
    config: the experiment config (see ``experiments/configs/default.py``).
    workdir: output directory; with ``config.resume`` the run continues from its checkpoints, up
      to ``config.steps``, with the model, tokenizer and data of its record.
    given: the dotted config fields given on the command line, which must agree with the run
      record when resuming or continuing (``run_record.resolve``); ``None`` counts every set
      field of ``config``.

  Returns:
    The final validation metrics (``loss``, ``bits_per_byte`` or ``bits_per_token``, ``tokens``),
    the last train ``loss``, the ``step`` reached and the ``sample`` text.

  Raises:
    ConfigError: a config field is invalid, disagrees with the run record, or asks a resumed run
      for no more steps than its checkpoint has; the message names its flag.
    TrainingInterrupted: SIGINT or SIGTERM arrived; the step under way was finished and saved.
    FileNotFoundError, FileExistsError, CheckpointError: see ``checkpoint.Checkpointer``.
  """
  # ---- The run's config -------------------------------------------------------------------------
  config = run_record.resolve(config, workdir, given)

  # ---- Devices and mesh -------------------------------------------------------------------------
  if config.multihost:
    distributed.initialize_distributed(**config.distributed)
  config_checks.validate_config(config, jax.device_count(), jax.process_count())
  mesh = sharding.make_mesh(sharding.mesh_shape(dict(config.mesh), jax.device_count()))
  logging.info("mesh %s", dict(mesh.shape))
  # One process writes the metrics, plot and sample; orbax coordinates the checkpoints itself.
  primary = jax.process_index() == 0

  # ---- Tokenizer and data -----------------------------------------------------------------------
  tokenizer = data_lib.load_tokenizer(config.data.tokenizer)
  byte_lengths = metrics.token_byte_lengths(tokenizer)
  # Each process loads the rows of the global batch its devices hold: the batches, and so the
  # run, are the same for any number of processes.
  dataset_args = dict(
    tokenizer=tokenizer,
    seq_len=config.data.seq_len,
    batch_size=config.batch_size,
    seed=config.seed,
    rows=distributed.process_rows(mesh, config.batch_size),
  )
  batch_tokens = config.batch_size * (config.data.seq_len + 1)
  train_ds = data_lib.make_lm_dataset(
    _corpus(config.data.train, "train", batch_tokens), **dataset_args
  )
  # The validation stream repeats, so every process has eval_batches batches; a fresh iterator
  # per evaluation scores the same rows every time.
  val_ds = data_lib.make_lm_dataset(
    _corpus(config.data.validation, "validation", batch_tokens), shuffle=False, **dataset_args
  )
  train_iter = iter(train_ds)

  # ---- Model and optimizer ----------------------------------------------------------------------
  model_cfg = config_checks.model_config(config, tokenizer.vocab_size)
  trainer = Trainer(
    model_cfg,
    optim.OptimConfig(**config.optim),
    steps=config.steps,
    mesh=mesh,
    seed=config.seed,
    accum_steps=config.grad_accum_steps,
    byte_lengths=byte_lengths,
  )
  abstract = trainer.abstract
  num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.params))
  logging.info(
    "model (preset %s): %d layers %s, d_model %d, %d heads, vocabulary %d, context %d: %.2fM "
    "parameters (the whole config is in run.json)",
    config.model.preset,
    model_cfg.num_layers,
    ",".join(model_cfg.layer_mixers),
    model_cfg.d_model,
    model_cfg.num_heads,
    model_cfg.vocab_size,
    model_cfg.max_seq_len,
    num_params / 1e6,
  )

  # ---- Initialize or restore --------------------------------------------------------------------
  checkpoint_dir = os.path.join(workdir, checkpoint.CHECKPOINT_DIR)
  saved = checkpoint.check_directory(checkpoint_dir, resume=config.resume)
  if config.resume and config.steps <= saved[-1]:
    raise config_checks.ConfigError(
      f"--config.steps: the run in {workdir} is at step {saved[-1]} (its latest checkpoint); "
      f"expected more steps to train it further, got {config.steps}"
    )
  if config.resume:
    _warn_if_schedule_stretched(config, workdir, saved[-1])
  if not config.resume:
    state = trainer.init()
    if config.init_from:
      source = checkpoint.restore_params(
        os.path.join(config.init_from, checkpoint.CHECKPOINT_DIR), abstract
      )
      state = state.replace(params=source.params, rest=source.rest)
      logging.info("parameters from %s (step %d)", config.init_from, int(source.step))
    if primary:
      run_record.set_aside_leftovers(workdir)
      run_record.write(workdir, config, model_cfg, num_params)
    if jax.process_count() > 1:  # the other processes start appending metrics after the move
      multihost_utils.sync_global_devices("run record written")

  def evaluate(state):
    return trainer.evaluate(state, iter(val_ds), config.eval_batches)

  train_metrics = {}
  tokens_per_step = config.batch_size * config.data.seq_len
  # Context managers: the checkpoint manager is closed however the run ends (left open, orbax's
  # async machinery prints pages of errors at exit), and an interrupted run (preemption, Ctrl-C)
  # still finishes its pending saves.
  with (
    _stop_on_signals() as stop,
    jax.set_mesh(mesh),
    checkpoint.Checkpointer(
      checkpoint_dir,
      resume=config.resume,
      max_to_keep=config.max_to_keep,
      save_interval_steps=config.checkpoint_every or config.steps,
    ) as ckpt,
  ):
    if config.resume:
      state = ckpt.restore(abstract, train_iter)
      if primary:
        run_record.note_resume(workdir, config, int(state.step))
      logging.info("resumed from step %d", int(state.step))
    start = int(state.step)

    # ---- Train ----------------------------------------------------------------------------------
    # Throughput over each logging interval, timed from the end of the previous one (after its
    # evaluation and checkpoint) to the host sync of this one; the first includes compiling.
    clock, clock_step = time.perf_counter(), start
    with (
      metrics.MetricsWriter(
        workdir,
        config.steps,
        start,
        progress=config.progress,
        write=primary,
        tensorboard=config.tensorboard,
      ) as writer,
      _profiled(config.profile_steps, start, workdir if primary else None) as profile,
    ):
      writer.text("config", f"```\n{config.to_json(indent=2)}\n```", start)

      def after_step(done, state, step_metrics):
        nonlocal train_metrics, clock, clock_step
        profile(done, state)
        if done % config.log_every == 0 or done == config.steps:
          train_metrics = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
          elapsed = time.perf_counter() - clock
          train_metrics["tokens_per_s"] = (done - clock_step) * tokens_per_step / elapsed
          writer.write(done, "train", train_metrics)
        if config.eval_every and done % config.eval_every == 0 and done < config.steps:
          writer.write(done, "validation", evaluate(state))
        if done < config.steps:
          saved = ckpt.save(done, state, train_iter)
          if stop["signal"] is not None:
            if not saved:
              ckpt.save(done, state, train_iter, force=True)
            raise TrainingInterrupted(done, stop["signal"], workdir)
        writer.advance()
        if done % config.log_every == 0:
          clock, clock_step = time.perf_counter(), done

      state, _ = trainer.fit(state, train_iter, config.steps - start, callback=after_step)

      # ---- Final evaluation, checkpoint, plot, sample -------------------------------------------
      final = evaluate(state)
      writer.write(config.steps, "validation", final)
    if ckpt.latest_step() != config.steps:
      ckpt.save(config.steps, state, train_iter, force=True)
  with jax.set_mesh(mesh):
    sample = sample_text(trainer.model(state), tokenizer, config.sample)
  if primary:
    plot = metrics.plot_losses(workdir)
    with open(os.path.join(workdir, metrics.SAMPLE_FILE), "w", encoding="utf-8") as f:
      f.write(sample)
    if config.tensorboard:
      metrics.write_text(workdir, "sample", config.sample.prompt + sample, config.steps)
    bits = "bits_per_byte" if "bits_per_byte" in final else "bits_per_token"
    print(
      f"step {config.steps}: validation {bits.replace('_', ' ')} {final[bits]:.4f}, plot {plot}"
    )
    print(f"sample:\n{config.sample.prompt}{sample}")
  return {
    **final,
    "train_loss": train_metrics.get("loss", math.nan),
    "step": config.steps,
    "sample": sample,
  }


def restore_model(
  config: ml_collections.ConfigDict, workdir: str, given: Collection[str] | None = None
) -> tuple[LM, Any, ml_collections.ConfigDict]:
  """The model of the latest checkpoint under ``workdir``, its tokenizer and the run's config.

  The model and tokenizer are built from the run record (``run_record.resolve`` with
  ``purpose="sample"``): ``config``'s ``given`` fields must agree with it, except the mesh and the
  ``sample`` settings; the returned config holds the sampling settings to use. The model lands on
  the devices of ``config.mesh``.
  """
  config = run_record.resolve(config, workdir, given, purpose="sample")
  config_checks.validate_config(config, jax.device_count(), jax.process_count())
  mesh = sharding.make_mesh(sharding.mesh_shape(dict(config.mesh), jax.device_count()))
  tokenizer = data_lib.load_tokenizer(config.data.tokenizer)
  model_cfg = config_checks.model_config(config, tokenizer.vocab_size)
  trainer = Trainer(
    model_cfg, optim.OptimConfig(**config.optim), steps=config.steps, mesh=mesh, seed=config.seed
  )
  state = checkpoint.restore_params(
    os.path.join(workdir, checkpoint.CHECKPOINT_DIR), trainer.abstract
  )
  return trainer.model(state), tokenizer, config


def _corpus(spec: str, split: str, batch_tokens: int):
  """``"stdlib"`` for the embedded corpus, otherwise paths or globs of .txt / .jsonl files.

  Raises:
    ConfigError: naming ``--config.data.<split>``, when the files are missing, not a corpus, or
      hold fewer tokens than one batch (``batch_tokens``, rows x (seq_len + 1)): every batch would
      repeat the same text.
  """
  if spec == "stdlib":
    return data_lib.stdlib_corpus(split=split)
  paths = config_checks.parse_list(spec, f"--config.data.{split}")
  try:
    corpus = data_lib.text_file_corpus(paths)
  except (FileNotFoundError, ValueError) as e:
    message = re.sub(r"^paths_or_globs: ", "", str(e))
    raise config_checks.ConfigError(
      f"--config.data.{split}: {message} (expected 'stdlib', or paths or globs of .txt / .jsonl "
      "files, comma-separated)"
    ) from e
  # A token covers at least one byte of UTF-8 (byte-level and byte-fallback tokenizers alike),
  # besides each document's bos and eos: the files' sizes bound the tokens from above.
  most = sum(os.path.getsize(p) for p in corpus.paths) + 2 * len(corpus)
  if most < batch_tokens:
    raise config_checks.ConfigError(
      f"--config.data.{split}: {len(corpus.paths)} file(s) of {len(corpus)} document(s) hold at "
      f"most {most} tokens, fewer than one batch of --config.batch_size x (--config.data.seq_len "
      f"+ 1) = {batch_tokens}; add text or make the batch smaller"
    )
  return corpus


def sample_text(model, tokenizer, sample: ml_collections.ConfigDict) -> str:
  """Continues ``sample.prompt`` (after a bos token) until the tokenizer's eos or
  ``sample.max_new_tokens`` tokens, and decodes the new tokens; ``temperature=0`` is greedy (the
  ``top_k``/``top_p`` filters only apply to sampling)."""
  sampler = jaxrec.Sampler(model, tokenizer)
  return sampler(sample.prompt, sample.max_new_tokens, **_sampling(sample)).text[0]


def sample_pieces(model, tokenizer, sample: ml_collections.ConfigDict) -> Iterator[str]:
  """``sample_text`` as it is decoded: the pieces of the new text, on one process."""
  sampler = jaxrec.Sampler(model, tokenizer)
  return sampler.stream(sample.prompt, sample.max_new_tokens, **_sampling(sample))


def _sampling(sample: ml_collections.ConfigDict) -> dict:
  options = dict(temperature=sample.temperature, seed=sample.seed)
  if sample.temperature > 0:
    options |= dict(top_k=sample.top_k, top_p=sample.top_p)
  return options
