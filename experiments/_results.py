"""Where an experiment's report goes.

Every experiment writes its data, plots and report (a ``RESULTS.md`` holding its one ``## ``
section) under its own ``--workdir``/``--config.out_dir``. Only with ``--publish=CHECKOUT`` does
it also copy those files into ``CHECKOUT/results/`` and replace its section of
``CHECKOUT/RESULTS.md``; the commands quoted in ``RESULTS.md`` pass ``--publish=.``. A section's
links are written relative to the ``RESULTS.md`` that holds it, so both reports' links work.
"""

import os
import re
import shutil
from collections.abc import Callable, Sequence

from absl import flags


def define_publish_flag() -> flags.FlagHolder:
  """``--publish``: the checkout whose ``RESULTS.md`` and ``results/`` the run updates."""
  return flags.DEFINE_string(
    "publish",
    None,
    "A jaxrec checkout whose results/ files and RESULTS.md section this run replaces (the "
    "commands in RESULTS.md pass --publish=.). Unset, the run writes only under its workdir.",
  )


def write_report(
  out_dir: str,
  files: Sequence[str],
  section: Callable[[Callable[[str], str]], str],
  *,
  publish: str | None = None,
  subdir: str = "",
) -> list[str]:
  """Writes the report of files already written under ``out_dir`` and returns the paths of the
  ``RESULTS.md`` files written.

  Args:
    out_dir: the experiment's output folder; gets ``out_dir/RESULTS.md``.
    files: the outputs (paths under ``out_dir``) the section links to or that belong with it.
    section: ``section(link)`` is the section's text, starting ``## TITLE``; ``link(path)`` gives
      the path of an output in ``files`` as seen from the ``RESULTS.md`` being written.
    publish: a checkout: ``files`` are copied to ``publish/results/subdir/`` and the section
      replaces its namesake in ``publish/RESULTS.md``.
    subdir: the folder under ``results/`` of the published files.
  """
  out_dir = os.path.abspath(out_dir)
  outside = [f for f in files if os.path.dirname(os.path.abspath(f)) != out_dir]
  if outside:
    raise ValueError(f"files: expected paths directly under {out_dir}, got {outside}")
  targets = [(out_dir, {f: os.path.basename(f) for f in files})]
  if publish:
    dest = os.path.join(os.path.abspath(publish), "results", subdir)
    os.makedirs(dest, exist_ok=True)
    for f in files:
      shutil.copyfile(f, os.path.join(dest, os.path.basename(f)))
    rel = lambda f: os.path.join("results", subdir, os.path.basename(f))
    targets.append((os.path.abspath(publish), {f: rel(f) for f in files}))
  written = []
  for folder, links in targets:
    text = section(lambda path, links=links: links[path])
    title = text.split("\n", 1)[0].removeprefix("## ")
    path = os.path.join(folder, "RESULTS.md")
    write_section(path, title, text)
    written.append(path)
  return written


def write_section(path: str, title: str, text: str) -> None:
  """Replaces the section ``## {title}`` of ``path`` with ``text`` (appends it when missing,
  creates the file when needed)."""
  doc = "# Results\n"
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      doc = f.read()
  pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
  if pattern.search(doc):
    doc = pattern.sub(lambda _: text, doc, count=1)
  else:
    doc = doc.rstrip("\n") + "\n\n" + text
  with open(path, "w", encoding="utf-8") as f:
    f.write(doc.rstrip("\n") + "\n")
