"""``RESULTS.md``: each experiment owns one ``## `` section, which a rerun replaces."""

import os
import re


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
